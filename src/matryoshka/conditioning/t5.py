"""T5 encoder (the official MDM text encoder is FLAN-T5-XL: 2048-d states, <= 128 tokens ending in </s>)."""

from __future__ import annotations

from typing import Any

import torch

from matryoshka.conditioning.transformers_encoder import TransformersTextEncoder

DEFAULT_T5 = "google/flan-t5-xl"


class T5TextEncoder(TransformersTextEncoder):
    """The encoder stack of a T5 model, tokenized as the official MDM models expect.

    Each prompt becomes its tokens followed by `</s>` (added by the T5 tokenizer; checked at load),
    truncated to `max_length` tokens with the final `</s>` kept, padded on the right to the longest
    prompt of the batch (or to `max_length` when `pad_to_max_length`).

    Args:
        name_or_path: a hub id ("google/flan-t5-xl") or a local directory saved with `save_pretrained`
            holding the T5 weights and its tokenizer. With HF_HUB_OFFLINE=1 nothing is downloaded.
        max_length: the most tokens per prompt, `</s>` included (the released models use 128).
        dtype: the compute dtype of the network ("bfloat16" suits GPUs; T5 overflows in float16).
            The returned states are float32 regardless.
        pad_to_max_length: pad every batch to `max_length` instead of its longest prompt.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_T5,
        max_length: int = 128,
        dtype: torch.dtype | str = torch.float32,
        pad_to_max_length: bool = False,
    ) -> None:
        from transformers import T5EncoderModel

        super().__init__(
            name_or_path,
            model_class=T5EncoderModel,
            max_length=max_length,
            dtype=dtype,
            pad_to_max_length=pad_to_max_length,
        )
        self.name = f"t5:{self.name_or_path}"
        eos = self.tokenizer.eos_token_id
        probe = self.tokenizer(["a"])["input_ids"][0]
        if eos is None or not probe or probe[-1] != eos:
            raise ValueError(
                f"the tokenizer of {self.name_or_path!r} does not end sequences with </s> "
                f"(eos id {eos}, 'a' -> {probe}); MDM's T5 conditioning needs it"
            )

    def to_config(self) -> dict[str, Any]:
        return {"type": "t5", "name_or_path": self.name_or_path, **self._base_config()}
