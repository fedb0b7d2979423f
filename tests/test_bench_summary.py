"""The benchmark's summary names every fast path that was not serving when the worker was ready,
so that eager figures are not read as the fast path's (a rejected decode-step graph went unseen
for two sessions that way)."""

from __future__ import annotations

import pytest

from bench.figures import print_table, summarise


def test_a_fast_path_not_serving_is_in_the_summary_and_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    rejected = "eager: the CUDA graph's replay disagrees with eager (relative error 0.19)"
    startup = {"fast_paths": {"sdxl-text-encoder": "serving", "prompt-decode": rejected}}
    summary = summarise({"worker": {"startup": startup, "card": "test"}})
    assert summary["fast_paths_not_serving"] == {"prompt-decode": rejected}
    print_table(summary)
    assert f"NOT SERVING, its jobs ran without it: prompt-decode: {rejected}" in capsys.readouterr().out


def test_every_fast_path_serving_adds_nothing() -> None:
    startup = {
        "process_to_ready_s": 9.0,
        "fast_paths": {"sdxl-text-encoder": "serving", "prompt-decode": "serving"},
    }
    assert "fast_paths_not_serving" not in summarise({"cached": {"startup": startup}})
