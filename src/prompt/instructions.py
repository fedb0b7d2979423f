"""The system prompts of prompt enhancement (``system_prompts.toml``) and which one a job gets."""

from __future__ import annotations

import tomllib
from pathlib import Path

SYSTEM_PROMPTS_FILE = Path(__file__).with_name("system_prompts.toml")
# name -> {"source": where the text comes from, "text": the system prompt}
SYSTEM_PROMPTS: dict[str, dict[str, str]] = tomllib.loads(SYSTEM_PROMPTS_FILE.read_text(encoding="utf-8"))


def has_chinese(text: str) -> bool:
    """Whether ``text`` holds CJK ideographs."""
    return any("\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" for char in text)


def system_prompt_name(family: str, prompt: str) -> str:
    """The system prompt for a job of ``family`` (``sdxl`` or ``wan``) with ``prompt``.

    SDXL: this project's tag-style instruction. Wan: the Wan team's, in the prompt's language: Chinese
    for a prompt with Chinese characters, English otherwise (their reference code takes the language
    as an argument, Chinese by default; a worker has no one to ask).
    """
    if family == "sdxl":
        return "sdxl"
    return "wan_zh" if has_chinese(prompt) else "wan_en"
