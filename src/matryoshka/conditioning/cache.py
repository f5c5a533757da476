"""A directory of precomputed text embeddings, one safetensors file per (encoder, prompt).

Encoding captions with a large T5 costs more than a small diffusion step, so datasets encode their
captions once (`precompute`) and training reads them back (`EmbeddingCache.get_or_compute`, which only
runs the encoder on misses, or `lookup`, which needs no encoder at all).

Layout: `<dir>/<key[:2]>/<key>.safetensors` where key = sha256 of (encoder id, prompt) and the encoder
id is `f"{encoder.name}@{encoder.max_length}"` (e.g. "t5:google/flan-t5-xl@128", "minilm@128"), since
the truncation length changes the states (the compute dtype is not part of it: a bf16 and an fp32 run
of one encoder share entries). A file holds "states" (n, D) trimmed to the prompt's n real
tokens and "pooled" (D,), with the encoder id and the prompt in its metadata (checked on read). The
mask is rebuilt on load, so rows of different lengths pad correctly into one batch. Writes go to a
temporary file in the same folder, then renamed (`matryoshka.atomic`): a reader never sees half a file, and several
processes may fill one cache at once.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from matryoshka.atomic import atomic_write_bytes
from matryoshka.conditioning.base import TextEmbedding, TextEncoder, check_prompts
from matryoshka.conditioning.batching import concat

FORMAT = "matryoshka-text-embedding/1"


def encoder_cache_id(encoder: TextEncoder) -> str:
    """The identity cached embeddings are filed under: "<encoder.name>@<encoder.max_length>"."""
    return f"{encoder.name}@{encoder.max_length}"


def cache_key(encoder_id: str, prompt: str) -> str:
    """sha256 hex digest of (encoder id, prompt), unambiguous for any characters in either."""
    return hashlib.sha256(json.dumps([encoder_id, prompt]).encode("utf-8")).hexdigest()


def trim_row(embedding: TextEmbedding, row: int) -> TextEmbedding:
    """Row `row` of a batch as a (1, n, D) embedding holding only its n real tokens."""
    count = int(embedding.mask[row].long().sum())
    return TextEmbedding(
        states=embedding.states[row : row + 1, :count],
        mask=embedding.mask[row : row + 1, :count].long(),
        pooled=embedding.pooled[row : row + 1],
    )


@dataclass(frozen=True)
class PrecomputeStats:
    """What `precompute` did: prompts seen, embeddings computed, prompts found cached (or repeated)."""

    seen: int
    computed: int
    cached: int


class EmbeddingCache:
    """Precomputed `TextEmbedding` rows stored under `directory`.

    Args:
        directory: created if missing.
        storage_dtype: dtype of the stored float tensors (e.g. torch.bfloat16 halves the disk of a
            T5-XL cache); None stores them as the encoder returns them (float32), bit for bit.
    """

    def __init__(self, directory: str | Path, storage_dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"embedding cache path {str(self.directory)!r} is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        if storage_dtype is not None and not storage_dtype.is_floating_point:
            raise ValueError(f"storage_dtype must be a float dtype; got {storage_dtype}")
        self.storage_dtype = storage_dtype

    def path_for(self, encoder_id: str, prompt: str) -> Path:
        key = cache_key(encoder_id, prompt)
        return self.directory / key[:2] / f"{key}.safetensors"

    def contains(self, encoder_id: str, prompt: str) -> bool:
        return self.path_for(encoder_id, prompt).is_file()

    def read(self, encoder_id: str, prompt: str) -> TextEmbedding | None:
        """The stored (1, n, D) row, or None when absent or unreadable (a warning names the file)."""
        path = self.path_for(encoder_id, prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as error:
            warnings.warn(f"ignoring unreadable embedding cache file {path}: {error}", stacklevel=2)
            return None
        if (
            metadata.get("format") != FORMAT
            or metadata.get("encoder") != encoder_id
            or metadata.get("prompt") != prompt
            or "states" not in tensors
            or "pooled" not in tensors
        ):
            warnings.warn(f"ignoring embedding cache file {path}: it holds a different entry", stacklevel=2)
            return None
        states = tensors["states"].unsqueeze(0)
        mask = torch.ones(states.shape[:2], dtype=torch.long)
        return TextEmbedding(states=states, mask=mask, pooled=tensors["pooled"].unsqueeze(0))

    def write(self, encoder_id: str, prompt: str, row: TextEmbedding) -> TextEmbedding:
        """Stores a (1, n, D) row of real tokens atomically; returns it as it will read back."""
        if row.batch_size != 1 or not bool(row.mask.bool().all()):
            raise ValueError("EmbeddingCache.write takes one row holding real tokens only; use trim_row")
        states = row.states[0].detach().to("cpu", self.storage_dtype).contiguous()
        pooled = row.pooled[0].detach().to("cpu", self.storage_dtype).contiguous()
        payload = save(
            {"states": states, "pooled": pooled},
            metadata={"format": FORMAT, "encoder": encoder_id, "prompt": prompt},
        )
        atomic_write_bytes(self.path_for(encoder_id, prompt), payload)
        mask = torch.ones((1, states.shape[0]), dtype=torch.long)
        return TextEmbedding(states=states.unsqueeze(0), mask=mask, pooled=pooled.unsqueeze(0))

    def lookup(self, prompts: list[str], encoder_id: str, length: int | None = None) -> TextEmbedding:
        """The cached embeddings of `prompts` (on CPU) without an encoder; KeyError names the misses."""
        prompts = check_prompts(prompts)
        rows = {prompt: self.read(encoder_id, prompt) for prompt in dict.fromkeys(prompts)}
        missing = [prompt for prompt, row in rows.items() if row is None]
        if missing:
            raise KeyError(
                f"{len(missing)} prompt(s) not in the embedding cache {str(self.directory)!r} for encoder "
                f"{encoder_id!r}, e.g. {missing[0]!r}; run precompute first"
            )
        return concat([rows[prompt] for prompt in prompts], length=length)

    def get_or_compute(
        self,
        prompts: list[str],
        encoder: TextEncoder,
        length: int | None = None,
        batch_size: int = 64,
    ) -> TextEmbedding:
        """Embeddings of `prompts` on `encoder.device`, padded to the longest prompt (or `length`).

        Only the prompts missing from the cache are encoded (each distinct one once, `batch_size` at
        a time), and stored before returning.
        """
        prompts = check_prompts(prompts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        encoder_id = encoder_cache_id(encoder)
        rows = {prompt: self.read(encoder_id, prompt) for prompt in dict.fromkeys(prompts)}
        missing = [prompt for prompt, row in rows.items() if row is None]
        for chunk in _chunks(missing, batch_size):
            rows.update(self._encode_and_store(chunk, encoder, encoder_id))
        batch = concat([rows[prompt] for prompt in prompts], length=length)
        return batch.to(encoder.device)

    def precompute(
        self,
        prompts: Iterable[str],
        encoder: TextEncoder,
        batch_size: int = 64,
        progress: bool = True,
    ) -> PrecomputeStats:
        """Encodes and stores every prompt not cached yet, streaming `prompts` `batch_size` at a time."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        encoder_id = encoder_cache_id(encoder)
        total = len(prompts) if hasattr(prompts, "__len__") else None
        seen = computed = 0
        pending: dict[str, None] = {}
        with tqdm(total=total, desc="text embeddings", unit="prompt", disable=not progress) as bar:
            for prompt in prompts:
                if not isinstance(prompt, str):
                    raise TypeError(f"prompt #{seen} must be a str; got {type(prompt).__name__}")
                seen += 1
                if prompt not in pending and not self.contains(encoder_id, prompt):
                    pending[prompt] = None
                if len(pending) == batch_size:
                    computed += len(self._encode_and_store(list(pending), encoder, encoder_id))
                    pending.clear()
                bar.update(1)
            if pending:
                computed += len(self._encode_and_store(list(pending), encoder, encoder_id))
        return PrecomputeStats(seen=seen, computed=computed, cached=seen - computed)

    def _encode_and_store(
        self, prompts: list[str], encoder: TextEncoder, encoder_id: str
    ) -> dict[str, TextEmbedding]:
        embedding = encoder.encode(prompts)
        return {
            prompt: self.write(encoder_id, prompt, trim_row(embedding, index))
            for index, prompt in enumerate(prompts)
        }


def precompute(
    prompts: Iterable[str],
    encoder: TextEncoder,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    storage_dtype: torch.dtype | None = None,
) -> PrecomputeStats:
    """Fills the embedding cache at `cache_dir` with the embeddings of a dataset's captions."""
    cache = EmbeddingCache(cache_dir, storage_dtype=storage_dtype)
    return cache.precompute(prompts, encoder, batch_size=batch_size, progress=progress)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
