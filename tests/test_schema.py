"""The payload's JSON Schema (docs/job.schema.json) is generated from the models and up to date;
and the one precedence rule for keys accepted in both config and metadata: metadata wins."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from src.contract import parse_request
from src.schema import SCHEMA_PATH, render
from src.sdxl.plan import plan_sdxl
from src.wan.plan import plan_wan

URL_A = "https://example.com/a.png"
URL_B = "https://example.com/b.png"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def test_schema_file_is_what_make_schema_writes() -> None:
    assert SCHEMA_PATH.read_text() == render(), "docs/job.schema.json is stale: run `make schema`"


def _leaves(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every property schema under ``node`` (top level, each family's config and metadata)."""
    found = []
    for name, prop in node.get("properties", {}).items():
        found.append((f"{path}{name}", prop))
    for name, sub in node.get("$defs", {}).items():
        found += _leaves(sub, f"{name}.")
    return found


def test_every_property_is_described(schema: dict[str, Any]) -> None:
    leaves = _leaves(schema)
    names = {name for name, _ in leaves}
    assert {
        "type",
        "config",
        "SdxlConfig.num_images",
        "WanConfig.num_frames",
        "WanMetadata.end_reference_url",
    } <= names
    assert [name for name, prop in leaves if len(prop.get("description", "")) < 10] == []
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "sdxl_image_fast", "user_id": "u", "prompt": "x", "config": {"num_images": 2, "seed": 4}},
        {"type": "video_fast", "user_id": "u", "prompt": "x", "config": {"num_frames": 81, "image": URL_A}},
        {
            "type": "image_high",
            "user_id": "u",
            "prompt": "x",
            "metadata": {"reference_image_url": URL_A, "mine": 1},
        },
    ],
)
def test_valid_payloads_validate(schema: dict[str, Any], payload: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema).validate(payload)
    parse_request({"id": "rp", "input": payload})  # and the worker accepts them too


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"type": "sdxl_image_fast", "user_id": "u", "config": {"num_images": "2"}}, "num_images"),
        ({"type": "sdxl_image_fast", "user_id": "u", "config": {"num_images": 9}}, "num_images"),
        ({"type": "video_fast", "user_id": "u", "config": {"num_frames": 500}}, "num_frames"),
        ({"type": "video_fast", "user_id": "u", "metadata": {"denoise_strength": 2}}, "denoise_strength"),
        ({"type": "sdxl_image_ultra", "user_id": "u"}, "type"),
        ({"type": "video_fast"}, "user_id"),
    ],
)
def test_invalid_payloads_fail_the_schema(
    schema: dict[str, Any], payload: dict[str, Any], where: str
) -> None:
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(payload))
    described = [" ".join([*map(str, error.absolute_path), error.message]) for error in errors]
    assert any(where in text for text in described), described


def _request(job_type: str, config: dict[str, Any], metadata: dict[str, Any]) -> Any:
    payload = {"type": job_type, "user_id": "u", "prompt": "x", "config": config, "metadata": metadata}
    return parse_request({"id": "rp", "input": payload})


def test_metadata_wins_for_denoise_strength() -> None:
    both = ({"denoise_strength": 0.2}, {"denoise_strength": 0.6, "reference_image_url": URL_A})
    assert plan_sdxl(_request("sdxl_image_fast", *both)).denoise_strength == 0.6
    assert plan_wan(_request("video_fast", *both)).denoise_strength == 0.6
    config_only = ({"denoise_strength": 0.2}, {"reference_image_url": URL_A})
    assert plan_sdxl(_request("sdxl_image_fast", *config_only)).denoise_strength == 0.2


def test_metadata_wins_for_exact_copy_mode() -> None:
    metadata = {"reference_image_url": URL_A, "exact_copy_mode": False}
    assert not plan_sdxl(_request("sdxl_image_fast", {"exact_copy_mode": True}, metadata)).exact_copy
    metadata["exact_copy_mode"] = True
    assert plan_sdxl(_request("sdxl_image_fast", {"exact_copy_mode": False}, metadata)).exact_copy


@pytest.mark.parametrize(
    ("config_key", "metadata_key", "mode"),
    [
        ("image", "reference_image_url", "single"),
        ("first_frame", "start_reference_url", "start"),
        ("last_frame", "end_reference_url", "end"),
    ],
)
def test_metadata_wins_for_wan_references(config_key: str, metadata_key: str, mode: str) -> None:
    plan = plan_wan(_request("video_fast", {config_key: URL_A}, {metadata_key: URL_B}))
    assert plan.references[mode].url == URL_B and plan.references[mode].field == f"metadata.{metadata_key}"
    plan = plan_wan(_request("video_fast", {config_key: URL_A}, {}))
    assert plan.references[mode].url == URL_A and plan.references[mode].field == f"config.{config_key}"
