"""`MatryoshkaPipeline`: a trained nested model + its text encoder, from prompts to PIL images.

    pipe = MatryoshkaPipeline.from_pretrained("runs/fashion/model")        # our model directory
    out = pipe("a photo of a sneaker", num_inference_steps=50, guidance_scale=7.5, generator=0)
    out.images[0].save("sneaker.png")

    pipe = MatryoshkaPipeline.from_official("vis_model.pth", "config.yaml", text_encoder="t5:google/flan-t5-xl")

Sampling follows REFERENCE.md section 4: independent N(0, I) noise at every level, the official step
spacing, classifier-free guidance with both branches in one batched forward (the unconditional branch
is the negative prompt, "" by default, or the null class label). Samplers are looked up by name in a
registry (`register_sampler`), so a new one (DPM-Solver++, Euler, ...) plugs in without changing the
pipeline's signature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from matryoshka import sampling, solvers
from matryoshka.conditioning import TextEmbedding, TextEncoder, load_text_encoder, pad_embeddings
from matryoshka.data import convert_channels, make_grid, pil_to_tensor, resize_center_crop, tensor_to_pil
from matryoshka.diffusion import PyramidSchedule
from matryoshka.guidance import GuidanceInterval, classifier_free_guidance
from matryoshka.model_dir import MDMConfig, load_model_dir, save_model_dir
from matryoshka.models import NestedUNet
from matryoshka.pyramid import level_shapes
from matryoshka.schedule import spaced_timesteps

ClassLabel = int | str


class SamplerFunction(Protocol):
    """What a registered sampler is: noise pyramid in, clean pyramid (in [-1, 1]) out.

    denoiser(pyramid, t_model) -> predictions is already guided; timesteps are descending int64 times
    (the network receives t - 1), by default the official spacing for `num_inference_steps`.
    """

    def __call__(
        self,
        denoiser: sampling.Denoiser,
        noise: list[torch.Tensor],
        schedule: PyramidSchedule,
        timesteps: torch.Tensor,
        *,
        eta: float,
        prediction: str,
        threshold_kind: str,
        generator: torch.Generator | None,
        callback: sampling.StepCallback | None,
        progress: bool,
    ) -> list[torch.Tensor]: ...


_SAMPLERS: dict[str, SamplerFunction] = {}


def register_sampler(name: str, function: SamplerFunction, *, replace_existing: bool = False) -> None:
    """Makes `pipe(..., sampler=name)` (and `matryoshka generate --sampler name`) run `function`."""
    if name in _SAMPLERS and not replace_existing:
        raise ValueError(f"a sampler named {name!r} is already registered (pass replace_existing=True)")
    _SAMPLERS[name] = function


def available_samplers() -> list[str]:
    return sorted(_SAMPLERS)


def get_sampler(name: str) -> SamplerFunction:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(available_samplers())}")
    return _SAMPLERS[name]


def _core_sampler(method: str) -> SamplerFunction:
    def run(denoiser, noise, schedule, timesteps, **options) -> list[torch.Tensor]:
        return sampling.sample(denoiser, noise, schedule, timesteps, method=method, **options)

    return run


register_sampler("ddim", _core_sampler("ddim"))
register_sampler("ddpm", _core_sampler("ddpm"))
register_sampler("dpmpp_2m", solvers.sampler("dpmpp_2m"))  # ODE solvers (solvers.py)
register_sampler("euler", solvers.sampler("euler"))
register_sampler("heun", solvers.sampler("heun"))


@dataclass
class PipelineOutput:
    """images: the top level, one PIL image per sample (prompt-major: all images of prompt 0 first).
    levels: when asked for, every level's images, highest resolution first (levels[r][i]).
    tensors: every level as a (B, C, S_r, S_r) float tensor in [-1, 1] on the CPU, highest first.

    Video models: tensors are clips (B, C, T_r, S_r, S_r) and each PIL image shows a clip's frames side
    by side; write clips with matryoshka.video.save_video(output.tensors[0][i], "clip.gif" or ".mp4")."""

    images: list[Image.Image]
    levels: list[list[Image.Image]] | None
    tensors: list[torch.Tensor]
    # Network evaluations of a conditional model's call, in sample rows: {"network_rows", "guide_rows"}
    # (a guided step costs two rows per sample, one outside the guidance interval).
    evaluations: dict[str, int] | None = None


class MatryoshkaPipeline:
    """A NestedUNet, its diffusion config and (for text-to-image models) its text encoder.

    Args:
        model: the network; moved to `device` and put in eval mode.
        config: the model directory config (network, diffusion, text encoder spec, class names).
        text_encoder: the encoder of a text-conditional model; None loads the one `config.text_encoder`
            names (a spec string for `load_text_encoder`).
    """

    def __init__(
        self,
        model: NestedUNet,
        config: MDMConfig,
        text_encoder: TextEncoder | str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.schedule = PyramidSchedule.from_config(config.diffusion, config.model.scales)
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

    # ---- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoder | str | None = None,
    ) -> MatryoshkaPipeline:
        """Loads a model directory (config.yaml + model.safetensors). text_encoder overrides the
        encoder its config names (a spec such as "minilm" or "t5:/path", or an encoder object)."""
        model, config = load_model_dir(directory, device=device)
        return cls(model, config, text_encoder=text_encoder, device=device)

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

    def save_pretrained(self, directory: str | Path, card: str | None = None) -> Path:
        """Writes config.yaml + model.safetensors (+ model_card.md); `from_pretrained` reads it back."""
        return save_model_dir(directory, self.model, self.config, card=card)

    def to(
        self, device: str | torch.device | None = None, memory_format: torch.memory_format | None = None
    ) -> MatryoshkaPipeline:
        """Move the network (and text encoder) to `device`. memory_format=torch.channels_last stores the
        network's convolution weights channels-last, so its convolutions run in that layout (the same
        images; on a CPU 1.13x faster per sampling call of the embedded model, fp32 or bf16);
        torch.contiguous_format undoes it."""
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
            if self.text_encoder is not None:
                self.text_encoder.to(self.device)
        if memory_format is not None:
            self.model.to(memory_format=memory_format)
        return self

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
        self, prompts: list[str], negatives: list[str], rows: torch.Tensor
    ) -> tuple[TextEmbedding, TextEmbedding]:
        """Conditional and unconditional embeddings of the B rows, padded to one token length."""
        assert self.text_encoder is not None
        cond = self.text_encoder.encode(prompts)[rows]
        uncond = self.text_encoder.encode(negatives)
        uncond = uncond.repeat(len(rows)) if len(negatives) == 1 else uncond[rows]
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
        eta: float = 0.0,
        generator: torch.Generator | int | None = None,
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
    ) -> PipelineOutput:
        """Generates num_images_per_prompt images for every prompt (or class label).

        num_inference_steps, guidance_scale, sampler: None takes the model directory's recommended
        settings (`config.sampling`; the official 50 DDIM steps at guidance 7.5 unless the model says else).

        guidance_scale: w in u + w (c - u), one float or one per level (highest first); 1 = no guidance.
        generator: a torch.Generator on the pipeline's device, or an int seed; the initial noise of every
            level and DDPM/eta noise come from it, so a seed gives the same images every time.
        callback: called after every step with a sampling.StepState (x0 estimates and states per level).
        init_image: super-resolution / variations: a low-resolution image (PIL, or a tensor (C, H, W) in
            [-1, 1]) that pins level `init_level` (default: the level whose side equals the image's, else
            the core, resized to it): at every step that level is replaced by the image noised to the
            current time, so the other levels are generated consistent with it.
        precision: "fp32", or "bf16": the network runs under bf16 autocast (the sampler's arithmetic stays
            in float32); about 2x faster for the official models on a CPU with AVX512-BF16, and the fast
            path on GPUs (BENCHMARKS.md, "Performance"); images differ slightly from fp32 ones.
        guidance_interval: guide only while a level's noise level is inside it (Kynkaanniemi et al. 2024):
            a GuidanceInterval (bounds in sigma, log-SNR or t), a (low, high) tuple in sigma = sqrt((1 - g) / g)
            of the level's own shifted schedule, or one per level (None = always). Outside it a step runs
            only the conditional rows. None: guide at every step (the official behaviour).
        guidance_rescale: phi in [0, 1] of guidance rescale (Lin et al. 2023, diffusers' guidance_rescale),
            applied per level to the network's output; 0 = off.
        guide_model: autoguidance (Karras et al. 2024): the base of guidance is this weaker model's
            conditional prediction instead of the unconditional one (a pipeline or network of the same
            levels, conditioning and diffusion); the negative prompt is then unused.
        """
        recommended = self.config.sampling
        num_inference_steps = recommended.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = recommended.guidance_scale if guidance_scale is None else guidance_scale
        sampler = recommended.sampler if sampler is None else sampler
        sample_fn = get_sampler(sampler)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        model_config = self.config.model
        scales = self._check_guidance(guidance_scale)

        prompts = self._prompt_list(prompt)
        labels = self._label_list(class_labels)
        groups = max(len(prompts or []), len(labels or []), 1)
        for name, values in (("prompt", prompts), ("class_labels", labels)):
            if values is not None and len(values) not in (1, groups):
                raise ValueError(
                    f"{name} has {len(values)} entries but there are {groups} prompts/labels: give one or {groups}"
                )
        batch = groups * num_images_per_prompt
        # Row i of the batch belongs to group i // num_images_per_prompt (prompt-major order).
        rows = torch.arange(groups).repeat_interleave(num_images_per_prompt)

        conditional: dict = {}
        unconditional: dict = {}
        if prompts is not None:
            negatives = self._negative_list(negative_prompt, len(prompts))
            group_rows = rows if len(prompts) == groups else torch.zeros_like(rows)
            cond, uncond = self._text_branches(prompts, negatives, group_rows)
            conditional.update(text_states=cond.states, text_mask=cond.mask)
            unconditional.update(text_states=uncond.states, text_mask=uncond.mask)
        elif negative_prompt is not None:
            raise ValueError("negative_prompt needs a text-conditional model and a prompt")
        if labels is not None:
            ids = torch.tensor(labels, dtype=torch.long)
            ids = ids[rows] if len(labels) == groups else ids.expand(batch)
            conditional["labels"] = ids.to(self.device)
            unconditional["labels"] = torch.full_like(ids, model_config.num_classes).to(self.device)

        guide = self.guide_network(guide_model)
        guided = None
        if conditional:
            denoiser = guided = classifier_free_guidance(
                self.model, conditional, unconditional, scales, interval=_as_intervals(guidance_interval),
                schedule=self.schedule, rescale=guidance_rescale, guide_model=guide,
            )
        elif guide is not None or guidance_interval is not None or guidance_rescale:
            raise ValueError("guidance_interval, guidance_rescale and guide_model need a conditional model")
        else:  # an unconditional model: nothing to guide

            def denoiser(pyramid: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
                return self.model(pyramid, t)

        if precision == "bf16":
            denoiser = _in_bf16(denoiser, self.device)

        generator = self._generator(generator)
        noise = [
            torch.randn((batch, *shape), generator=generator, device=self.device) for shape in self.level_shapes()
        ]
        timesteps = spaced_timesteps(self.schedule.num_train_steps, num_inference_steps)
        extra = {}
        if init_image is not None:
            level, image = self._init_level(init_image, init_level)
            extra["replace_levels"] = sampling.condition_on_levels(
                {level: image.to(self.device)}, self.schedule.to(self.device), generator
            )
        result = sample_fn(
            denoiser,
            noise,
            self.schedule.to(self.device),
            timesteps,
            eta=eta,
            prediction=self.config.diffusion.prediction,
            threshold_kind=self.config.diffusion.threshold,
            generator=generator,
            callback=callback,
            progress=progress,
            **extra,
        )
        tensors = [level.float().cpu() for level in result]
        images = [_to_pil(sample) for sample in tensors[0]]
        levels = [[_to_pil(sample) for sample in level] for level in tensors] if output_levels else None
        evaluations = {"network_rows": guided.rows, "guide_rows": guided.guide_rows} if guided is not None else None
        return PipelineOutput(images=images, levels=levels, tensors=tensors, evaluations=evaluations)

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
        model = self.config.model
        if model.num_frames:
            top = (model.in_channels, model.num_frames, model.image_size, model.image_size)
            return level_shapes(top, model.scales, model.time_scales)
        return level_shapes((model.in_channels, model.image_size, model.image_size), model.scales)

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

    def _generator(self, generator: torch.Generator | int | None) -> torch.Generator:
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


def _as_intervals(value) -> GuidanceInterval | list[GuidanceInterval | None] | None:
    """guidance_interval as GuidanceInterval objects: (low, high) tuples are in sigma."""
    if value is None or isinstance(value, GuidanceInterval):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return GuidanceInterval(float(value[0]), float(value[1]))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_as_intervals(v) for v in value]  # type: ignore[misc]
    raise TypeError(f"guidance_interval must be (low, high), a GuidanceInterval or one per level, got {value!r}")


def _in_bf16(denoiser: sampling.Denoiser, device: torch.device) -> sampling.Denoiser:
    """The denoiser under bf16 autocast, its predictions handed back in float32."""

    def run(pyramid: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            predictions = denoiser(pyramid, t)
        return [p.float() for p in predictions]

    return run


def _to_pil(sample: torch.Tensor) -> Image.Image:
    """An image (C, H, W), or a clip (C, T, H, W) as its frames side by side."""
    if sample.ndim == 4:
        return make_grid(sample.transpose(0, 1), nrow=sample.shape[1], padding=0)
    return tensor_to_pil(sample)
