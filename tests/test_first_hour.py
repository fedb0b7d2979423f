"""What a newcomer meets first, through the real entry points: one clear line per mistake, a quiet
console, JSON results, the bucket checked at start, and misspelt keys named with a did-you-mean."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from src.media.storage import S3Storage, build_storage
from src.settings import Settings, StartupError
from src.worker import Worker, start_worker
from tests.conftest import BUCKET, REPO, free_port, list_keys, tiny_settings
from tests.test_harness import handler, job, s3_env, tiny_env, worker_env


def test_test_input_that_is_not_json_fails_before_any_model_loads(tmp_path: Path) -> None:
    bad = '{"input": {"type": "sdxl_image_fast", "prompt": "a boat",}}'  # a trailing comma
    env = tiny_env(LOCAL_STORAGE_DIR=str(tmp_path / "out"), MODELS_DIR=str(tmp_path / "models"))
    result = handler("--test_input", bad, env=env, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "--test_input is not valid JSON: line 1 column 58: Expecting property name enclosed in double quotes"
    ]
    assert not (tmp_path / "models").exists()  # nothing was loaded or built


def test_test_input_given_a_file_name_says_how_to_pass_it(tmp_path: Path) -> None:
    env = tiny_env(LOCAL_STORAGE_DIR=str(tmp_path / "out"), MODELS_DIR=str(tmp_path / "models"))
    result = handler("--test_input", "test_input.json", env=env, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "not a file name" in line and "make run INPUT=test_input.json" in line
    result = handler("--test_input", '["input"]', env=env, timeout=60)
    assert result.returncode == 2 and 'a JSON object with an "input" object' in result.stderr


def test_test_input_prints_the_result_as_json_and_a_quiet_console(tmp_path: Path) -> None:
    result = handler(
        "--test_input", json.dumps(job("quiet-1")), env=tiny_env(LOCAL_STORAGE_DIR=str(tmp_path))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)["output"]  # stdout is the result alone: it pipes into jq
    assert output["assets"][0]["url"] == "workspace-temp/harness/quiet-1/0.png"
    assert (tmp_path / "harness" / "quiet-1" / "0.png").is_file()  # LOCAL_STORAGE_DIR/{user_id}/{job_id}/
    for noise in ("DEBUG", "Loading pipeline components", "[transformers]", "Warning", "Traceback", "%|"):
        assert noise not in result.stderr, noise
    assert '"stage": "completed"' in result.stderr  # the job log is still there


def test_log_level_debug_shows_what_the_default_hides(tmp_path: Path) -> None:
    env = tiny_env(LOCAL_STORAGE_DIR=str(tmp_path), LOG_LEVEL="DEBUG")
    result = handler("--test_input", json.dumps(job("debug-1")), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEBUG  | local_test | Handler output" in result.stderr
    assert json.loads(result.stdout)["output"]["status"] == "completed"


def test_a_failed_test_input_prints_the_error_as_json(tmp_path: Path) -> None:
    result = handler(
        "--test_input", json.dumps(job("bad-1", prompt="")), env=tiny_env(LOCAL_STORAGE_DIR=str(tmp_path))
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "prompt: is required"


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"BUCKET_ACCESS_KEY_ID": "k"}, ["BUCKET_ENDPOINT_URL", "BUCKET_SECRET_ACCESS_KEY"]),
        ({"BUCKET_ENDPOINT_URL": "http://x", "BUCKET_ACCESS_KEY_ID": "k"}, ["BUCKET_SECRET_ACCESS_KEY"]),
    ],
)
def test_a_partly_configured_bucket_names_what_is_missing(given: dict[str, str], missing: list[str]) -> None:
    result = handler(env=worker_env(MODEL_PROFILE="tiny", **given), timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.endswith(f"the bucket is only partly configured: set {' and '.join(missing)} too")
    for name in given:
        assert name not in line.split("set ", 1)[1]


def test_a_missing_bucket_refuses_to_start_in_one_line(s3: Any, s3_endpoint: str, tmp_path: Path) -> None:
    env = {**s3_env(s3_endpoint), "BUCKET_NAME": "no-such-bucket", "MODELS_DIR": str(tmp_path / "models")}
    result = handler(env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"worker cannot start: storage check: bucket 'no-such-bucket' at {s3_endpoint} does not exist; "
        "STORAGE_CHECK=false skips this check"
    ]
    assert not (tmp_path / "models").exists()  # refused before any model loads


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An address that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_an_unreachable_or_silent_endpoint_refuses_to_start(s3_endpoint: str, silent_endpoint: str) -> None:
    refusing = f"http://127.0.0.1:{free_port()}"
    for endpoint in (refusing, silent_endpoint):
        with pytest.raises(StartupError) as refused:
            build_storage(tiny_settings(endpoint, ["sdxl"]))
        message = str(refused.value)
        assert message.startswith(f"storage check: cannot reach bucket '{BUCKET}' at {endpoint} (")
        assert "\n" not in message and message.endswith("STORAGE_CHECK=false skips this check")
    assert isinstance(build_storage(tiny_settings(refusing, ["sdxl"], storage_check=False)), S3Storage)


def test_a_storage_outage_during_a_job_is_one_line_and_one_record(
    sdxl_worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(
        f"http://127.0.0.1:{free_port()}", ["sdxl"], storage_timeout_s=1.0, storage_max_attempts=1
    )
    worker = Worker(settings, S3Storage(settings), sdxl_worker.families)
    with caplog.at_level(logging.INFO):
        result = worker.handle(job("outage-1"))
    assert result["status"] == "failed"
    assert result["error"].startswith("storage: could not store the assets: EndpointConnectionError: ")
    assert "\n" not in result["error"]
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(failures) == 1 and '"stage": "failed"' in failures[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert "could not remove" not in caplog.text


def test_a_misspelt_config_key_runs_and_is_reported(
    sdxl_worker: Worker, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    payload = job("misspelt-1")
    payload["input"]["config"]["num_image"] = 2
    payload["input"]["metadata"] = {"platform_field": "kept"}  # metadata stays open
    with caplog.at_level(logging.WARNING):
        result = sdxl_worker.handle(payload)
    assert result["status"] == "completed" and len(result["assets"]) == 1
    assert result["metadata"]["ignored_keys"] == ["config.num_image"]
    assert "config.num_image: unknown key; did you mean num_images?" in caplog.text
    clean = sdxl_worker.handle(job("misspelt-2"))
    assert "ignored_keys" not in clean["metadata"]


def test_a_misspelt_prompt_is_named_when_the_prompt_is_missing(sdxl_worker: Worker) -> None:
    payload = job("misspelt-3")
    payload["input"]["promt"] = payload["input"].pop("prompt")
    result = sdxl_worker.handle(payload)
    assert result["error"] == "prompt: is required (promt: unknown key; did you mean prompt?)"


def test_strict_payloads_refuse_unknown_keys(sdxl_worker: Worker, s3: Any) -> None:
    settings = sdxl_worker.settings.model_copy(update={"strict_payloads": True})
    strict = Worker(settings, sdxl_worker.storage, sdxl_worker.families)
    payload = job("strict-1")
    payload["input"]["config"]["num_image"] = 2
    assert strict.handle(payload)["error"] == "config.num_image: unknown key; did you mean num_images?"
    payload = job("strict-2")
    payload["input"]["colour"] = "red"
    assert strict.handle(payload)["error"] == "colour: unknown key"
    assert list_keys(s3, "harness/strict-") == []


def test_make_help_lists_every_target() -> None:
    import subprocess

    result = subprocess.run(
        ["make", "--no-print-directory"], cwd=REPO, capture_output=True, text=True, check=True
    )
    listed = {line.split()[1] for line in result.stdout.splitlines()}
    declared = (REPO / "Makefile").read_text().split(".PHONY:", 1)[1].splitlines()[0].split()
    assert listed == set(declared) and all(
        len(line.split(None, 2)) == 3 for line in result.stdout.splitlines()
    )


def test_quick_start_example_payloads_are_valid_jobs() -> None:
    from tests.test_deploy_files import job_input, readme_section

    section = readme_section("Quick start (CPU, no GPU, no downloads)")
    blocks = [
        line for block in re.findall(r"```json\n(.*?)```", section, re.S) for line in block.split("\n{")
    ]
    payloads = [json.loads(text if text.startswith("{") else "{" + text) for text in blocks]
    assert {p["input"]["type"] for p in payloads} == {"sdxl_image_fast", "video_fast"}
    for payload in payloads:
        job_input(payload["input"])


def test_tiny_models_in_an_unwritable_models_dir_stop_the_start_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text(
        ""
    )  # nothing can be made below a file, whoever the user is (the image's: make image-test)
    models = blocker / "models"
    settings = Settings(
        models_dir=models, model_profile="tiny", worker_models=["sdxl"], local_storage_dir=tmp_path
    )
    with pytest.raises(StartupError) as refused:
        start_worker(settings)
    message = str(refused.value)
    assert message.startswith(
        f"MODEL_PROFILE=tiny builds its models under MODELS_DIR/tiny, but {models}/tiny"
    )
    assert "set MODELS_DIR to a writable directory" in message and "\n" not in message


def test_an_unwritable_compile_cache_dir_is_named_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made below a file, whoever the user is
    settings = Settings(compile_cache_dir=blocker / "cache", local_storage_dir=tmp_path)
    problem = settings.compile_cache_problem()
    assert problem is not None and problem.startswith(
        f"COMPILE_CACHE_DIR={blocker / 'cache'} is not writable"
    )
    assert (
        Settings(compile_cache_dir=tmp_path / "cache", local_storage_dir=tmp_path).compile_cache_problem()
        is None
    )
