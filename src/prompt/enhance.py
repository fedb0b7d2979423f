"""Prompt enhancement, the worker's stage between a job's plan and its generation.

A job wants it by its type (the original system's ``*_enhanced`` types: their base type plus
enhancement) or with ``config.enhance_prompt: true``. The ``prompt`` family's LLM rewrites the
prompt under the system prompt for the job's family (``instructions.py``); the plan runs with the
rewrite. An answer that leaves nothing usable, or any failure of the LLM but a GPU fault, runs the
job with its own prompt and says why (``enhance_error``): a job never fails because enhancement did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from src.contract import one_line
from src.faults import is_gpu_fault
from src.prompt.instructions import SYSTEM_PROMPTS, system_prompt_name
from src.timing import Stopwatch

if TYPE_CHECKING:
    from src.prompt.family import PromptFamily

log = logging.getLogger(__name__)

# The original system's enhanced job types -> the job type they run as.
ENHANCED_TYPES = {
    "image7b_fast_enhanced": "image_fast",
    "image7b_high_enhanced": "image_high",
    "video7b_fast_enhanced": "video_fast",
    "video7b_high_enhanced": "video_high",
}


def wants_enhancement(job_type: str, config: Any) -> bool:
    """Whether a job asks for prompt enhancement: an enhanced type, or ``config.enhance_prompt: true``."""
    return job_type in ENHANCED_TYPES or (isinstance(config, dict) and config.get("enhance_prompt") is True)


SENTENCE_ENDS = ".!?。！？"
PHRASE_ENDS = ",;，；、"
QUOTES = "\"'“”‘’「」"


class PromptTooLongError(ValueError):
    """The chat (system prompt and job prompt) does not fit ENHANCE_MAX_INPUT_TOKENS."""


@dataclass(frozen=True)
class Enhancement:
    """A job's prompt before and after enhancement; ``enhanced`` is None when the original is used."""

    original: str
    enhanced: str | None
    seconds: float
    system_prompt: str  # its name in system_prompts.toml
    error: str | None = None

    @property
    def prompt(self) -> str:
        """The prompt the job runs with."""
        return self.enhanced if self.enhanced is not None else self.original

    def job_metadata(self) -> dict[str, Any]:
        """The callback's metadata keys: both prompts, the time taken, and why nothing was used."""
        metadata = {
            "original_prompt": self.original,
            "enhanced_prompt": self.enhanced,
            "enhance_s": round(self.seconds, 3),
            "enhance_system_prompt": self.system_prompt,
        }
        return metadata if self.error is None else {**metadata, "enhance_error": self.error}


def usable_answer(text: str, cut_off: bool) -> str | None:
    """The LLM's answer as a prompt, or None when nothing usable is left.

    Surrounding whitespace and quotes go. An answer cut off at the token limit keeps what ends
    cleanly: its complete sentences, else its complete phrases, else its complete words. Usable:
    some letter or digit remains.
    """
    text = text.strip().strip(QUOTES).strip()
    if cut_off:
        text = _complete_part(text).strip()
    return text if any(char.isalnum() for char in text) else None


def _complete_part(text: str) -> str:
    """``text`` up to its last sentence end, else its last phrase end, else its last space."""
    sentence = max(text.rfind(char) for char in SENTENCE_ENDS)
    if sentence >= 0:
        return text[: sentence + 1]
    phrase = max(text.rfind(char) for char in PHRASE_ENDS)
    if phrase >= 0:
        return text[:phrase]
    space = max((i for i, char in enumerate(text) if char.isspace()), default=0)
    return text[:space]


def enhance(llm: PromptFamily, family: str, prompt: str) -> Enhancement:
    """Rewrite ``prompt`` of a job of ``family`` (``sdxl``, ``wan``); never raises but for GPU faults."""
    name = system_prompt_name(family, prompt)
    watch = Stopwatch()

    def unused(error: str) -> Enhancement:
        log.warning("prompt enhancement: %s; the job runs with its own prompt", error)
        return Enhancement(prompt, None, watch.lap()[1], name, error)

    if not prompt:
        return unused("the job has no prompt to enhance")
    try:
        answer = llm.rewrite(SYSTEM_PROMPTS[name]["text"], prompt)
    except Exception as err:
        if is_gpu_fault(err):
            raise
        return unused(str(err) if isinstance(err, PromptTooLongError) else f"the LLM failed: {one_line(err)}")
    enhanced = usable_answer(answer.text, answer.cut_off)
    if enhanced is None and answer.cut_off:
        return unused(
            f"the LLM's answer was cut off at ENHANCE_MAX_NEW_TOKENS ({answer.tokens}) tokens "
            "before its first complete word"
        )
    if enhanced is None:
        return unused(f"the LLM's answer was empty ({answer.text!r})")
    return Enhancement(prompt, enhanced, watch.lap()[1], name)
