"""The controls image platforms expect, on the tiny models: prompt weighting and long prompts
(Compel), samplers by their A1111 names, clip skip, output formats, and Wan's default negative
prompt. Weighting and clip skip are checked against independent computations (Compel's formula,
diffusers' own encode_prompt)."""

from __future__ import annotations

import io
import logging
import random
from typing import Any

import pytest
import torch
from compel import Compel, CompelForSDXL
from compel.prompt_parser import PromptParser
from diffusers import WanPipeline
from PIL import Image

from src.fast_path import route
from src.sdxl.graphed_encoders import GraphedTextEncoder
from src.sdxl.prompts import PromptEncoder, _Encoder, _Pipe, compel_syntax, parse
from src.sdxl.schedulers import SCHEDULERS
from src.wan.plan import DEFAULT_NEGATIVE_PROMPT
from src.worker import Worker
from tests.conftest import BUCKET, ImageServer

SIZE = {"width": 512, "height": 512}


def job(job_id: str, prompt: str = "a red fox", **config: Any) -> dict[str, Any]:
    body = {"id": job_id, "type": "sdxl_image_fast", "prompt": prompt, "user_id": "controls"}
    return {"id": "rp", "input": {**body, "config": {**SIZE, "num_inference_steps": 2, "seed": 5, **config}}}


def stored(s3: Any, result: dict[str, Any], index: int = 0) -> tuple[bytes, str]:
    assert result["status"] == "completed", result
    obj = s3.get_object(Bucket=BUCKET, Key=result["assets"][index]["url"].split("/", 1)[1])
    return obj["Body"].read(), obj["ContentType"]


@pytest.fixture(scope="module")
def pipe(sdxl_worker: Worker) -> Any:
    return sdxl_worker.families[0].text2img


@pytest.fixture
def encoder(pipe: Any) -> PromptEncoder:
    """A new encoder over the worker's pipeline (none of its cached empty-prompt embeddings)."""
    return PromptEncoder(pipe)


# ------------------------------------------------------------------ weighting and long prompts


def test_a_weighted_token_is_scaled_away_from_the_empty_prompt(pipe: Any, encoder: PromptEncoder) -> None:
    """Compel's rule, computed here: weighted = empty + 1.3 x (neutral - empty) at the token, and
    every other position as in the neutral prompt."""
    neutral = encoder.embed("a red fox", None, weighting=True, clip_skip=0).embeds
    empty = encoder.embed("", None, weighting=True, clip_skip=0).embeds
    weighted = encoder.embed("a (red:1.3) fox", None, weighting=True, clip_skip=0).embeds
    changed = (weighted - neutral).abs().amax(dim=-1)[0] > 1e-6
    red = len(pipe.tokenizer("red", add_special_tokens=False).input_ids)
    assert int(changed.sum()) == red  # exactly the tokens of "red"
    expected = empty + 1.3 * (neutral - empty)
    torch.testing.assert_close(weighted[0, changed], expected[0, changed], rtol=1e-5, atol=1e-5)


def test_the_empty_prompt_is_embedded_once_per_encoder_weights_and_clip_skip(
    pipe: Any, encoder: PromptEncoder
) -> None:
    """Compel weights from the empty prompt's embedding: the first weighted call embeds it (two
    calls of the first encoder: the chunk, the empty prompt), the next ones reuse it (one call),
    until the clip skip or the weights (``weights_key``) change."""
    calls: list[int] = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))

    def count(**changes: Any) -> tuple[int, torch.Tensor]:
        calls.clear()
        embeds = encoder.embed(
            "a (red:1.3) fox", None, **{"weighting": True, "clip_skip": 0, **changes}
        ).embeds
        return len(calls), embeds

    try:
        (first, embeds), (again, embeds_again) = count(), count()
        assert (first, again) == (2, 1) and torch.equal(embeds, embeds_again)
        assert count(clip_skip=1)[0] == 2 and count(clip_skip=1)[0] == 1 and count()[0] == 1
        assert count(weights_key=(("lora", 0.8),))[0] == 2 and count(weights_key=(("lora", 0.8),))[0] == 1
        assert count()[0] == 2  # the weights' key changed back: embedded again
    finally:
        hook.remove()


def test_each_prompt_is_parsed_once_as_compel_parses_it(
    pipe: Any, encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compel parses each prompt once per text encoder, building its grammar each time: here each
    distinct prompt is parsed once, a prompt parsed lately not again, into what Compel's own
    parse gives, and the embeddings are Compel's own on the pipeline."""
    parse.cache_clear()
    parsed: list[str] = []
    real = PromptParser.parse_conjunction
    monkeypatch.setattr(
        PromptParser, "parse_conjunction", lambda self, text: parsed.append(text) or real(self, text)
    )
    prompt, negative = "a (red:1.3) fox.", "blurry. low quality-"  # not flat: the periods
    ours = encoder.embed(prompt, negative, weighting=True, clip_skip=0)
    assert parsed == [compel_syntax(prompt), negative]  # once each, for both encoders
    encoder.embed("a blue fox-.", negative, weighting=True, clip_skip=0)
    assert parsed[2:] == ["a blue fox-."]  # the negative prompt was parsed before
    encoder.embed("a (blue:1.2) fox, in snow", "blurry, low quality-", weighting=True, clip_skip=0)
    assert parsed[3:] == []  # flat: nothing for Compel's grammar that ``parse`` does not read
    for text in (compel_syntax(prompt), negative, "a (big red)++ fox", "a cat.and(a dog)", "a fox-, 8k"):
        assert repr(parse(text)) == repr(Compel.parse_prompt_string(text))
    with torch.inference_mode():
        compels = CompelForSDXL(pipe)(compel_syntax(prompt), negative_prompt=negative)
    torch.testing.assert_close(ours.embeds, compels.embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.negative, compels.negative_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.pooled, compels.pooled_embeds, rtol=1e-6, atol=1e-6)


WORDS = ["a", "Fox", "8k", "5", "0", "E5", "inf", "and", "AND", "blend", "swap", "useLora", "withLora"]
WEIGHTS = ["1", "1.0", "0", "0.05", "0.9091", "01.50", "1.3", "2", "10", "+", "++", "-", "---"]


def flat_prompt(generator: random.Random) -> str:
    """Words and digits, single spaces, commas before a space or at the end, and weighted items of
    such words in Compel's and A1111's forms (``_FLAT``'s language once A1111's are rewritten),
    Compel's operator names among the words."""

    def words(most: int) -> str:
        return " ".join(generator.choice(WORDS) for _ in range(generator.randint(1, most)))

    def item() -> str:
        return generator.choice(
            [
                generator.choice(WORDS),
                generator.choice(WORDS),
                f"({words(3)}){generator.choice(WEIGHTS)}",
                generator.choice(WORDS) + generator.choice(["+", "-", "++", "--"]),
                f"({words(3)}:{generator.choice(['1.3', '0.8', '1'])})",
                f"[{words(2)}]",
                f"({words(2)})",
            ]
        )

    text = item()
    for _ in range(generator.randint(0, 12)):
        text += generator.choice([" ", ", "]) + item()
    return compel_syntax(text + ("," if generator.random() < 0.2 else ""))


def test_flat_prompts_parse_as_compel_parses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat prompts (plain words, weighted items of plain words) skip Compel's parser, and Compel's
    parser gives the same for 1500 of them; the prompts just outside that language (whitespace or
    commas Compel normalises, punctuation it reads, nesting, its LoRA syntax) still go to it."""
    generator = random.Random(11)
    flat = ["a fox", "a fox, in snow,", *(flat_prompt(generator) for _ in range(1500))]
    outside = [
        "a  fox", " a fox", "a fox ", "a,fox", "a , fox", "a fox.", "a-fox", "a fox,,",
        "a (fox)1.3x", "a(fox)1.3", "(a (fox)1.2)1.1", "(a, fox)1.2", "(fox)-0.5", "(fox)2.",
        "fox+-", "a useLora (fox)1", "withLora (fox)", "(fox)1.2.3",
    ]  # fmt: skip
    compel = PromptParser()
    expected = {text: repr(compel.parse_conjunction(text)) for text in flat + outside}
    parsed: list[str] = []
    real = PromptParser.parse_conjunction
    monkeypatch.setattr(
        PromptParser, "parse_conjunction", lambda self, text: parsed.append(text) or real(self, text)
    )
    parse.cache_clear()
    for text in flat + outside:
        assert repr(parse(text)) == expected[text], text
    lora_syntax = [text for text in flat if "useLora (" in text or "withLora (" in text]
    assert parsed == lora_syntax + outside  # Compel reads ``useLora (name)`` as a LoRA
    assert sum(1 for text in flat if len(parse(text).prompts[0].children) > 1) > 1000  # weighted ones


@pytest.mark.parametrize(
    ("prompt", "clip_skip"),
    [
        ("a fox, blurry-", 0),  # one down-weighted fragment: the prompt and one masked copy
        ("(a fox)0.5, [snow], low quality--, 8k", 0),  # three: two calls of two rows
        ("a fox (in snow)0, (red:1.3)", 1),
        ("a (red:1.3) fox", 0),  # up-weighted only: one row
        ("", 0),
        ("a (red:1.3) fox, low-, " * 12, 0),  # past one chunk: Compel's own path
    ],
)
def test_batched_down_weighting_is_compels(
    pipe: Any, encoder: PromptEncoder, prompt: str, clip_skip: int
) -> None:
    """A prompt and its masked copies, encoded together, embed as Compel embeds them one by one."""
    ours = encoder.embed(prompt, "blurry. low quality-", weighting=True, clip_skip=clip_skip)
    # Compel on the pipeline's encoders; with clip skip through ``_Encoder``, which drops the last layers
    compels_pipe = pipe
    if clip_skip:
        encoders = (_Encoder(pipe.text_encoder, clip_skip), _Encoder(pipe.text_encoder_2, clip_skip))
        compels_pipe = _Pipe(pipe.tokenizer, encoders[0], pipe.tokenizer_2, encoders[1])
    with torch.inference_mode():
        compels = CompelForSDXL(compels_pipe)(compel_syntax(prompt), negative_prompt="blurry. low quality-")
    for got, expected in (
        (ours.embeds, compels.embeds),
        (ours.pooled, compels.pooled_embeds),
        (ours.negative, compels.negative_embeds),
    ):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_down_weighted_prompt_is_one_encoder_call(pipe: Any, encoder: PromptEncoder) -> None:
    """Each encoder embeds "a fox, blurry-" and its copy without "blurry" in one two-row call."""
    calls: dict[str, list[tuple[tuple[int, ...], bool]]] = {"text_encoder": [], "text_encoder_2": []}
    encoder.embed("(warm)1.1", None, weighting=True, clip_skip=0)  # the empty prompt, embedded once
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(
                (tuple(args[0].shape), kwargs.get("attention_mask") is not None)
            ),
            with_kwargs=True,
        )
        for name, seen in calls.items()
    ]
    try:
        encoder.embed("a fox, blurry-", None, weighting=True, clip_skip=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["text_encoder"] == [((2, 77), True)]
    assert calls["text_encoder_2"] == [((2, 77), True), ((1, 77), False)]  # then the pooled embedding


def test_changed_encoder_weights_get_their_own_empty_prompt(pipe: Any, encoder: PromptEncoder) -> None:
    """Weights changed in place (as a merged LoRA changes them) under a new ``weights_key``: the same
    embeddings as a new encoder's; under the old key, an encoder would weight from the stale
    empty prompt (what the key prevents)."""
    weighted = {"prompt": "a (red:1.3) fox", "negative_prompt": None, "weighting": True, "clip_skip": 0}
    before = encoder.embed(**weighted).embeds
    stale = PromptEncoder(pipe)
    stale.embed(**weighted)
    (weight,) = (
        w for name, w in pipe.text_encoder.named_parameters() if name.endswith("layers.0.mlp.fc1.weight")
    )
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        merged = encoder.embed(**weighted, weights_key=(("lora", 1.0),)).embeds
        fresh = PromptEncoder(pipe).embed(**weighted).embeds
        assert torch.equal(merged, fresh) and not torch.allclose(merged, before)
        assert not torch.allclose(stale.embed(**weighted).embeds, fresh)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.equal(encoder.embed(**weighted).embeds, before)


@pytest.mark.parametrize(
    ("a1111", "weights"),
    [
        ("a (red:1.3) fox", {"red": 1.3}),
        ("a (red) fox", {"red": 1.1}),
        ("a ((red)) fox", {"red": 1.21}),
        ("a [red] fox", {"red": 0.9091}),
        ("a red+ fox", {"red": 1.1}),
        ("a red- fox", {"red": 0.9}),
        ("a (big red)++ fox", {"big red": 1.21}),
        ("(blurry:0.6), (bad hands:1.2)", {"blurry": 0.6, "bad hands": 1.2}),
        (r"a \(red\) fox", {"a (red) fox": 1.0}),
    ],
)
def test_a1111_and_compel_weighting_read_as_their_users_mean(a1111: str, weights: dict[str, float]) -> None:
    (prompt,) = PromptParser().parse_conjunction(compel_syntax(a1111)).prompts
    parsed = {fragment.text: fragment.weight for fragment in prompt.children}
    assert {text: pytest.approx(weight) for text, weight in weights.items()}.items() <= parsed.items()


def test_the_unet_receives_the_weighted_embeddings(
    sdxl_worker: Worker, pipe: Any, s3: Any, encoder: PromptEncoder
) -> None:
    seen: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        stored(s3, sdxl_worker.handle(job("door-weighted", "a (red:1.3) fox", num_inference_steps=1)))
    finally:
        hook.remove()
    expected = encoder.embed("a (red:1.3) fox", None, weighting=True, clip_skip=0).embeds
    torch.testing.assert_close(seen[0][1:], expected)  # the CFG batch: [negative (zeros), prompt]


def test_a_200_token_prompt_is_not_cut(sdxl_worker: Worker, s3: Any) -> None:
    head = "a lighthouse on a cliff at sunset, " * 5  # 175 tokens of the tiny character-level tokenizer
    first = stored(s3, sdxl_worker.handle(job("long-1", head + "in winter snow")))[0]
    second = stored(s3, sdxl_worker.handle(job("long-2", head + "in summer rain")))[0]
    assert first != second  # the tail past 77 (and 154) tokens changed the image
    literal = stored(s3, sdxl_worker.handle(job("long-3", head + "in winter snow", prompt_weighting=False)))[
        0
    ]
    assert literal == first  # nothing to weigh: the same embeddings, chunked alike


def test_parentheses_pass_through_with_weighting_off(pipe: Any, encoder: PromptEncoder) -> None:
    literal = encoder.embed("a (red) fox", None, weighting=False, clip_skip=0).embeds
    with torch.inference_mode():
        diffusers_own = pipe.encode_prompt("a (red) fox", device="cpu", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(literal, diffusers_own)  # "(" and ")" are tokens, as diffusers reads them
    weighted = encoder.embed("a (red) fox", None, weighting=True, clip_skip=0).embeds
    assert not torch.allclose(weighted, literal)  # weighting on: (red) is red at 1.1


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_clip_skip_is_diffusers_clip_skip(pipe: Any, clip_skip: int, encoder: PromptEncoder) -> None:
    """As A1111 does, clip skip applies to the negative prompt too (diffusers' SDXL pipeline applies
    it to the prompt only): each is compared with diffusers encoding it as a prompt."""
    ours = encoder.embed("a red fox", "blurry", weighting=True, clip_skip=clip_skip)
    with torch.inference_mode():
        for text, got, got_pooled in (
            ("a red fox", ours.embeds, ours.pooled),
            ("blurry", ours.negative, ours.negative_pooled),
        ):
            embeds, _, pooled, _ = pipe.encode_prompt(
                text, device="cpu", do_classifier_free_guidance=False, clip_skip=clip_skip or None
            )
            torch.testing.assert_close(got, embeds)
            torch.testing.assert_close(got_pooled, pooled)


def test_clip_skips_differ(pipe: Any, encoder: PromptEncoder) -> None:
    skips = [encoder.embed("a red fox", None, weighting=True, clip_skip=n).embeds for n in (0, 1, 2)]
    assert not torch.allclose(skips[0], skips[1]) and not torch.allclose(skips[1], skips[2])


def test_every_chunk_is_the_call_the_cuda_graph_serves(pipe: Any, encoder: PromptEncoder) -> None:
    """Compel's calls reach each encoder as the pipelines' own (1, 77)-ids call, which the graph replays."""
    served: list[int] = []
    masked: list[bool] = []
    routes = []
    for name in ("text_encoder", "text_encoder_2"):
        text_encoder = getattr(pipe, name)
        graphed = GraphedTextEncoder(text_encoder, name)  # its serves(): what a captured graph would take
        graphed.graphs = {False: object(), True: object()}  # type: ignore[dict-item]

        class Counting:
            def serves(self, *args: Any, _g: Any = graphed, **kwargs: Any) -> bool:
                ok = _g.serves(*args, **kwargs)
                served.append(int(ok))
                masked.append("attention_mask" in kwargs)
                return False  # then run eagerly: only the question is under test

        routes.append(route(text_encoder, "forward", Counting()))
    try:
        encoder.embed("a (red:1.3) fox, " * 12, "blurry, low quality-", weighting=True, clip_skip=1)
    finally:
        for each in routes:
            each.undo()
    assert served and all(served)  # several chunks, prompt and negative, both encoders: all servable
    assert masked.count(True) == 2  # the down-weighted "low quality-": a masked chunk per encoder


# ------------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_runs_text_to_image_and_image_to_image_with_exact_steps(
    sdxl_worker: Worker, s3: Any, image_server: ImageServer, allow_loopback: None, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:  # fmt: skip
    """The steps reported are the sampler's steps that ran: one UNet call each (two for heun, a
    second-order sampler, but for its last step), progress reported up to exactly that count."""
    progress: list[int] = []
    monkeypatch.setattr(
        "src.progress.Progress.step", lambda self, done, total, stage="generating": progress.append(done)
    )
    unet = sdxl_worker.families[0].text2img.unet
    calls: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    order = SCHEDULERS[name][0].order
    reference = image_server.add_image(f"/sampler-{name}.png", (512, 512))
    try:
        for job_id, steps, metadata in (
            (f"sampler-{name}", 3, {}),
            (f"sampler-i2i-{name}", 4, {"reference_image_url": reference, "denoise_strength": 0.5}),
        ):
            progress.clear()
            calls.clear()
            payload = job(job_id, scheduler=name, num_inference_steps=steps)
            payload["input"]["metadata"] = metadata
            result = sdxl_worker.handle(payload)
            assert stored(s3, result)[0], result
            meta = result["assets"][0]["metadata"]
            assert (meta["scheduler"], meta["steps"]) == (name, steps)
            assert len(calls) == steps * order - (order - 1)
            assert max(progress) == steps
    finally:
        hook.remove()


def test_a_sampler_never_leaks_into_the_next_job(sdxl_worker: Worker, s3: Any) -> None:
    before = stored(s3, sdxl_worker.handle(job("leak-1")))[0]
    stored(s3, sdxl_worker.handle(job("leak-2", scheduler="euler_a")))
    assert stored(s3, sdxl_worker.handle(job("leak-3")))[0] == before


def test_an_unknown_sampler_names_the_field_and_the_choices(sdxl_worker: Worker) -> None:
    error = sdxl_worker.handle(job("unknown-sampler", scheduler="dpm++ 2m"))["error"]
    assert error.startswith("config.scheduler: Input should be 'euler', 'euler_a', 'dpmpp_2m'")
    assert "'lms_karras'" in error


# ------------------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    ("fmt", "extension", "content_type", "pil_format"),
    [
        ("png", "png", "image/png", "PNG"),
        ("webp", "webp", "image/webp", "WEBP"),
        ("jpeg", "jpg", "image/jpeg", "JPEG"),
    ],
)
def test_output_formats_round_trip(
    sdxl_worker: Worker, s3: Any, fmt: str, extension: str, content_type: str, pil_format: str
) -> None:
    result = sdxl_worker.handle(job(f"format-{fmt}", output_format=fmt, num_images=2, width=640, height=512))
    for index in (0, 1):
        data, got_type = stored(s3, result, index)
        asset = result["assets"][index]
        image = Image.open(io.BytesIO(data))
        assert asset["url"].endswith(f"/{index}.{extension}") and got_type == content_type
        assert image.format == pil_format and image.size == (640, 512)
        assert asset["metadata"]["format"] == fmt and asset["metadata"]["file_size_bytes"] == len(data)
        thumbnail = s3.get_object(Bucket=BUCKET, Key=asset["thumbnail_url"].split("/", 1)[1])
        assert thumbnail["ContentType"] == "image/webp" and asset["thumbnail_url"].endswith(".thumb.webp")


def test_output_quality_changes_the_file(sdxl_worker: Worker, s3: Any) -> None:
    low = stored(s3, sdxl_worker.handle(job("quality-low", output_format="jpeg", output_quality=20)))[0]
    high = stored(s3, sdxl_worker.handle(job("quality-high", output_format="jpeg", output_quality=95)))[0]
    assert len(low) < len(high)


def test_negative_prompt_used_is_reported_for_sdxl(sdxl_worker: Worker) -> None:
    assert sdxl_worker.handle(job("neg-none"))["assets"][0]["metadata"]["negative_prompt_used"] is None
    payload = job("neg-given")
    payload["input"]["negative_prompt"] = "blurry"
    assert sdxl_worker.handle(payload)["assets"][0]["metadata"]["negative_prompt_used"] == "blurry"


# ------------------------------------------------------------------------------------------ Wan


def wan_job(job_id: str, job_type: str = "video_fast", **changes: Any) -> dict[str, Any]:
    config = {"width": 256, "height": 256, "num_inference_steps": 1, "seed": 2}
    if job_type.startswith("video"):
        config["num_frames"] = 5
    body = {"id": job_id, "type": job_type, "prompt": "a paper boat", "user_id": "controls", "config": config}
    return {"id": "rp", "input": {**body, **changes}}


def test_wan_uses_the_wan_teams_negative_prompt_when_none_is_given(
    wan_worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real = WanPipeline.__call__
    monkeypatch.setattr(
        WanPipeline,
        "__call__",
        lambda self, *a, **k: seen.append(k.get("negative_prompt")) or real(self, *a, **k),
    )
    default = wan_worker.handle(wan_job("wan-neg-default"))
    given = wan_worker.handle(wan_job("wan-neg-given", negative_prompt="blurry"))
    turbo = wan_worker.handle(
        wan_job(
            "wan-neg-turbo",
            "video_turbo",
            negative_prompt="blurry",
            config={"num_frames": 5, "width": 256, "height": 256},
        )
    )
    assert seen == [DEFAULT_NEGATIVE_PROMPT, "blurry", None]
    assert default["assets"][0]["metadata"]["negative_prompt_used"] == DEFAULT_NEGATIVE_PROMPT
    assert given["assets"][0]["metadata"]["negative_prompt_used"] == "blurry"
    meta = turbo["assets"][0]["metadata"]
    assert meta["negative_prompt_used"] is None and meta["negative_prompt_ignored"] is True


def test_a_wan_prompt_past_512_tokens_is_cut_with_a_warning(
    wan_worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result = wan_worker.handle(wan_job("wan-long", prompt="boat " * 600))
    assert result["status"] == "completed"
    assert "UMT5 reads the first 512, the rest is cut" in caplog.text


def test_wan_images_take_output_formats_and_videos_refuse_them(wan_worker: Worker, s3: Any) -> None:
    image = wan_worker.handle(
        wan_job("wan-webp", "image_fast", config={"width": 256, "height": 256, "output_format": "webp"})
    )
    data, content_type = stored(s3, image)
    assert content_type == "image/webp" and image["assets"][0]["url"].endswith("/0.webp")
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    video = wan_worker.handle(wan_job("wan-video-format", config={"output_format": "webp", "num_frames": 5}))
    assert video["error"] == "config.output_format: videos are stored as MP4; output_format is for image jobs"
