"""The prompt LLM's RMSNorms as ``F.rms_norm``: against the norm written out here, routed on every
Qwen2 norm of a model (its logits unchanged), and refused for a norm that computes otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from src.fast_path import relative_error
from src.prompt.fused_norms import FusedRmsNorm, fuse_rms_norms

HIDDEN = 48


def written_out(norm: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Qwen2's RMSNorm: normalised in float32, rounded to the input's dtype, then scaled."""
    wide = rows.float()
    normalised = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normalised.to(rows.dtype)


class OnePlusWeightRMSNorm(torch.nn.Module):
    """Shaped like Qwen2's (``weight``, ``variance_epsilon``), scaling by ``1 + weight`` as Gemma's does."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        wide = rows.float()
        normalised = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((1 + self.weight.float()) * normalised).to(rows.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_gives_the_norm_written_out(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    norm = Qwen2RMSNorm(HIDDEN, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(HIDDEN, generator=generator) * 2)
    rows = (torch.randn(2, 5, HIDDEN, generator=generator) * 3).to(dtype)
    got, expected = FusedRmsNorm(norm)(rows), written_out(norm, rows)
    assert got.dtype == dtype and got.shape == rows.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:  # one bfloat16 rounding apart: scaled before rounding instead of after
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3)
        assert not torch.equal(got, expected)  # so the tolerance above is what is being tested


def tiny_qwen2(layers: int = 3) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # trained norms are not all ones
        for module in model.modules():
            if isinstance(module, Qwen2RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def test_every_qwen2_norm_is_routed_and_the_logits_stay() -> None:
    model = tiny_qwen2()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        own = model(ids).logits
        routes = fuse_rms_norms(model)
        norms = [module for module in model.modules() if isinstance(module, Qwen2RMSNorm)]
        assert len(norms) == 2 * 3 + 1 and {id(r.module) for r in routes} == {id(n) for n in norms}
        fused = model(ids).logits
    assert relative_error(fused, own) < 1e-5
    assert sum(r.served for r in routes) == len(norms)  # each norm once per forward
    for installed in routes:
        installed.undo()
    assert all("forward" not in vars(norm) for norm in norms)


def test_norms_that_compute_otherwise_keep_their_forward(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.ModuleDict(
        {
            "one_plus_weight": OnePlusWeightRMSNorm(HIDDEN),  # shaped like Qwen2's: checked, refused
            "gemma": GemmaRMSNorm(HIDDEN),  # no variance_epsilon: not considered
            "qwen2": Qwen2RMSNorm(HIDDEN),
        }
    )
    with caplog.at_level("INFO"):
        routes = fuse_rms_norms(model)
    assert [r.module for r in routes] == [model["qwen2"]]
    assert "forward" not in vars(model["one_plus_weight"]) and "forward" not in vars(model["gemma"])
    assert "1 RMSNorms computed by F.rms_norm (['OnePlusWeightRMSNorm'] kept)" in caplog.text


def test_other_calls_run_the_norms_own_forward() -> None:
    norm = Qwen2RMSNorm(HIDDEN)
    runner = FusedRmsNorm(norm)
    assert runner.serves(torch.ones(1, HIDDEN))
    assert not runner.serves(torch.ones(1, HIDDEN + 1))
    assert not runner.serves(torch.ones(1, HIDDEN, dtype=torch.float64))  # the weight is float32
    assert not runner.serves(torch.ones(1, HIDDEN), torch.ones(1))
    assert not runner.serves(hidden_states="text")
