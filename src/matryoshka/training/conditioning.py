"""The conditioning inputs of a training batch: class labels and/or encoded captions, with dropout.

Dropped samples (for classifier-free guidance) get the null label (index num_classes) and the
caption "", i.e. the unconditional text embedding that sampling uses as its negative prompt.
Text encoders are frozen: captions are encoded without gradients, optionally through an
EmbeddingCache directory so that each caption is encoded only once per run (and across runs).
"""

from __future__ import annotations

import torch

from matryoshka.model_dir import MDMConfig


class BatchConditioner:
    """Turns a batch's labels and captions into the model's keyword arguments."""

    def __init__(self, mdm: MDMConfig, device: torch.device, embedding_cache: str | None = None) -> None:
        self.num_classes = mdm.model.num_classes
        self.device = device
        self.encoder = None
        self.cache = None
        if mdm.text_encoder is not None:
            from matryoshka.conditioning import EmbeddingCache, load_text_encoder

            self.encoder = load_text_encoder(mdm.text_encoder).to(device)
            if self.encoder.dim != mdm.model.text_dim:
                raise ValueError(
                    f"text encoder {mdm.text_encoder!r} gives {self.encoder.dim}-d states but mdm.model.text_dim "
                    f"is {mdm.model.text_dim}"
                )
            if embedding_cache is not None:
                self.cache = EmbeddingCache(embedding_cache)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.encoder is not None

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (states (B, L, D) float, mask (B, L) long) on the device, without gradients."""
        assert self.encoder is not None
        with torch.no_grad():
            if self.cache is not None:
                embedding = self.cache.get_or_compute(captions, self.encoder)
            else:
                embedding = self.encoder.encode(captions)
        return embedding.states.to(self.device).float(), embedding.mask.to(self.device)

    def __call__(self, labels: torch.Tensor, captions: list[str], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """labels (B,) long with -1 = unlabelled, captions B strings, drop (B,) bool -> model kwargs."""
        kwargs: dict[str, torch.Tensor] = {}
        # Checks and caption choices read the host copies: reading device tensors would wait for the GPU.
        drop_host = drop.cpu()
        drop = drop.to(self.device, non_blocking=True)
        if self.num_classes > 0:
            if int(labels.max()) >= self.num_classes:
                raise ValueError(
                    f"a batch holds label {int(labels.max())} but the model has num_classes = {self.num_classes}"
                )
            labels = labels.to(self.device, non_blocking=True)
            null = torch.full_like(labels, self.num_classes)
            kwargs["labels"] = torch.where(drop | (labels < 0), null, labels)
        if self.encoder is not None:
            kept = ["" if dropped else caption for caption, dropped in zip(captions, drop_host.tolist(), strict=True)]
            kwargs["text_states"], kwargs["text_mask"] = self.encode_text(kept)
        return kwargs

    def for_samples(self, count: int, prompts: list[str] | None) -> tuple[dict, dict]:
        """(conditional, unconditional) model kwargs for a preview grid of `count` samples.

        Class-conditional: labels 0, 1, 2, ... cycling over the classes. Text: the prompts, cycled.
        """
        conditional: dict[str, torch.Tensor] = {}
        unconditional: dict[str, torch.Tensor] = {}
        if self.num_classes > 0:
            conditional["labels"] = torch.arange(count, device=self.device) % self.num_classes
            unconditional["labels"] = torch.full((count,), self.num_classes, device=self.device)
        if self.encoder is not None:
            prompts = prompts or [""]
            chosen = [prompts[i % len(prompts)] for i in range(count)]
            conditional["text_states"], conditional["text_mask"] = self.encode_text(chosen)
            unconditional["text_states"], unconditional["text_mask"] = self.encode_text([""] * count)
        return conditional, unconditional


__all__ = ["BatchConditioner"]
