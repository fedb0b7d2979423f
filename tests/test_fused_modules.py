"""The prompt LLM's RMSNorms as ``F.rms_norm`` and its MLPs with gate and up joined: each against
the module written out here, routed on every Qwen2 norm and MLP of a model (its logits unchanged),
and refused for a module that computes otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from src.fast_path import relative_error
from src.prompt.fused_modules import FusedRmsNorm, JoinedGateUp, fuse_modules, fuse_rms_norms, join_gate_up

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


# ------------------------------------------------------------------ gated MLPs, gate and up joined


def test_joined_mlp_gives_the_gated_mlp_written_out() -> None:
    model = tiny_qwen2(layers=1)
    mlp = model.model.layers[0].mlp
    gate, up, down = (p.weight.detach().clone() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    rows = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(4))
    joined = JoinedGateUp(mlp)
    expected = torch.nn.functional.silu(rows @ gate.T) * (rows @ up.T) @ down.T
    torch.testing.assert_close(joined(rows), expected, rtol=1e-5, atol=1e-6)
    # the projections now read halves of the joined weight: nothing is held twice
    assert mlp.gate_proj.weight.data_ptr() == joined.weight.data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == joined.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(mlp(rows), expected, rtol=1e-5, atol=1e-6)  # its own forward too


def test_every_qwen2_mlp_is_joined_and_the_logits_stay() -> None:
    model = tiny_qwen2()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    parameters = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        own = model(ids).logits
        routes = fuse_modules(model)
        fused = model(ids).logits
    mlps = [layer.mlp for layer in model.model.layers]
    assert {id(r.module) for r in routes} >= {id(mlp) for mlp in mlps}
    assert len(routes) == 2 * 3 + 1 + 3  # the norms and the MLPs
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert relative_error(fused, own) < 1e-5
    assert sum(r.served for r in routes if r.module in mlps) == 3


class UpFirstMlp(torch.nn.Module):
    """Shaped like Qwen2's MLP, computing ``down(act(up(x)) * gate(x))``: not what joining assumes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, 64, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, 64, bias=False)
        self.down_proj = torch.nn.Linear(64, HIDDEN, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_mlps_that_compute_otherwise_keep_their_forward(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    model = torch.nn.ModuleDict({"up_first": UpFirstMlp(), "qwen2": tiny_qwen2(layers=1).model.layers[0].mlp})
    with caplog.at_level("INFO"):
        routes = join_gate_up(model)
    assert [r.module for r in routes] == [model["qwen2"]]
    assert "forward" not in vars(model["up_first"])
    assert "UpFirstMlp: gate and up joined vs its forward: relative error" in caplog.text
    joined = routes[0].runner
    assert joined.serves(torch.ones(1, HIDDEN)) and not joined.serves(torch.ones(1, HIDDEN + 1))
    assert not joined.serves(torch.ones(1, HIDDEN, dtype=torch.float64))
