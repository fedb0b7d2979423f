"""A tiny random-weight Qwen2.5-Instruct (``Qwen2ForCausalLM``) with a byte-level BPE tokenizer and
the ChatML chat template, for tests, the CPU demo and ``MODEL_PROFILE=tiny``.

The output directory has the layout of ``Qwen/Qwen2.5-7B-Instruct`` and loads through
``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained``: the chat template, the special
tokens and the end-of-turn ids are Qwen's, so the plumbing is real; the text the model writes is noise.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from src.prompt.instructions import SYSTEM_PROMPTS, SYSTEM_PROMPTS_FILE

SEED = 0
TINY_INPUTS = (SYSTEM_PROMPTS_FILE,)  # the tokenizer is learnt from the system prompts
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2.5-Instruct's template (ChatML), without its tool-calling branches: a system turn (Qwen's default
# when none is given), the conversation, and the assistant's turn opened when asked.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    *(entry["text"] for entry in SYSTEM_PROMPTS.values()),
    "A cat walks on the grass, realistic style, high quality, detailed.",
    "一只猫在草地上行走，写实风格，高质量。",
]
MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.5,  # greedy noise that varies: at Qwen's 0.02 it repeats one token
)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learnt from ``CORPUS``, with Qwen's special tokens and chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL["max_position_embeddings"],
    )


def build_tiny_prompt(out: Path) -> None:
    """Write the tiny model and its tokenizer to ``out`` (``config.json``, ``model.safetensors``, ...)."""
    tokenizer = qwen_tokenizer()
    end_ids = [tokenizer.convert_tokens_to_ids(token) for token in (IM_END, END_OF_TEXT)]
    torch.manual_seed(SEED)
    config = Qwen2Config(
        **MODEL,
        vocab_size=len(tokenizer),
        bos_token_id=end_ids[1],
        eos_token_id=end_ids[0],
        pad_token_id=end_ids[1],
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=end_ids[1], eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
