"""The corpus of hostile and broken job inputs: (name, RunPod job input, expected error prefix).

URLs may contain ``{srv}``: the test's reference server (which plays a public host).
"""

from __future__ import annotations

from typing import Any

SRV = "{srv}"
NAN, INF = float("nan"), float("inf")


def sdxl(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "sdxl_image_fast",
        "prompt": "a red kite",
        "user_id": "corpus",
        "config": {"width": 512, "height": 512, "num_inference_steps": 1},
        "metadata": {},
    }
    return _apply(payload, changes)


def wan(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "video_fast",
        "prompt": "a red kite",
        "user_id": "corpus",
        "config": {"width": 256, "height": 256, "num_frames": 5, "num_inference_steps": 1},
        "metadata": {},
    }
    return _apply(payload, changes)


def _apply(payload: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``config__x=1`` sets ``payload["config"]["x"]``; a value of ``...`` removes the key."""
    for key, value in changes.items():
        target, name = (payload[key.split("__")[0]], key.split("__")[1]) if "__" in key else (payload, key)
        if value is ...:
            target.pop(name, None)
        else:
            target[name] = value
    return payload


def ref(url: str, **changes: Any) -> dict[str, Any]:
    return sdxl(metadata={"reference_image_url": url}, **changes)


CORPUS: list[tuple[str, Any, str]] = [
    # wrong types and shapes
    ("input-string", "make me a picture", "input: must be a JSON object"),
    ("input-list", [sdxl()], "input: must be a JSON object"),
    ("input-null", None, "input: must be a JSON object"),
    ("config-list", sdxl(config=[1, 2]), "config: must be a JSON object"),
    ("metadata-string", sdxl(metadata="reference"), "metadata: must be a JSON object"),
    ("prompt-number", sdxl(prompt=42), "prompt: Input should be a valid string"),
    ("negative-list", sdxl(negative_prompt=["ugly"]), "negative_prompt: "),
    ("user-number", sdxl(user_id=123), "user_id: "),
    ("type-number", sdxl(type=1), "type: "),
    ("images-string", sdxl(config__num_images="3"), "config.num_images: "),
    ("images-bool", sdxl(config__num_images=True), "config.num_images: "),
    ("steps-float", sdxl(config__num_inference_steps=2.5), "config.num_inference_steps: "),
    ("seed-string", sdxl(config__seed="42"), "config.seed: "),
    ("guidance-string", sdxl(config__guidance_scale="high"), "config.guidance_scale: "),
    ("width-string", sdxl(config__width="512"), "config.width: "),
    ("resolution-number", sdxl(config={"resolution": 1024}), "config.resolution: "),
    (
        "exact-copy-string",
        ref(f"{SRV}/ok.png", metadata__exact_copy_mode="yes"),
        "metadata.exact_copy_mode: ",
    ),
    ("denoise-string", ref(f"{SRV}/ok.png", metadata__denoise_strength="0.5"), "metadata.denoise_strength: "),
    ("reference-number", sdxl(metadata={"reference_image_url": 42}), "metadata.reference_image_url: "),
    ("frames-string", wan(config__num_frames="81"), "config.num_frames: "),
    # missing fields
    ("no-type", sdxl(type=...), "type: Field required"),
    ("no-user", sdxl(user_id=...), "user_id: Field required"),
    ("no-prompt-sdxl", sdxl(prompt=...), "prompt: is required"),
    ("no-prompt-wan", wan(prompt=...), "prompt: is required"),
    ("blank-prompt", sdxl(prompt=" \n\t "), "prompt: is required"),
    # unknown job types
    ("type-empty", sdxl(type=""), "type: "),
    ("type-case", sdxl(type="SDXL_IMAGE_FAST"), "type: unknown job type 'SDXL_IMAGE_FAST'"),
    ("type-unknown", sdxl(type="video_ultra"), "type: unknown job type 'video_ultra'"),
    ("type-space", sdxl(type="sdxl_image_fast "), "type: unknown job type"),
    # out-of-range numbers
    ("steps-zero", sdxl(config__num_inference_steps=0), "config.num_inference_steps: "),
    ("steps-huge", sdxl(config__num_inference_steps=151), "config.num_inference_steps: "),
    ("guidance-negative", sdxl(config__guidance_scale=-1), "config.guidance_scale: "),
    ("guidance-huge", sdxl(config__guidance_scale=31), "config.guidance_scale: "),
    ("images-zero", sdxl(config__num_images=0), "config.num_images: "),
    ("images-nine", sdxl(config__num_images=9), "config.num_images: "),
    ("images-million", sdxl(config__num_images=1_000_000), "config.num_images: "),
    ("seed-negative", sdxl(config__seed=-1), "config.seed: "),
    ("seed-too-big", sdxl(config__seed=2**32), "config.seed: "),
    ("seed-bignum", sdxl(config__seed=2**70), "config.seed: "),
    ("size-memory", sdxl(config={"width": 8192, "height": 8192}), "config.width: "),
    ("resolution-huge", sdxl(config={"resolution": "100000x100000"}), "config.resolution: "),
    ("resolution-range", sdxl(config={"resolution": "99992x99992"}), "config.resolution: "),
    ("width-odd", sdxl(config__width=513), "config.width: "),
    ("width-alone", sdxl(config={"width": 512}), "config.height: "),
    ("denoise-high", ref(f"{SRV}/ok.png", metadata__denoise_strength=1.5), "metadata.denoise_strength: "),
    (
        "denoise-negative",
        ref(f"{SRV}/ok.png", metadata__denoise_strength=-0.1),
        "metadata.denoise_strength: ",
    ),
    (
        "legacy-strength-high",
        ref(f"{SRV}/ok.png", metadata__reference_strength=2),
        "metadata.reference_strength: ",
    ),
    ("exact-copy-no-reference", sdxl(metadata={"exact_copy_mode": True}), "metadata.exact_copy_mode: "),
    ("frames-zero", wan(config__num_frames=0), "config.num_frames: "),
    ("frames-two", wan(config__num_frames=2), "config.num_frames: "),
    ("frames-huge", wan(config__num_frames=100_000), "config.num_frames: "),
    (
        "duration-zero",
        wan(config={"width": 256, "height": 256, "duration_seconds": 0}),
        "config.duration_seconds: ",
    ),
    (
        "duration-huge",
        wan(config={"width": 256, "height": 256, "duration_seconds": 1e9}),
        "config.duration_seconds: ",
    ),
    ("frames-and-duration", wan(config__duration_seconds=1.0), "config.duration_seconds: "),
    ("wan-area-memory", wan(config__width=1280, config__height=1280), "config.width: "),
    ("wan-width-odd", wan(config__width=250), "config.width: "),
    ("wan-image-frames", wan(type="image_fast"), "config.num_frames: "),
    (
        "wan-image-start",
        wan(
            type="image_fast",
            config={"width": 256, "height": 256},
            metadata={"start_reference_url": f"{SRV}/ok.png"},
        ),
        "metadata.start_reference_url: ",
    ),
    (
        "wan-single-and-start",
        wan(config__image=f"{SRV}/ok.png", metadata={"start_reference_url": f"{SRV}/ok.png"}),
        "config.image: ",
    ),
    # NaN and infinity
    ("guidance-nan", sdxl(config__guidance_scale=NAN), "config.guidance_scale: "),
    ("guidance-inf", sdxl(config__guidance_scale=INF), "config.guidance_scale: "),
    ("denoise-neg-inf", ref(f"{SRV}/ok.png", metadata__denoise_strength=-INF), "metadata.denoise_strength: "),
    (
        "duration-nan",
        wan(config={"width": 256, "height": 256, "duration_seconds": NAN}),
        "config.duration_seconds: ",
    ),
    # huge prompts
    ("prompt-10k", sdxl(prompt="x" * 10_001), "prompt: "),
    ("prompt-1mb", sdxl(prompt="y" * 1_000_000), "prompt: "),
    ("negative-1mb", sdxl(negative_prompt="z" * 1_000_000), "negative_prompt: "),
    # ids that would escape or break storage keys
    ("user-slash", sdxl(user_id="a/b"), "user_id: "),
    ("user-dotdot", sdxl(user_id=".."), "user_id: "),
    ("user-traversal", sdxl(user_id="../../etc"), "user_id: "),
    ("user-unicode", sdxl(user_id="ü"), "user_id: "),
    ("user-empty", sdxl(user_id=""), "user_id: "),
    ("user-space", sdxl(user_id=" "), "user_id: "),
    ("user-long", sdxl(user_id="a" * 129), "user_id: "),
    ("id-slash", sdxl(id="job/1"), "id: "),
    ("id-dotdot", sdxl(id=".."), "id: "),
    ("id-nul", sdxl(id="job\x00"), "id: "),
    ("id-unicode", sdxl(id="日本"), "id: "),
    ("id-newline", sdxl(id="job\n1"), "id: "),
    # reference URLs that must never be fetched
    ("ref-private-10", ref("http://10.0.0.1/a.png"), "metadata.reference_image_url: refused"),
    ("ref-private-192", ref("http://192.168.1.1/a.png"), "metadata.reference_image_url: refused"),
    ("ref-loopback", ref("http://127.0.0.2/a.png"), "metadata.reference_image_url: refused"),
    ("ref-loopback-v6", ref("http://[::1]/a.png"), "metadata.reference_image_url: refused"),
    (
        "ref-metadata",
        ref("http://169.254.169.254/latest/meta-data/"),
        "metadata.reference_image_url: refused",
    ),
    ("ref-cgnat", ref("http://100.64.0.1/a.png"), "metadata.reference_image_url: refused"),
    ("ref-unspecified", ref("http://0.0.0.0/a.png"), "metadata.reference_image_url: refused"),
    ("ref-file", ref("file:///etc/passwd"), "metadata.reference_image_url: refused"),
    ("ref-ftp", ref("ftp://example.com/a.png"), "metadata.reference_image_url: refused"),
    ("ref-data-uri", ref("data:image/png;base64,iVBORw0KGgo="), "metadata.reference_image_url: refused"),
    ("ref-not-url", ref("not a url"), "metadata.reference_image_url: refused"),
    ("ref-redirect-private", ref(f"{SRV}/redirect-private"), "metadata.reference_image_url: refused"),
    ("ref-redirect-metadata", ref(f"{SRV}/redirect-metadata"), "metadata.reference_image_url: refused"),
    ("ref-redirect-file", ref(f"{SRV}/redirect-file"), "metadata.reference_image_url: refused"),
    ("ref-redirect-loop", ref(f"{SRV}/redirect-loop"), "metadata.reference_image_url: refused"),
    (
        "wan-start-private",
        wan(metadata={"start_reference_url": "http://10.1.2.3/a.png"}),
        "metadata.start_reference_url: refused",
    ),
    ("wan-image-metadata-ip", wan(config__image="http://169.254.169.254/a.png"), "config.image: refused"),
    ("wan-end-file", wan(config__last_frame="file:///etc/shadow"), "config.last_frame: refused"),
    # hostile or broken servers and files
    (
        "ref-slow-server",
        ref(f"{SRV}/slow.png"),
        "metadata.reference_image_url: reference download took longer",
    ),
    (
        "ref-100mb-declared",
        ref(f"{SRV}/huge-declared.png"),
        "metadata.reference_image_url: reference image is larger",
    ),
    (
        "ref-100mb-chunked",
        ref(f"{SRV}/huge-chunked.png"),
        "metadata.reference_image_url: reference image is larger",
    ),
    (
        "ref-http-500",
        ref(f"{SRV}/error-500"),
        "metadata.reference_image_url: could not fetch the reference image: HTTP 500",
    ),
    (
        "ref-http-404",
        ref(f"{SRV}/missing.png"),
        "metadata.reference_image_url: could not fetch the reference image: HTTP 404",
    ),
    ("ref-text", ref(f"{SRV}/text.txt"), "metadata.reference_image_url: reference is not a readable image"),
    ("ref-html", ref(f"{SRV}/page.html"), "metadata.reference_image_url: reference is not a readable image"),
    ("ref-empty", ref(f"{SRV}/empty.png"), "metadata.reference_image_url: reference is not a readable image"),
    (
        "ref-truncated-png",
        ref(f"{SRV}/truncated.png"),
        "metadata.reference_image_url: reference is not a readable image",
    ),
    (
        "ref-truncated-jpeg",
        ref(f"{SRV}/truncated.jpg"),
        "metadata.reference_image_url: reference is not a readable image",
    ),
    (
        "ref-bomb",
        ref(f"{SRV}/bomb.png"),
        "metadata.reference_image_url: reference image has more than 40000000 pixels",
    ),
    (
        "ref-too-many-pixels",
        ref(f"{SRV}/big.png"),
        "metadata.reference_image_url: reference image has 8000x6000 pixels",
    ),
    ("ref-unreachable", ref("http://127.0.0.1:9/a.png"), "metadata.reference_image_url: could not fetch"),
    (
        "wan-end-truncated",
        wan(metadata={"end_reference_url": f"{SRV}/truncated.png"}),
        "metadata.end_reference_url: reference is not a readable image",
    ),
]
