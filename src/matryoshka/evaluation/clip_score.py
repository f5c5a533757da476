"""CLIP score: how well generated images match their prompts, by a CLIP model from transformers.

    score = 100 * mean_i max(cos(E_image(x_i), E_text(prompt_i)), 0)

(the convention of torchmetrics' CLIPScore; Hessel et al.'s CLIP-S is 2.5 / 100 of it). Any CLIP that
`transformers.CLIPModel.from_pretrained` reads works: a hub id ("openai/clip-vit-base-patch32",
fetched to the hub cache on first use) or a local directory. Images (N, C, H, W) in [-1, 1] go through
the model's own image processor (grey images repeated to RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class CLIPScorer:
    """A CLIP model, its tokenizer and image processor, loaded once."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:  # transformers >= 5: the PIL processor (the default one would need torchvision)
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        self.name = str(name_or_path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.name).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.processor = CLIPImageProcessor.from_pretrained(self.name)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """Per-image 100 * max(cosine, 0) of images (N, C, H, W) in [-1, 1] against their prompts (N)."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = images[start : start + batch_size].float()
            if chunk.shape[1] == 1:
                chunk = chunk.repeat(1, 3, 1, 1)
            pixels = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            inputs = self.processor(images=list(pixels), return_tensors="pt").to(self.device)
            text = self.tokenizer(prompts[start : start + batch_size], padding=True, truncation=True,
                                  return_tensors="pt").to(self.device)
            image_embeds = _embedding(self.model.get_image_features(**inputs))
            text_embeds = _embedding(self.model.get_text_features(**text))
            cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
            out.append((100 * cosine.clamp(min=0)).cpu().numpy())
        return np.concatenate(out)


def _embedding(output) -> torch.Tensor:
    """transformers >= 5 may return a model output object instead of the projected tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP features of type {type(output).__name__}")


__all__ = ["CLIPScorer"]
