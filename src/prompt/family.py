"""The ``prompt`` family: a local instruct LLM (Qwen2.5-7B-Instruct by default, MODELS_DIR/prompt)
that rewrites job prompts. It serves no job type itself: the worker asks it before a job's
generation when the job wants enhancement (``src/prompt/enhance.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from src.fast_path import FastPaths
from src.models import device_map_kwargs, family_dir_names, model_dirs
from src.prompt.decode import GraphedDecodeStep, GreedyDecoder
from src.prompt.enhance import PromptTooLongError
from src.settings import Settings
from src.timing import Phases

log = logging.getLogger(__name__)

HINT = {
    "prompt": "the prompt family's LLM is baked into prompt/ by the builder (families prompt, PROMPT_MODEL)"
}


@dataclass(frozen=True)
class Rewrite:
    """What the LLM wrote: its text, its length in tokens, and whether it was cut off at the limit."""

    text: str
    tokens: int
    cut_off: bool


class PromptFamily:
    """The LLM, its tokenizer (with its chat template) and its greedy decoder."""

    name = "prompt"
    job_types: frozenset[str] = frozenset()  # enhanced job types run on the sdxl and wan families

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, settings: Settings
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.decoder = GreedyDecoder(
            model, settings.enhance_max_input_tokens, settings.enhance_max_new_tokens
        )
        on_cuda = model.device.type == "cuda" and settings.cuda_graphs
        self.fast_paths = FastPaths([GraphedDecodeStep(self.decoder)] if on_cuda else [])

    @classmethod
    def load(cls, settings: Settings) -> PromptFamily:
        """Load the tokenizer and the model (bf16 on CUDA, fp32 on CPU) from MODELS_DIR/prompt."""
        from src.prompt.tiny import build_tiny_prompt

        names = family_dir_names("prompt", settings)
        (path,) = model_dirs(settings, names, build_tiny_prompt, HINT, marker="config.json")
        device = settings.torch_device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        log.info("loading the prompt LLM from %s on %s (%s)", path, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **device_map_kwargs(device))
        return cls(tokenizer, model.to(device).eval(), settings)

    def warm_up(self, phases: Phases) -> None:
        """Capture the decode step (CUDA) and rewrite one prompt, so the first job pays no first call."""
        self.fast_paths.prepare(phases)
        with phases.phase("rewrite"):
            self.decoder(self.chat_ids("Rewrite the prompt.", "a cat"), limit=8)

    def chat_ids(self, system_prompt: str, prompt: str) -> torch.Tensor:
        """The chat (system turn, user turn, assistant turn opened) as ``(1, n)`` token ids."""
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        return ids.to(self.model.device)

    def rewrite(self, system_prompt: str, prompt: str, stop_at_end: bool = True) -> Rewrite:
        """The model's answer to ``prompt`` under ``system_prompt``, decoded greedily.

        Raises PromptTooLongError when the chat exceeds ENHANCE_MAX_INPUT_TOKENS.
        """
        ids = self.chat_ids(system_prompt, prompt)
        if ids.shape[1] > self.decoder.max_input_tokens:
            raise PromptTooLongError(
                f"the prompt is too long to enhance: {ids.shape[1]} tokens with the system prompt, "
                f"ENHANCE_MAX_INPUT_TOKENS is {self.decoder.max_input_tokens}"
            )
        decoded = self.decoder(ids, stop_at_end)
        text = self.tokenizer.decode(decoded.ids, skip_special_tokens=True)
        return Rewrite(text, len(decoded.ids), decoded.cut_off)
