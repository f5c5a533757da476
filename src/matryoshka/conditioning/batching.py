"""Batching `TextEmbedding`s of different token lengths, and the null (negative-prompt) embedding.

Classifier-free guidance runs the unconditional and conditional rows in one batch:
`concat([null_embedding(encoder, B), encoder.encode(prompts)])`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from matryoshka.conditioning.base import TextEmbedding, TextEncoder


def pad_to_length(embedding: TextEmbedding, length: int) -> TextEmbedding:
    """Pads (with zeros, mask 0) or trims padding columns so that L == `length`.

    Trimming only drops padding: asking for fewer columns than the longest row's real tokens raises.
    """
    current = embedding.length
    if length == current:
        return embedding
    if length < current:
        longest = int(embedding.lengths.max()) if embedding.batch_size else 0
        if length < longest:
            raise ValueError(f"cannot pad to length {length}: a row holds {longest} real tokens")
        return TextEmbedding(
            states=embedding.states[:, :length], mask=embedding.mask[:, :length], pooled=embedding.pooled
        )
    extra = length - current
    states = torch.nn.functional.pad(embedding.states, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(embedding.mask, (0, extra))
    return TextEmbedding(states=states, mask=mask, pooled=embedding.pooled)


def pad_embeddings(embeddings: Sequence[TextEmbedding], length: int | None = None) -> list[TextEmbedding]:
    """Brings every embedding to the same L: `length`, or the largest L among them when None."""
    if not embeddings:
        raise ValueError("pad_embeddings needs at least one TextEmbedding")
    target = max(embedding.length for embedding in embeddings) if length is None else length
    return [pad_to_length(embedding, target) for embedding in embeddings]


def concat(embeddings: Sequence[TextEmbedding], length: int | None = None) -> TextEmbedding:
    """Stacks embeddings along the batch, padding them to a common L first (see `pad_embeddings`)."""
    if not embeddings:
        raise ValueError("concat needs at least one TextEmbedding")
    first = embeddings[0]
    for index, embedding in enumerate(embeddings[1:], start=1):
        if embedding.dim != first.dim:
            raise ValueError(
                f"cannot concat TextEmbeddings of different widths: [0] has D={first.dim}, "
                f"[{index}] has D={embedding.dim} (were they made by different encoders?)"
            )
        if embedding.states.dtype != first.states.dtype or embedding.device != first.device:
            raise ValueError(
                f"cannot concat TextEmbeddings on different dtypes/devices: [0] is "
                f"{first.states.dtype} on {first.device}, [{index}] is {embedding.states.dtype} "
                f"on {embedding.device}; call .to(...) first"
            )
    padded = pad_embeddings(embeddings, length)
    return TextEmbedding(
        states=torch.cat([embedding.states for embedding in padded]),
        mask=torch.cat([embedding.mask.long() for embedding in padded]),
        pooled=torch.cat([embedding.pooled for embedding in padded]),
    )


def null_embedding(encoder: TextEncoder, batch: int, prompt: str = "") -> TextEmbedding:
    """The encoding of `prompt` ("" = the default negative prompt) repeated for `batch` rows."""
    if batch < 1:
        raise ValueError(f"null_embedding needs batch >= 1; got {batch}")
    return encoder.encode([prompt]).repeat(batch)
