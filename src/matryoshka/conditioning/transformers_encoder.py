"""The machinery shared by the Hugging Face encoders (T5, MiniLM): tokenize, run, mask, pool.

transformers is imported lazily, inside the constructors, so importing `matryoshka.conditioning`
stays cheap for code that only reads cached embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from matryoshka.conditioning.base import TextEmbedding, TextEncoder, check_prompts, masked_mean

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accepts a torch float dtype or its name ("float32", "bfloat16", "float16", also "torch.float32")."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported text-encoder dtype {dtype}; use one of {sorted(_DTYPES)}")
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported text-encoder dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def looks_like_local_path(name_or_path: str) -> bool:
    """True for strings that can only mean a directory on disk (a hub id is "org/name" or "name")."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).expanduser().exists()


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; loading straight into the target dtype
    # avoids materialising a multi-GB fp32 copy of large encoders first.
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


class TransformersTextEncoder(TextEncoder):
    """A frozen Hugging Face encoder whose last hidden states are the text states.

    Subclasses pick the model class and the name; this class tokenizes (right padding, truncation to
    `max_length`, the tokenizer's own special tokens), runs the network under `torch.no_grad()` and
    returns float32 states masked to zero at padding, the long mask and the masked-mean pooled vector.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        model_class: Any,
        max_length: int,
        dtype: torch.dtype | str,
        pad_to_max_length: bool,
        local_files_only: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (a token and </s>); got {max_length!r}")
        self.name_or_path = str(name_or_path)
        self.max_length = max_length
        self.dtype = parse_dtype(dtype)
        self.pad_to_max_length = bool(pad_to_max_length)

        source = self.name_or_path
        if looks_like_local_path(source):
            path = Path(source).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"text encoder directory {self.name_or_path!r} does not exist")
            source = str(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            model = model_class.from_pretrained(
                source, local_files_only=local_files_only, **_dtype_kwarg(self.dtype)
            )
        except OSError as error:
            raise OSError(
                f"could not load text encoder {self.name_or_path!r}: {error}. Pass a local directory "
                "holding config.json, the weights and the tokenizer files, or a hub id that is in the "
                "Hugging Face cache when HF_HUB_OFFLINE=1."
            ) from error
        self.tokenizer.padding_side = "right"  # real tokens first: the mask is a prefix of ones
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {self.name_or_path!r} has no pad token")

        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(
                f"max_length={max_length} exceeds the {positions} positions of {self.name_or_path!r}"
            )
        self.model = model.eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)  # T5Config maps hidden_size to d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TransformersTextEncoder:
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, (B, L) long each, on the encoder's device."""
        prompts = check_prompts(prompts)
        tokens = self.tokenizer(
            prompts,
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.device
        return {
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device).long(),
        }

    def encode(self, prompts: list[str]) -> TextEmbedding:
        tokens = self.tokenize(prompts)
        with torch.no_grad():
            hidden = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).last_hidden_state
        mask = tokens["attention_mask"]
        # float32 out whatever the compute dtype: states feed LayerNorm/Linear of the diffusion model
        # and the embedding cache, and a bf16 encoder should not leak its precision into either.
        states = hidden.float() * mask.unsqueeze(-1).float()
        return TextEmbedding(states=states, mask=mask, pooled=masked_mean(states, mask))

    def _base_config(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "dtype": dtype_name(self.dtype),
            "pad_to_max_length": self.pad_to_max_length,
        }
