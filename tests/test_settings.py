"""Settings from the environment: empty values mean unset, storage must be unambiguous."""

from __future__ import annotations

import pytest

from src.settings import StartupError, load_settings

BUCKET = {
    "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9",
    "BUCKET_ACCESS_KEY_ID": "k",
    "BUCKET_SECRET_ACCESS_KEY": "s",
}


def with_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in ("LOCAL_STORAGE_DIR", "WORKER_MODELS", "MODELS_DIR", *BUCKET):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_empty_values_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank form field (RunPod Hub, templates) must not count as a setting."""
    with_env(monkeypatch, LOCAL_STORAGE_DIR="", WORKER_MODELS="", **BUCKET)
    settings = load_settings()
    assert settings.local_storage_dir is None and settings.worker_models == ["sdxl", "wan"]


def test_both_storage_backends_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with_env(monkeypatch, LOCAL_STORAGE_DIR=str(tmp_path), **BUCKET)
    with pytest.raises(
        StartupError, match="set either LOCAL_STORAGE_DIR or the BUCKET_\\* variables, not both"
    ):
        load_settings()


def test_worker_models_are_parsed_and_deduplicated(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with_env(monkeypatch, LOCAL_STORAGE_DIR=str(tmp_path), WORKER_MODELS=" Wan , sdxl,wan ")
    assert load_settings().worker_models == ["wan", "sdxl"]
