"""Prompt enhancement on the tiny random Qwen2 (its text is noise; tokenizer, chat template, decoder
and plumbing are real): the four ``*_enhanced`` types, ``config.enhance_prompt``, the system prompts,
determinism, the fallbacks, the refusals, and the local API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from diffusers import WanPipeline
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from src.prompt.decode import GROUPED_DECODE, grouped_decode_attention
from src.prompt.enhance import ENHANCED_TYPES, usable_answer
from src.prompt.family import PromptFamily
from src.prompt.instructions import SYSTEM_PROMPTS, system_prompt_name
from src.settings import Settings
from src.timing import Phases
from src.worker import Worker
from tests.conftest import BUCKET, tiny_settings
from tests.test_harness import api_server, s3_env
from tests.test_wan_e2e import wan_job

NEW_TOKENS = 24
SMALL = {"width": 256, "height": 256, "num_inference_steps": 1}


def small_job(job_id: str, job_type: str, **overrides: Any) -> dict[str, Any]:
    """A one-step 256x256 Wan job (5 frames for videos)."""
    frames = {"num_frames": 5} if job_type.startswith("video") else {}
    config = {**SMALL, **frames, **overrides.pop("config", {})}
    return wan_job(job_id, job_type, config=config, **overrides)


@pytest.fixture(scope="module")
def llm_worker(sdxl_worker: Worker, wan_worker: Worker, s3_endpoint: str) -> Worker:
    """A worker with all three families (the SDXL and Wan ones shared with the other tests)."""
    settings = tiny_settings(s3_endpoint, ["sdxl", "wan", "prompt"], enhance_max_new_tokens=NEW_TOKENS)
    llm = PromptFamily.load(settings)
    llm.warm_up(Phases())
    return Worker(settings, sdxl_worker.storage, [*sdxl_worker.families, *wan_worker.families, llm])


@pytest.fixture
def llm(llm_worker: Worker) -> PromptFamily:
    return llm_worker._llm  # type: ignore[return-value]


@pytest.fixture
def wan_prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The prompts WanPipeline is called with (the generator's door)."""
    seen: list[str] = []
    real = WanPipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["prompt"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", spy)
    yield seen


class ForcedToken(torch.nn.Module):
    """An LM head that always predicts ``token``: forces what the LLM writes."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.token] = 100.0
        return logits


@contextmanager
def forced_token(llm: PromptFamily, token: int) -> Iterator[None]:
    """The LLM writes ``token`` at every step while inside."""
    head = llm.model.lm_head
    llm.model.lm_head = ForcedToken(token, llm.model.config.vocab_size)
    try:
        yield
    finally:
        llm.model.lm_head = head


def stored_object(s3: Any, url: str) -> tuple[bytes, str]:
    obj = s3.get_object(Bucket=BUCKET, Key=url.split("/", 1)[1])
    return obj["Body"].read(), obj["ContentType"]


def keys_under(s3: Any, job_id: str) -> int:
    return s3.list_objects_v2(Bucket=BUCKET, Prefix=f"user-2/{job_id}/").get("KeyCount", 0)


# ------------------------------------------------------------------ the enhanced types


@pytest.mark.parametrize("enhanced_type", sorted(ENHANCED_TYPES))
def test_an_enhanced_type_is_its_base_type_run_with_the_enhanced_prompt(
    enhanced_type: str, llm_worker: Worker, wan_prompts: list[str], s3: Any
) -> None:
    base_type = ENHANCED_TYPES[enhanced_type]
    job = wan_job(f"enh-{enhanced_type}", enhanced_type)
    result = llm_worker.handle(job)
    assert result["status"] == "completed", result
    meta = result["metadata"]
    assert meta["job_type"] == enhanced_type
    assert meta["original_prompt"] == "a paper boat on a pond"
    enhanced = meta["enhanced_prompt"]
    assert enhanced and enhanced != meta["original_prompt"] and "enhance_error" not in meta
    assert meta["enhance_system_prompt"] == "wan_en" and meta["enhance_s"] > 0
    assert wan_prompts == [enhanced]  # what the generator received
    (asset,) = result["assets"]
    assert asset["metadata"]["prompt_enhanced"] is True

    # The same job as its base type, given the enhanced prompt: the same asset, byte for byte.
    base = wan_job(f"base-{enhanced_type}", base_type, prompt=enhanced)
    base_result = llm_worker.handle(base)
    (base_asset,) = base_result["assets"]
    assert base_asset["metadata"]["prompt_enhanced"] is False
    assert "enhanced_prompt" not in base_result["metadata"]
    got, content_type = stored_object(s3, asset["url"])
    expected, _ = stored_object(s3, base_asset["url"])
    assert got == expected
    assert content_type == ("video/mp4" if base_type.startswith("video") else "image/png")
    drop = {"prompt_enhanced", "asset_index"}
    assert {k: v for k, v in asset["metadata"].items() if k not in drop} == {
        k: v for k, v in base_asset["metadata"].items() if k not in drop
    }


def test_enhance_prompt_in_config_does_the_same_for_sdxl_and_wan(
    llm_worker: Worker, wan_prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = llm_worker.families[0].prompts  # the SDXL family's
    seen: list[str] = []
    real = encoder.embed
    monkeypatch.setattr(
        encoder, "embed", lambda prompt, *a, **k: seen.append(prompt) or real(prompt, *a, **k)
    )
    sdxl = llm_worker.handle(
        {
            "id": "rp",
            "input": {
                "id": "enh-sdxl",
                "type": "sdxl_image_fast",
                "prompt": "a red fox",
                "user_id": "user-2",
                "config": {"width": 512, "height": 512, "num_inference_steps": 1, "enhance_prompt": True},
            },
        }
    )
    wan = llm_worker.handle(small_job("enh-wan-config", "image_fast", config={"enhance_prompt": True}))
    off = llm_worker.handle(small_job("enh-wan-off", "image_fast", config={"enhance_prompt": False}))
    assert sdxl["metadata"]["enhance_system_prompt"] == "sdxl"
    assert seen == [sdxl["metadata"]["enhanced_prompt"]]
    assert sdxl["assets"][0]["metadata"]["prompt_enhanced"] is True
    assert wan["metadata"]["enhance_system_prompt"] == "wan_en"
    assert wan_prompts == [wan["metadata"]["enhanced_prompt"], "a paper boat on a pond"]
    assert "original_prompt" not in off["metadata"]
    assert off["assets"][0]["metadata"]["prompt_enhanced"] is False


# ------------------------------------------------------------------ what reaches the LLM


def test_the_system_prompt_and_chat_template_reach_the_model(llm_worker: Worker, llm: PromptFamily) -> None:
    prefills: list[torch.Tensor] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        if ids.shape[1] > 1:
            prefills.append(ids.clone())

    handle = llm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        english = llm_worker.handle(small_job("enh-chat-en", "image7b_fast_enhanced"))
        chinese = llm_worker.handle(small_job("enh-chat-zh", "image7b_fast_enhanced", prompt="湖上的纸船"))
    finally:
        handle.remove()
    assert english["status"] == chinese["status"] == "completed"
    rendered = [llm.tokenizer.decode(ids[0]) for ids in prefills]
    for text, name, prompt in zip(
        rendered, ("wan_en", "wan_zh"), ("a paper boat on a pond", "湖上的纸船"), strict=True
    ):
        assert text == (
            f"<|im_start|>system\n{SYSTEM_PROMPTS[name]['text']}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
    assert chinese["metadata"]["enhance_system_prompt"] == "wan_zh"


def test_the_system_prompts_are_the_wan_teams_and_named() -> None:
    assert set(SYSTEM_PROMPTS) == {"wan_en", "wan_zh", "sdxl"}
    for name in ("wan_en", "wan_zh"):
        assert "Wan-Video/Wan2.1, wan/utils/prompt_extend.py" in SYSTEM_PROMPTS[name]["source"]
    assert SYSTEM_PROMPTS["wan_en"]["text"].startswith(
        "You are a prompt engineer, aiming to rewrite user inputs"
    )
    assert SYSTEM_PROMPTS["wan_en"]["text"].endswith("without extra responses and quotation mark:")
    assert SYSTEM_PROMPTS["wan_zh"]["text"].startswith("你是一位Prompt优化师")
    assert (system_prompt_name("wan", "a cat"), system_prompt_name("wan", "一只猫 walking")) == (
        "wan_en",
        "wan_zh",
    )
    assert system_prompt_name("sdxl", "一只猫") == "sdxl"


def test_the_same_job_gets_the_same_enhanced_prompt_whatever_ran_between(llm_worker: Worker) -> None:
    def enhanced(job_id: str, prompt: str, seed: int) -> str:
        result = llm_worker.handle(
            small_job(job_id, "image7b_fast_enhanced", prompt=prompt, config={"seed": seed})
        )
        return result["metadata"]["enhanced_prompt"]

    first = enhanced("enh-same-1", "a paper boat on a pond", 4)
    other = enhanced("enh-same-2", "a lighthouse in a storm at night, waves", 4)
    again = enhanced("enh-same-3", "a paper boat on a pond", 4)
    assert first == again != other


# ------------------------------------------------------------------ the fallbacks


def test_an_empty_answer_runs_the_job_with_its_own_prompt(
    llm_worker: Worker, llm: PromptFamily, wan_prompts: list[str]
) -> None:
    with forced_token(llm, llm.tokenizer.convert_tokens_to_ids("<|im_end|>")):
        result = llm_worker.handle(small_job("enh-empty", "video7b_fast_enhanced"))
    assert result["status"] == "completed", result
    meta = result["metadata"]
    assert meta["enhanced_prompt"] is None and meta["original_prompt"] == "a paper boat on a pond"
    assert meta["enhance_error"] == "the LLM's answer was empty ('')"
    assert result["assets"][0]["metadata"]["prompt_enhanced"] is False
    assert wan_prompts == ["a paper boat on a pond"]


def test_an_answer_cut_off_before_a_whole_word_runs_the_job_with_its_own_prompt(
    llm_worker: Worker, llm: PromptFamily
) -> None:
    with forced_token(llm, llm.tokenizer.convert_tokens_to_ids("a")):
        result = llm_worker.handle(small_job("enh-cut", "image7b_fast_enhanced"))
    assert result["status"] == "completed", result
    assert result["metadata"]["enhance_error"] == (
        f"the LLM's answer was cut off at ENHANCE_MAX_NEW_TOKENS ({NEW_TOKENS}) tokens "
        "before its first complete word"
    )
    assert result["assets"][0]["metadata"]["prompt_enhanced"] is False


def test_a_failing_or_overlong_enhancement_never_fails_the_job(
    llm_worker: Worker, llm: PromptFamily, wan_prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = llm.decoder.max_input_tokens
    llm.decoder.max_input_tokens = 40
    try:
        long = llm_worker.handle(small_job("enh-long", "image7b_fast_enhanced"))
    finally:
        llm.decoder.max_input_tokens = limit
    assert long["status"] == "completed", long
    assert long["metadata"]["enhance_error"].startswith("the prompt is too long to enhance: ")
    assert long["metadata"]["enhance_error"].endswith(
        "tokens with the system prompt, ENHANCE_MAX_INPUT_TOKENS is 40"
    )

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of tokens\nsecond line")

    monkeypatch.setattr(llm, "rewrite", broken)
    failed = llm_worker.handle(small_job("enh-broken", "image7b_fast_enhanced"))
    assert failed["status"] == "completed", failed
    assert failed["metadata"]["enhance_error"] == "the LLM failed: RuntimeError: out of tokens"
    assert wan_prompts == ["a paper boat on a pond"] * 2


@pytest.mark.parametrize(
    ("text", "cut_off", "expected"),
    [
        ('  "A paper boat drifts on a pond."  ', False, "A paper boat drifts on a pond."),
        ("A boat drifts. The water shines, the sky", True, "A boat drifts."),
        ("a boat, calm water, soft light, detai", True, "a boat, calm water, soft light"),
        ("a boat on calm wat", True, "a boat on calm"),
        ("纸船漂在湖上。阳光照", True, "纸船漂在湖上。"),
        ("", False, None),
        (" \n\t ", False, None),
        ('"..."', False, None),
        ("wordwithoutend", True, None),
    ],
)
def test_what_of_an_answer_is_usable(text: str, cut_off: bool, expected: str | None) -> None:
    assert usable_answer(text, cut_off) == expected


# ------------------------------------------------------------------ refusals


def test_a_worker_without_the_prompt_family_refuses_enhanced_jobs(
    wan_worker: Worker, sdxl_worker: Worker, s3: Any
) -> None:
    typed = wan_worker.handle(wan_job("enh-no-llm", "video7b_fast_enhanced"))
    assert typed["error"] == (
        "type: 'video7b_fast_enhanced' needs a model family this worker does not load "
        "(prompt; WORKER_MODELS=wan)"
    )
    flagged = wan_worker.handle(wan_job("enh-no-llm-2", config={"enhance_prompt": True, "num_frames": 5}))
    assert flagged["error"] == (
        "config.enhance_prompt: true needs a model family this worker does not load "
        "(prompt; WORKER_MODELS=wan)"
    )
    unknown = sdxl_worker.handle(wan_job("enh-unknown", "video7b_turbo_enhanced"))
    assert "video7b_fast_enhanced" in unknown["error"] and unknown["error"].startswith(
        "type: unknown job type"
    )
    assert keys_under(s3, "enh-no-llm") == keys_under(s3, "enh-no-llm-2") == 0


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_enhance_prompt_must_be_a_boolean(llm_worker: Worker, value: Any, s3: Any) -> None:
    result = llm_worker.handle(wan_job("enh-bad", config={"enhance_prompt": value, "num_frames": 5}))
    assert result["status"] == "failed"
    assert result["error"].startswith("config.enhance_prompt: "), result
    assert keys_under(s3, "enh-bad") == 0


def test_prompt_alone_is_not_a_worker() -> None:
    with pytest.raises(ValueError, match="prompt only enhances their jobs"):
        Settings(worker_models="prompt", local_storage_dir=Path("/tmp"))


# ------------------------------------------------------------------ the local API


def test_the_enhanced_types_through_the_local_api(s3: Any, s3_endpoint: str) -> None:
    env = {
        **s3_env(s3_endpoint),
        "WORKER_MODELS": "wan,prompt",
        "ENHANCE_MAX_NEW_TOKENS": "16",
        "WAN_TURBO": "0",
    }
    config = {"width": 256, "height": 256, "num_inference_steps": 1, "seed": 3}
    jobs = {
        enhanced_type: wan_job(
            f"api-{enhanced_type}",
            enhanced_type,
            config={**config, **({"num_frames": 5} if enhanced_type.startswith("video") else {})},
        )["input"]
        for enhanced_type in sorted(ENHANCED_TYPES)
    }
    with api_server(env) as base:
        results = {
            name: requests.post(f"{base}/runsync", json={"input": job}, timeout=240).json()
            for name, job in jobs.items()
        }
    for name, result in results.items():
        assert result["status"] == "COMPLETED", result
        output = result["output"]
        meta = output["metadata"]
        assert meta["job_type"] == name and meta["original_prompt"] == "a paper boat on a pond"
        assert meta["enhanced_prompt"] and meta["enhanced_prompt"] != meta["original_prompt"]
        (asset,) = output["assets"]
        video = name.startswith("video")
        assert asset["url"] == f"{BUCKET}/user-2/api-{name}/0.{'mp4' if video else 'png'}"
        body, content_type = stored_object(s3, asset["url"])
        assert (
            content_type == ("video/mp4" if video else "image/png")
            and len(body) == asset["metadata"]["file_size_bytes"]
        )
        assert asset["metadata"]["prompt_enhanced"] is True
        assert (asset["metadata"]["width"], asset["metadata"]["height"]) == (256, 256)
        assert asset["metadata"].get("num_frames", 1) == (5 if video else 1)


def test_the_decoder_writes_what_transformers_generate_writes(llm: PromptFamily) -> None:
    """The static-cache greedy decoder against an independent implementation: transformers'
    ``generate`` (dynamic cache, greedy), token for token."""
    ids = llm.chat_ids(SYSTEM_PROMPTS["sdxl"]["text"], "a red fox in the snow")
    mine = llm.decoder(ids, stop_at_end=False).ids
    assert llm.model.config._attn_implementation == GROUPED_DECODE and llm.decoder.routes
    with llm.decoder.as_shipped(), torch.inference_mode():  # generate as transformers ships it
        norms = [module for module in llm.model.modules() if isinstance(module, Qwen2RMSNorm)]
        assert norms and all("forward" not in vars(norm) for norm in norms)
        expected = llm.model.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert llm.model.config._attn_implementation == GROUPED_DECODE
    assert len(mine) == NEW_TOKENS and mine == expected[0, ids.shape[1] :].tolist()


def test_a_decode_step_attends_as_repeated_key_value_heads_do() -> None:
    """``grouped_decode_attention`` for one query token against attention written out here: each
    key/value head repeated for its query heads, masked positions excluded, softmax."""
    generator = torch.Generator().manual_seed(5)
    batch, kv_heads, groups, length, dim = 1, 2, 3, 11, 8
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool)
    mask[..., :7] = True  # a static cache holding 7 positions of 11
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)

    repeated_key = key.repeat_interleave(groups, dim=1)[..., :7, :]
    repeated_value = value.repeat_interleave(groups, dim=1)[..., :7, :]
    weights = torch.softmax(query @ repeated_key.transpose(-1, -2) * 0.3, dim=-1)
    expected = (weights @ repeated_value).transpose(1, 2)  # (batch, 1, heads, dim)
    assert got.shape == (batch, 1, kv_heads * groups, dim)
    torch.testing.assert_close(got, expected)
