"""Compel's weighted embedding of a prompt, with the prompt and its masked copies encoded at once.

Compel down-weights a fragment (weight below 1) by encoding the prompt again with the fragment's
tokens masked and blending toward that embedding (``DownweightMode.MASK`` of
``EmbeddingsProvider.get_embeddings_for_weighted_prompt_fragments``): one encoder call after
another, each with its own round trips between host and GPU (token tensors built on the GPU and
read back, a check of the weights on each output). Here Compel's own helpers build the prompt's
tokens, weights and masks on the host, the prompt and all its masked copies go to the encoder in
one call (which the CUDA-graphed encoders replay two rows at a time: ``MASKED_ROWS``), and the
weighting and blend are Compel's formulas on the batch. Prompts past one 77-token chunk, and
anything else this does not cover, take Compel's own path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from compel.embeddings_provider import (
    DownweightMode,
    EmbeddingsProvider,
    ReturnedEmbeddingsType,
    SplitLongTextMode,
)

_MIN_WEIGHT = 1e-5  # Compel's epsilon: a weight of 0 blends with tan() of just under pi/2


def batched(provider: EmbeddingsProvider) -> Callable[..., Any]:
    """``provider.get_embeddings_for_weighted_prompt_fragments``, same arguments and results,
    encoding a one-chunk prompt and its masked copies in one call."""
    compels = provider.get_embeddings_for_weighted_prompt_fragments

    def embed(
        text_batch: list[list[str]],
        fragment_weights_batch: list[list[float]],
        should_return_tokens: bool = False,
        device: Any = "cpu",
    ) -> Any:
        rows = _rows(provider, text_batch, fragment_weights_batch)
        if rows is None:
            return compels(text_batch, fragment_weights_batch, should_return_tokens, device)
        tokens, token_weights, masks, blend = rows
        ids = tokens.expand(len(masks), -1).to(device, non_blocking=True)
        all_seen = len(masks) == 1 and bool(masks[0].all())
        mask = None if all_seen else torch.stack(masks).to(device, non_blocking=True)
        z = provider._encode_token_ids_to_embeddings(ids, mask)  # (rows, 77, dim)
        if provider.bypass_when_no_weights and bool((token_weights == 1).all()):
            weighted = z
        else:  # Compel's build_weighted_embedding_tensor, on every row at once
            identity = (
                token_weights == 1
                if provider.bypass_when_no_weights
                else torch.zeros_like(token_weights, dtype=torch.bool)
            )
            expanded = token_weights.reshape(-1, 1).to(device, non_blocking=True).expand(z.shape)
            empty = provider.empty_z.to(device)
            weighted = torch.where(
                identity.reshape(-1, 1).to(device, non_blocking=True).expand(z.shape),
                z,
                empty + (z - empty) * expanded,
            )
        blended = provider.apply_embedding_weights(weighted.unsqueeze(0), blend, normalize=True).squeeze(0)
        embeddings = blended.unsqueeze(0).to(provider.text_encoder.device, dtype=provider.text_encoder.dtype)
        if should_return_tokens:
            return embeddings, tokens.unsqueeze(0).to(device, non_blocking=True)
        return embeddings

    return embed


def _rows(
    provider: EmbeddingsProvider, text_batch: list[list[str]], fragment_weights_batch: list[list[float]]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[float]] | None:
    """A one-chunk prompt's tokens, per-token weights, the masks of the prompt and of each copy
    without a down-weighted fragment, and each row's blend weight, as Compel builds them (on the
    host); None where Compel's own path applies."""
    if (
        len(text_batch) != 1
        or len(fragment_weights_batch) != 1
        or provider.downweight_mode != DownweightMode.MASK
        or provider.returned_embeddings_type == ReturnedEmbeddingsType.POOLED
        or SplitLongTextMode.MERGE_CLS_TOKENS in provider.split_long_text_mode
    ):
        return None
    fragments, weights = text_batch[0], fragment_weights_batch[0]
    tokens, token_weights, mask = provider.get_token_ids_and_expand_weights(fragments, weights, device="cpu")
    chunk = provider.max_token_count
    if len(tokens) != chunk:
        return None
    masks, blend = [mask], [1.0]
    for (start, end), weight in zip(
        provider._get_token_ranges_for_fragments(tokens.tolist(), fragments), weights, strict=False
    ):
        if weight >= 1:
            continue
        if start is None:  # an empty fragment: Compel's own path (and its error)
            return None
        without = mask.clone()
        without[start : end + 1] = 0
        if not provider.truncate_to_model_max_length:  # the chunk's bos and eos stay
            without[0::chunk] = 1
            without[chunk - 1 :: chunk] = 1
        masks.append(without)
        blend.append(math.tan((1.0 - max(_MIN_WEIGHT, weight)) * math.pi / 2))
    return tokens, token_weights, masks, blend
