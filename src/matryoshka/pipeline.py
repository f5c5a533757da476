"""`MatryoshkaPipeline`: a trained nested model + its text encoder, from prompts to images, the way
diffusers' pipelines work.

    pipe = MatryoshkaPipeline.from_pretrained("fashion-t2i")                 # the bundled model, by name
    pipe = MatryoshkaPipeline.from_pretrained("runs/fashion/model")          # a model directory
    pipe = MatryoshkaPipeline.from_pretrained("user/repo", revision="main")  # a hub repository
    image = pipe("a photo of a sneaker", num_inference_steps=50, guidance_scale=3.0, generator=0).images[0]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # swap the sampler

    pipe = MatryoshkaPipeline.from_official("vis_model.pth", "config.yaml", text_encoder="t5:google/flan-t5-xl")

Sampling follows REFERENCE.md section 4: independent N(0, I) noise at every level, the official step
spacing, classifier-free guidance with both branches in one batched forward (the unconditional branch is
the negative prompt, "" by default, or the null class label), one reverse-process loop
(`matryoshka.sampling.sample`) driven by a scheduler object (`matryoshka.schedulers`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from matryoshka import sampling
from matryoshka.conditioning import TextEmbedding, TextEncoder, load_text_encoder, pad_embeddings
from matryoshka.data import convert_channels, make_grid, pil_to_tensor, resize_center_crop, tensor_to_pil
from matryoshka.diffusion import PyramidSchedule
from matryoshka.guidance import GuidanceInterval, classifier_free_guidance
from matryoshka.model_dir import (
    BUNDLED_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    MDMConfig,
    bundled_models,
    load_model_dir,
    save_model_dir,
)
from matryoshka.models import NestedUNet
from matryoshka.models.memory_format import set_memory_format
from matryoshka.precision import PRECISIONS, resolve_precision
from matryoshka.schedulers import Scheduler, SchedulerConfig, available_schedulers, make_scheduler, randn

ClassLabel = int | str
OUTPUT_TYPES = ("pil", "pt", "np")


def available_samplers() -> list[str]:
    """The scheduler shorthands `pipe(..., sampler=name)` and `--sampler` accept."""
    return available_schedulers()


def resolve_pretrained(
    name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory of a model: a directory as given, a bundled model by name, or a hub repository
    id downloaded (or found in the cache) by huggingface_hub, which honours HF_HUB_OFFLINE."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a model directory: {CONFIG_NAME} is missing")
        return path
    if str(name_or_path) in bundled_models():
        return BUNDLED_DIR / str(name_or_path)
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        known = ", ".join(bundled_models()) or "none"
        raise FileNotFoundError(
            f"{name!r} is not a model directory, a bundled model ({known}) or a hub repository id (user/name)"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:  # a dependency of transformers, the "text" extra
        raise ImportError("loading from the hub needs huggingface_hub", name="huggingface_hub") from error
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        directory = snapshot_download(
            name, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=offline, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.md", "*.yaml", "*.json"],
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name!r} is not in the hub cache{f' ({cache_dir})' if cache_dir else ''} and downloads are off "
            "(local_files_only or HF_HUB_OFFLINE)"
        ) from None
    return Path(directory)


@dataclass
class PipelineOutput:
    """images: the top level, as `output_type` asks: one PIL image per sample (prompt-major: all images of
    prompt 0 first), or a (B, C, H, W) tensor ("pt") / (B, H, W, C) array ("np") in [0, 1].
    levels: when asked for, every level's images, highest resolution first (levels[r][i]).
    tensors: every level as a (B, C, S_r, S_r) float tensor in [-1, 1] on the CPU, highest first.
    evaluations: network evaluations in sample rows, {"network_rows", "guide_rows"} (a guided step
    costs two rows per sample, one outside the guidance interval); None for unconditional models.

    Video models: tensors are clips (B, C, T_r, S_r, S_r) and each PIL image shows a clip's frames side
    by side; write clips with matryoshka.video.save_video(output.tensors[0][i], "clip.gif" or ".mp4")."""

    images: list[Image.Image] | torch.Tensor | np.ndarray
    levels: list[list[Image.Image]] | None
    tensors: list[torch.Tensor]
    evaluations: dict[str, int] | None = None


class MatryoshkaPipeline:
    """A NestedUNet, its diffusion config, its scheduler and (for text-to-image models) its text encoder.

    Args:
        model: the network; moved to `device` and put in eval mode.
        config: the model directory config (network, diffusion, text encoder spec, class names, the
            recommended sampling settings).
        text_encoder: the encoder of a text-conditional model; None loads the one `config.text_encoder`
            names (a spec string for `load_text_encoder`).
        scheduler: how sampling steps; None: the model's recommended sampler (`config.sampling`).
    """

    def __init__(
        self,
        model: NestedUNet,
        config: MDMConfig,
        text_encoder: TextEncoder | str | None = None,
        device: str | torch.device = "cpu",
        scheduler: Scheduler | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.schedule = PyramidSchedule.from_config(config.diffusion, config.model.scales)
        self.scheduler = scheduler or make_scheduler(config.sampling.sampler, config.sampling.eta)
        self._progress_bar_config: dict[str, Any] = {}
        self.text_encoder: TextEncoder | None = None
        if isinstance(text_encoder, str):
            config.text_encoder = text_encoder
            text_encoder = None
        if config.model.text_dim > 0:
            if text_encoder is None:
                if config.text_encoder is None:
                    raise ValueError(
                        f"the model is text-conditional (text_dim = {config.model.text_dim}) but no text encoder "
                        "is named in its config.yaml (text_encoder) and none was given: pass text_encoder="
                    )
                text_encoder = load_text_encoder(config.text_encoder)
            elif config.text_encoder is None:
                # encoder.name is a valid spec ("minilm", "t5:<path>"): save_pretrained records it.
                config.text_encoder = text_encoder.name
            if text_encoder.dim != config.model.text_dim:
                raise ValueError(
                    f"text encoder {text_encoder.name!r} gives {text_encoder.dim}-d states but the model expects "
                    f"model.text_dim = {config.model.text_dim}"
                )
            self.text_encoder = text_encoder.to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The network's weight dtype (float32 unless `.to(dtype)` or `torch_dtype` said otherwise)."""
        return next(self.model.parameters()).dtype

    # ---- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | str | None = None,
    ) -> MatryoshkaPipeline:
        """Loads a model: a model directory (config.yaml + model.safetensors), a bundled model by name
        ("fashion-t2i"), or a hub repository id ("user/name", at `revision`, through the hub cache in
        `cache_dir`; HF_HUB_OFFLINE or local_files_only use the cache alone). torch_dtype: cast the network
        (float16 / bfloat16; the sampler's arithmetic stays float32). text_encoder overrides the encoder its
        config names (a spec such as "minilm" or "t5:/path", or an encoder object)."""
        directory = resolve_pretrained(name_or_path, revision, cache_dir, local_files_only)
        model, config = load_model_dir(directory, device=device)
        pipe = cls(model, config, text_encoder=text_encoder, device=device)
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe

    @classmethod
    def from_official(
        cls,
        checkpoint: str | Path,
        config_yaml: str | Path | None = None,
        text_encoder: TextEncoder | str | None = None,
        device: str | torch.device = "cpu",
    ) -> MatryoshkaPipeline:
        """Loads an official ml-mdm checkpoint (vis_model.pth) and its YAML (None: the config pickled
        in the checkpoint). Official text-to-image models need the T5 they were trained with:
        text_encoder = "t5:google/flan-t5-xl", "t5:/local/dir", a bare local directory (taken as a T5),
        or an encoder object."""
        from matryoshka.interop import load_official

        model, model_config, diffusion_config = load_official(checkpoint, config_yaml)
        if model_config.text_dim > 0 and text_encoder is None:
            raise ValueError(
                f"the official model {checkpoint} is text-conditional ({model_config.text_dim}-d states): pass "
                "text_encoder='t5:google/flan-t5-xl' (the released models' encoder) or a local T5 directory"
            )
        if isinstance(text_encoder, str) and ":" not in text_encoder and Path(text_encoder).is_dir():
            text_encoder = f"t5:{text_encoder}"
        if model_config.text_dim == 0:
            text_encoder = None
        config = MDMConfig(model=model_config, diffusion=diffusion_config)
        return cls(model, config, text_encoder=text_encoder, device=device)

    def save_pretrained(
        self, directory: str | Path, card: str | None = None, push_to_hub: bool = False, repo_id: str | None = None,
        private: bool | None = None, commit_message: str | None = None,
    ) -> Path:
        """Writes config.yaml (with the current scheduler as the recommended sampler) + model.safetensors
        (+ model_card.md), which `from_pretrained` reads back. push_to_hub: also upload the directory to
        the hub repository `repo_id` (default: the directory's name), created if missing."""
        sampling_defaults = replace(self.config.sampling, sampler=self.scheduler.config.name,
                                    eta=self.scheduler.config.eta)
        config = replace(self.config, sampling=sampling_defaults)
        model = self.model
        if self.dtype != torch.float32 or _has_lora(self.model):  # plain float32 weights, adapters folded in
            model = _plain_copy(self.model)
        path = save_model_dir(directory, model, config, card=card)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            repo = repo_id or Path(directory).name
            api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(path), commit_message=commit_message or "matryoshka model")
        return path

    def to(self, *args: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           memory_format: torch.memory_format | None = None) -> MatryoshkaPipeline:
        """Move and/or cast, as diffusers' `pipe.to("cuda")`, `pipe.to(torch.bfloat16)` or
        `pipe.to("cuda", torch.float16)`: the network (and text encoder) go to the device; the network's
        weights take the dtype (its inputs are cast to it, its outputs back to float32).
        memory_format=torch.channels_last stores the convolution weights channels-last (the same images,
        faster on a CPU, see BENCHMARKS.md); torch.contiguous_format undoes it."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, str | torch.device):
                device = arg
            else:
                raise TypeError(f"pipe.to() takes a device and/or a torch.dtype, got {arg!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"pipe.to(dtype) needs a floating-point dtype, got {dtype}")
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
            if self.text_encoder is not None:
                self.text_encoder.to(self.device)
        if dtype is not None:
            self.model.to(dtype)
        if memory_format is not None:
            set_memory_format(self.model, memory_format)
        return self

    # ---- LoRA adapters (matryoshka.lora), as in diffusers ------------------------------------------------

    def load_lora_weights(self, path: str | Path, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Add the LoRA adapter saved in `path` (a run's lora/ directory) under `adapter_name`, at `scale`;
        several adapters add up (`set_adapters` chooses which and their weights)."""
        from matryoshka import lora

        lora.load_adapter(self.model, path, adapter_name, scale)
        self.model.to(self.device)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Which loaded adapters are active, and at what scale each."""
        from matryoshka import lora

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights or 1.0] * len(names)
        known = lora.adapter_names(self.model)
        for name, weight in zip(names, weights, strict=True):
            if name not in known:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {', '.join(known) or 'none'})")
            lora.set_scale(self.model, name, weight)
        lora.activate(self.model, names)

    def get_active_adapters(self) -> list[str]:
        from matryoshka import lora

        layers = lora.lora_layers(self.model)
        return sorted({name for layer in layers.values() for name in layer.active_adapters})

    def fuse_lora(self) -> None:
        """Fold the active adapters into the weights (sampling at the plain model's speed)."""
        from matryoshka import lora

        lora.fuse(self.model)

    def unfuse_lora(self) -> None:
        """Take fused adapters out of the weights again (exactly: the unfused weights were kept)."""
        from matryoshka import lora

        lora.unfuse(self.model)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the model is exactly what it was before `load_lora_weights`."""
        from matryoshka import lora

        lora.remove_adapters(self.model)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the sampling bar (e.g. disable=True, desc="..."), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    # ---- conditioning -------------------------------------------------------------------------------

    @property
    def is_text_conditional(self) -> bool:
        return self.config.model.text_dim > 0

    @property
    def is_class_conditional(self) -> bool:
        return self.config.model.num_classes > 0

    def class_index(self, label: ClassLabel) -> int:
        """A class id from an int or a class name (case-insensitive; "t-shirt/top" or "T-shirt/top")."""
        num_classes = self.config.model.num_classes
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise TypeError(f"a class label must be an int or a class name; got {type(label).__name__}")
        if isinstance(label, str):
            names = self.config.class_names or []
            lowered = [name.lower() for name in names]
            if label.strip().lower() in lowered:
                return lowered.index(label.strip().lower())
            if label.strip().isdigit():
                label = int(label.strip())
            else:
                known = ", ".join(names) if names else "none: the model's config has no class_names"
                raise ValueError(f"unknown class name {label!r}; known names: {known}")
        if not 0 <= label < num_classes:
            raise ValueError(
                f"class id {label} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return label

    def _text_branches(
        self, prompts: list[str] | None, embedded: TextEmbedding | None, negative_prompt,
        negative_embedded: TextEmbedding | None, rows: torch.Tensor,
    ) -> tuple[TextEmbedding, TextEmbedding]:
        """Conditional and unconditional embeddings of the B rows (rows: each row's prompt index), padded
        to one token length."""
        if embedded is None:
            assert self.text_encoder is not None and prompts is not None
            embedded = self.text_encoder.encode(prompts)
        count = len(embedded)
        cond = embedded[rows] if count > 1 else embedded.repeat(len(rows))
        if negative_embedded is None:
            assert self.text_encoder is not None
            negatives = self._negative_list(negative_prompt, count)
            negative_embedded = self.text_encoder.encode(negatives)
        elif negative_prompt is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        if len(negative_embedded) not in (1, count):
            raise ValueError(f"negative_prompt_embeds has {len(negative_embedded)} rows for {count} prompts")
        uncond = negative_embedded.repeat(len(rows)) if len(negative_embedded) == 1 else negative_embedded[rows]
        cond, uncond = pad_embeddings([cond, uncond])
        return cond, uncond

    # ---- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        class_labels: ClassLabel | Sequence[ClassLabel] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        sampler: str | None = None,
        timesteps: Sequence[int] | Sequence[float] | torch.Tensor | None = None,
        eta: float | None = None,
        generator: torch.Generator | int | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_levels: bool = False,
        callback: sampling.StepCallback | None = None,
        progress: bool = True,
        init_image: Image.Image | torch.Tensor | None = None,
        init_level: int | None = None,
        precision: str = "fp32",
        guidance_interval: GuidanceInterval | tuple[float, float] | Sequence | None = None,
        guidance_rescale: float = 0.0,
        guide_model: MatryoshkaPipeline | NestedUNet | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: list[torch.Tensor] | None = None,
        prompt_embeds: torch.Tensor | TextEmbedding | None = None,
        negative_prompt_embeds: torch.Tensor | TextEmbedding | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        callback_on_step_end: Callable[[MatryoshkaPipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> PipelineOutput | tuple:
        """Generates num_images_per_prompt images for every prompt (or class label, or prompt embedding).

        num_inference_steps, guidance_scale: None takes the model directory's recommended settings
            (`config.sampling`; the official 50 steps at guidance 7.5 unless the model says else).
        timesteps: a custom time grid (diffusers' `timesteps`): strictly decreasing state times in [0, T]
            ending at 0, e.g. [953, 906, ..., 48, 0]; num_inference_steps is then ignored. Integer times index
            the training tables, float times interpolate log-SNR between them.
        sampler: a scheduler shorthand ("ddim", "ddpm", "dpmpp_2m", "euler", "heun"); None: `self.scheduler`
            (swap it with `pipe.scheduler = X.from_config(pipe.scheduler.config)`). eta: DDIM's eta (None:
            the scheduler's).
        guidance_scale: w in u + w (c - u), one float or one per level (highest first); 1 = no guidance.
        generator: a torch.Generator on the pipeline's device, an int seed, or a list of generators, one
            per image (each image is then what a call of one image with that generator gives).
        callback: called after every step with a sampling.StepState (x0 estimates and states per level).
        callback_on_step_end: diffusers' hook, `fn(pipe, step, t, callback_kwargs) -> dict`; callback_kwargs
            holds "latents" (the pyramid, highest first) and "x0"; a returned "latents" replaces the pyramid.
        init_image: super-resolution / variations: a low-resolution image (PIL, or a tensor (C, H, W) in
            [-1, 1]) that pins level `init_level` (default: the level whose side equals the image's, else
            the core, resized to it): at every step that level is replaced by the image noised to the
            current time, so the other levels are generated consistent with it.
        latents: the initial pyramid (one (B, C, S_r, S_r) tensor per level, highest first) instead of
            noise drawn from the generator.
        prompt_embeds / negative_prompt_embeds: text states (B, S, D) (or TextEmbedding) instead of prompts,
            with their masks (B, S) (default: every token real); the negative default is the encoded "".
        precision: "fp32", "bf16" or "fp16": the network runs under that autocast (the sampler's arithmetic
            stays in float32); faster on GPUs and on CPUs with AVX512-BF16 (BENCHMARKS.md, "Performance").
            An fp16 call whose outputs overflow is run again in float32 (with a warning). "auto": the
            faster of bf16 and fp32 for this network and batch (`fastest_precision`).
        guidance_interval: guide only while a level's noise level is inside it (Kynkaanniemi et al. 2024):
            a GuidanceInterval (bounds in sigma, log-SNR or t), a (low, high) tuple in sigma = sqrt((1 - g) / g)
            of the level's own shifted schedule, or one per level (None = always). Outside it a step runs
            only the conditional rows. None: guide at every step (the official behaviour).
        guidance_rescale: phi in [0, 1] of guidance rescale (Lin et al. 2023, diffusers' guidance_rescale),
            applied per level to the network's output; 0 = off.
        guide_model: autoguidance (Karras et al. 2024): the base of guidance is this weaker model's
            conditional prediction instead of the unconditional one (a pipeline or network of the same
            levels, conditioning and diffusion); the negative prompt is then unused.
        output_type: "pil" (default), "pt" or "np" for `images`; return_dict False returns (images,).
        """
        recommended = self.config.sampling
        num_inference_steps = recommended.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = recommended.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = self._scheduler_for(sampler, eta)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if timesteps is not None and float(torch.as_tensor(timesteps).reshape(-1)[-1]) != 0:
            # the scheduler also runs partial grids (latency benchmarks); a pipeline returns clean images
            raise ValueError(f"timesteps must end at 0 (the clean image), got {torch.as_tensor(timesteps).tolist()}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        scales = self._check_guidance(guidance_scale)
        conditional, unconditional, batch = self._branches(
            prompt, negative_prompt, class_labels, num_images_per_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_attention_mask, negative_prompt_attention_mask,
        )
        if precision == "auto":
            precision = self.fastest_precision(2 * batch if conditional else batch)
        denoiser, guided = self._denoiser(conditional, unconditional, scales, guidance_interval, guidance_rescale,
                                          guide_model, precision)
        generator = self._generator(generator, batch)
        noise = self._initial_noise(latents, batch, generator)
        schedule = self.schedule.to(self.device)
        scheduler.set_timesteps(
            num_inference_steps, schedule, prediction=self.config.diffusion.prediction,
            threshold=self.config.diffusion.threshold, timesteps=timesteps,
        )
        replace_levels = None
        if init_image is not None:
            level, image = self._init_level(init_image, init_level)
            replace_levels = sampling.condition_on_levels({level: image.to(self.device)}, schedule, generator)
        step_hook = _step_hook(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs)
        bar = {**self._progress_bar_config} if self._progress_bar_config else progress
        if isinstance(bar, dict) and not progress:
            bar = {**bar, "disable": True}
        with _casts_kept_across_steps(self.device, precision):
            result = sampling.sample(
                denoiser, noise, scheduler, generator=generator, callback=step_hook, progress=bar,
                replace_levels=replace_levels,
            )
        tensors = [level.float().cpu() for level in result]
        images = _as_output_type(tensors[0], output_type)
        levels = [[_to_pil(sample) for sample in level] for level in tensors] if output_levels else None
        evaluations = {"network_rows": guided.rows, "guide_rows": guided.guide_rows} if guided is not None else None
        if not return_dict:
            return (images,)
        return PipelineOutput(images=images, levels=levels, tensors=tensors, evaluations=evaluations)

    def _scheduler_for(self, sampler: str | None, eta: float | None) -> Scheduler:
        """A fresh scheduler for one call (schedulers hold state): the named one, or a copy of self.scheduler."""
        if sampler is not None:
            return make_scheduler(sampler, self.scheduler.config.eta if eta is None else eta)
        if eta is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        return type(self.scheduler).from_config(SchedulerConfig(self.scheduler.config.name, eta)) \
            if self.scheduler.stochastic else make_scheduler(self.scheduler.config.name, eta)

    def _branches(
        self, prompt, negative_prompt, class_labels, num_images_per_prompt: int, prompt_embeds,
        negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
    ) -> tuple[dict, dict, int]:
        """The model's conditional and unconditional keyword arguments for every row of the batch (prompt-
        major: row i belongs to prompt / label i // num_images_per_prompt), and the batch size."""
        prompts = self._prompt_list(prompt) if prompt_embeds is None else None
        if prompt_embeds is not None and prompt is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        labels = self._label_list(class_labels)
        embedded = self._embedding(prompt_embeds, prompt_attention_mask, "prompt_embeds")
        groups = max(len(prompts or []), len(labels or []), len(embedded) if embedded is not None else 0, 1)
        for name, values in (("prompt", prompts), ("class_labels", labels), ("prompt_embeds", embedded)):
            if values is not None and len(values) not in (1, groups):
                raise ValueError(
                    f"{name} has {len(values)} entries but there are {groups} prompts/labels: give one or {groups}"
                )
        batch = groups * num_images_per_prompt
        rows = torch.arange(groups).repeat_interleave(num_images_per_prompt)
        conditional: dict = {}
        unconditional: dict = {}
        if prompts is not None or embedded is not None:
            count = len(prompts) if prompts is not None else len(embedded)
            group_rows = rows if count == groups else torch.zeros_like(rows)
            negative = self._embedding(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt_embeds")
            cond, uncond = self._text_branches(prompts, embedded, negative_prompt, negative, group_rows)
            conditional.update(text_states=cond.states.to(self.device), text_mask=cond.mask.to(self.device))
            unconditional.update(text_states=uncond.states.to(self.device), text_mask=uncond.mask.to(self.device))
        elif negative_prompt is not None or negative_prompt_embeds is not None:
            raise ValueError("negative_prompt needs a text-conditional model and a prompt")
        if labels is not None:
            ids = torch.tensor(labels, dtype=torch.long)
            ids = ids[rows] if len(labels) == groups else ids.expand(batch)
            conditional["labels"] = ids.to(self.device)
            unconditional["labels"] = torch.full_like(ids, self.config.model.num_classes).to(self.device)
        return conditional, unconditional, batch

    def fastest_precision(self, rows: int) -> str:
        """What precision="auto" runs: "bf16" or "fp32", whichever computes a denoiser call of `rows`
        rows faster for this network on this device (matryoshka.precision: a rule on GPUs, measured once
        and cached on a CPU). A network already stored in a low-precision dtype runs as it is."""
        if self.dtype != torch.float32:
            return "fp32"
        return resolve_precision("auto", self.model, self.device, rows)

    def _denoiser(self, conditional: dict, unconditional: dict, scales, interval, rescale: float, guide_model,
                  precision: str):
        """The network as the sampling loop calls it (guided when conditional, in the asked precision), and
        the GuidedDenoiser that counts its evaluations (None for an unconditional model)."""
        guide = self.guide_network(guide_model)
        network = _in_dtype(self.model, self.dtype)
        guided = None
        if conditional:
            denoiser = guided = classifier_free_guidance(
                network, conditional, unconditional, scales, interval=_as_intervals(interval),
                schedule=self.schedule, rescale=rescale,
                guide_model=None if guide is None else _in_dtype(guide, next(guide.parameters()).dtype),
            )
        elif guide is not None or interval is not None or rescale:
            raise ValueError("guidance_interval, guidance_rescale and guide_model need a conditional model")
        else:  # an unconditional model: nothing to guide

            def denoiser(pyramid: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
                return network(pyramid, t)

        if precision != "fp32":
            denoiser = _in_autocast(denoiser, self.device, torch.bfloat16 if precision == "bf16" else torch.float16)
        return denoiser, guided

    def _initial_noise(self, latents, batch: int, generator) -> list[torch.Tensor]:
        shapes = self.level_shapes()
        if latents is None:
            return [randn((batch, *shape), generator, self.device, torch.float32) for shape in shapes]
        latents = list(latents)
        wanted = [(batch, *shape) for shape in shapes]
        if [tuple(x.shape) for x in latents] != wanted:
            raise ValueError(f"latents must be one tensor per level of shapes {wanted}, got "
                             f"{[tuple(x.shape) for x in latents]}")
        return [x.to(self.device, torch.float32) for x in latents]

    def _embedding(self, states, mask, name: str) -> TextEmbedding | None:
        """prompt_embeds (and mask) as a TextEmbedding on the pipeline's device."""
        if states is None:
            return None
        if not self.is_text_conditional:
            raise ValueError(f"{name} needs a text-conditional model")
        if isinstance(states, TextEmbedding):
            return states
        if states.ndim != 3 or states.shape[-1] != self.config.model.text_dim:
            raise ValueError(f"{name} must be (B, S, {self.config.model.text_dim}), got {tuple(states.shape)}")
        mask = torch.ones(states.shape[:2], dtype=torch.long) if mask is None else mask.long()
        weights = mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return TextEmbedding(states=states.float().cpu(), mask=mask.cpu(), pooled=pooled.float().cpu())

    def guide_network(self, guide: MatryoshkaPipeline | NestedUNet | None) -> NestedUNet | None:
        """Autoguidance's guide (a pipeline or network) as a network, checked against this model: ValueError
        naming what differs."""
        if guide is None:
            return None
        network = guide.model if isinstance(guide, MatryoshkaPipeline) else guide
        if not isinstance(network, NestedUNet):
            raise TypeError(f"guide_model must be a MatryoshkaPipeline or a NestedUNet, got {type(guide).__name__}")
        mine, theirs = self.config.model, network.config
        for name in ("sizes", "in_channels", "num_classes", "text_dim", "num_frames"):
            if getattr(mine, name) != getattr(theirs, name):
                raise ValueError(
                    f"guide_model has model.{name} = {getattr(theirs, name)} but this model has {getattr(mine, name)}:"
                    " autoguidance needs a model of the same levels and conditioning"
                )
        if isinstance(guide, MatryoshkaPipeline) and (
            not torch.equal(guide.schedule.gammas, self.schedule.gammas)
            or guide.config.diffusion.prediction != self.config.diffusion.prediction
        ):
            raise ValueError("guide_model has another noise schedule or prediction kind than this model")
        return network.to(self.device).eval()

    def _init_level(self, image: Image.Image | torch.Tensor, level: int | None) -> tuple[int, torch.Tensor]:
        """Which level an init image pins, and the image as a (C, S, S) tensor in [-1, 1] of that size."""
        if self.is_video:
            raise ValueError("init_image is for image models")
        sizes = self.config.model.sizes
        channels = self.config.model.in_channels
        if isinstance(image, torch.Tensor):
            side = image.shape[-1]
            if level is None:
                level = sizes.index(side) if side in sizes else len(sizes) - 1
            if not 0 <= level < len(sizes):
                raise ValueError(f"init_level must be in [0, {len(sizes) - 1}], got {level}")
            wanted = (channels, sizes[level], sizes[level])
            if tuple(image.shape[-3:]) != wanted:
                raise ValueError(f"init_image tensor has shape {tuple(image.shape)}; level {level} needs {wanted}")
            return level, image.float()
        if level is None:
            level = sizes.index(image.width) if image.width == image.height and image.width in sizes else len(sizes) - 1
        if not 0 <= level < len(sizes):
            raise ValueError(f"init_level must be in [0, {len(sizes) - 1}], got {level}")
        image = resize_center_crop(convert_channels(image, channels), sizes[level])
        return level, pil_to_tensor(image)

    @property
    def is_video(self) -> bool:
        return self.config.model.num_frames > 0

    def level_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of every level, highest first: (C, S_r, S_r), or (C, T_r, S_r, S_r) for video."""
        return self.config.model.level_shapes()

    def _check_guidance(self, guidance_scale: float | Sequence[float]) -> float | list[float]:
        if isinstance(guidance_scale, int | float):
            values = [float(guidance_scale)]
        else:
            values = [float(w) for w in guidance_scale]
            if len(values) != self.config.model.num_levels:
                raise ValueError(
                    f"guidance_scale has {len(values)} entries but the model has {self.config.model.num_levels} "
                    "levels: give one float or one per level (highest resolution first)"
                )
        if not all(math.isfinite(w) for w in values):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        return values[0] if isinstance(guidance_scale, int | float) else values

    def _prompt_list(self, prompt: str | list[str] | None) -> list[str] | None:
        if prompt is None:
            if self.is_text_conditional:
                raise ValueError("this model is text-conditional: pass a prompt (\"\" gives unconditional samples)")
            return None
        if not self.is_text_conditional:
            raise ValueError(
                "this model is not text-conditional (model.text_dim = 0): "
                + ("pass class_labels instead of a prompt" if self.is_class_conditional else "call it without a prompt")
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return prompts

    def _negative_list(self, negative_prompt: str | list[str] | None, num_prompts: int) -> list[str]:
        if negative_prompt is None:
            return [""]
        if isinstance(negative_prompt, str):
            return [negative_prompt]
        negatives = list(negative_prompt)
        if len(negatives) != num_prompts or not all(isinstance(p, str) for p in negatives):
            raise ValueError(
                f"negative_prompt must be a string or a list of {num_prompts} strings (one per prompt), "
                f"got {negative_prompt!r}"
            )
        return negatives

    def _label_list(self, class_labels: ClassLabel | Sequence[ClassLabel] | None) -> list[int] | None:
        if class_labels is None:
            if self.is_class_conditional:
                names = f" or names ({', '.join(self.config.class_names)})" if self.config.class_names else ""
                raise ValueError(f"this model is class-conditional: pass class_labels (ids{names})")
            return None
        if not self.is_class_conditional:
            raise ValueError("this model is not class-conditional (model.num_classes = 0): class_labels must be None")
        values = [class_labels] if isinstance(class_labels, int | str) else list(class_labels)
        if not values:
            raise ValueError("class_labels is empty")
        return [self.class_index(label) for label in values]

    def _generator(self, generator, batch: int) -> torch.Generator | list[torch.Generator]:
        """An int seed, a generator on the pipeline's device, or a list of `batch` of them (one per image)."""
        if isinstance(generator, list | tuple):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} images: give one generator per image")
            return [self._generator(g, 1) for g in generator]  # type: ignore[misc]
        if generator is None:
            generator = int(torch.randint(0, 2**31 - 1, ()).item())
        if isinstance(generator, int):
            return torch.Generator(device=self.device).manual_seed(generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
        if generator.device.type != self.device.type:
            raise ValueError(
                f"the generator lives on {generator.device} but the pipeline runs on {self.device}: "
                f"make it with torch.Generator(device={str(self.device)!r}) or pass an int seed"
            )
        return generator


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> Callable[..., list[torch.Tensor]]:
    """The network called in its weight dtype (inputs cast to it), its outputs handed back in float32."""
    if dtype == torch.float32:
        return model

    def run(pyramid: list[torch.Tensor], t: torch.Tensor, **conditioning) -> list[torch.Tensor]:
        cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in conditioning.items()}
        return [out.float() for out in model([x.to(dtype) for x in pyramid], t, **cast)]

    return run


def _as_output_type(top: torch.Tensor, output_type: str):
    """The top level (B, C, ...) in [-1, 1] as `output_type` asks: PIL images, a tensor or an array in [0, 1]."""
    if output_type == "pil":
        return [_to_pil(sample) for sample in top]
    if output_type == "pt":
        return (top + 1) / 2
    return ((top + 1) / 2).movedim(1, -1).numpy()


def _has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _plain_copy(model: NestedUNet) -> NestedUNet:
    """The network as a model directory stores it: float32 weights, its active LoRA adapters folded in
    (the original untouched)."""
    state = model.state_dict()
    if _has_lora(model):
        from matryoshka.lora import merged_state_dict

        state = merged_state_dict(model)
    copy = NestedUNet(model.config)
    copy.load_state_dict({k: v.float() for k, v in state.items()})
    return copy


def _step_hook(pipe, callback, on_step_end, tensor_inputs: Sequence[str]):
    """One loop callback from the old-style `callback(StepState)` and diffusers' `callback_on_step_end`."""
    if callback is None and on_step_end is None:
        return None
    unknown = set(tensor_inputs) - {"latents", "x0"}
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs may name latents and x0, got {sorted(unknown)}")

    def hook(state: sampling.StepState):
        if callback is not None:
            callback(state)
        if on_step_end is None:
            return None
        available = {"latents": state.xt, "x0": state.x0}
        result = on_step_end(pipe, state.index, state.t, {name: available[name] for name in tensor_inputs}) or {}
        return result.get("latents")

    return hook


def _as_intervals(value) -> GuidanceInterval | list[GuidanceInterval | None] | None:
    """guidance_interval as GuidanceInterval objects: (low, high) tuples are in sigma."""
    if value is None or isinstance(value, GuidanceInterval):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return GuidanceInterval(float(value[0]), float(value[1]))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_as_intervals(v) for v in value]  # type: ignore[misc]
    raise TypeError(f"guidance_interval must be (low, high), a GuidanceInterval or one per level, got {value!r}")


def _casts_kept_across_steps(device: torch.device, precision: str):
    """A disabled autocast context around the sampling loop. autocast caches its low-precision copies of
    the weights until the outermost autocast context exits; with this one outermost, every weight is
    cast once per pipeline call instead of once per step, and the sampler's own arithmetic, outside the
    network's autocast, stays in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _in_autocast(denoiser: sampling.Denoiser, device: torch.device, dtype: torch.dtype) -> sampling.Denoiser:
    """The denoiser under bf16 / fp16 autocast, its predictions handed back in float32. fp16 can overflow
    (the released 1024 px model does, ml-mdm issue 69): a call whose outputs are not finite is run again in
    float32, with a warning, so no NaN image comes out of it."""
    import warnings

    def run(pyramid: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device.type, dtype=dtype):
            predictions = [p.float() for p in denoiser(pyramid, t)]
        if dtype == torch.float16 and not all(bool(torch.isfinite(p).all()) for p in predictions):
            warnings.warn(
                f"fp16 overflowed at time {float(t.reshape(-1)[0]) + 1:g}: that step ran again in float32",
                RuntimeWarning, stacklevel=2,
            )
            predictions = [p.float() for p in denoiser(pyramid, t)]
        return predictions

    return run


def _to_pil(sample: torch.Tensor) -> Image.Image:
    """An image (C, H, W), or a clip (C, T, H, W) as its frames side by side."""
    if sample.ndim == 4:
        return make_grid(sample.transpose(0, 1), nrow=sample.shape[1], padding=0)
    return tensor_to_pil(sample)
