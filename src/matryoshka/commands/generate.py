"""`matryoshka generate "PROMPT" --out FILE.png`: sample images from a model directory, an official
ml-mdm checkpoint, or (with neither) the small text-to-image model embedded in the package."""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

from matryoshka.commands.common import UsageError, check_device, refuse_existing_file

DEFAULT_MODEL_NAME = "fashion-t2i"
TRAIN_HINT = (
    "train one with `matryoshka train configs/fashion_t2i_32x16_sigmoid.yaml --out runs/fashion-t2i` and pass its "
    "exported model directory with --model"
)


def default_model_dir() -> Path:
    """The embedded default model: src/matryoshka/assets/fashion-t2i (installed as package data)."""
    return Path(__file__).resolve().parent.parent / "assets" / DEFAULT_MODEL_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matryoshka.pipeline import available_samplers

    parser.add_argument("prompt", nargs="?", default=None, help="what to draw (omit for class-conditional models)")
    source = parser.add_argument_group("model (default: the embedded Fashion-MNIST text-to-image model)")
    source.add_argument("--model", metavar="DIR_OR_NAME",
                        help="a model directory (config.yaml + model.safetensors), a bundled model by name "
                        "(fashion-t2i) or a hub repository id (user/name)")
    source.add_argument("--official", type=Path, metavar="CKPT", help="an official ml-mdm checkpoint (vis_model.pth)")
    source.add_argument("--config", type=Path, metavar="YAML", help="the official YAML of --official")
    source.add_argument(
        "--text-encoder",
        metavar="SPEC",
        help='text encoder: "minilm", "t5:google/flan-t5-xl", "t5:/local/dir" (overrides the model\'s)',
    )
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's recommended, e.g. 50)")
    parser.add_argument(
        "--guidance", default=None,
        help="guidance scale w, or one per level highest first: 3 or 3,1 (default: the model's recommended; "
        "3 for the embedded model, 7.5 for the official ones)",
    )
    parser.add_argument("--negative-prompt", default=None, help='the unconditional branch (default "")')
    parser.add_argument(
        "--guidance-interval", metavar="LO,HI", default=None,
        help="guide only while each level's noise level is in [LO, HI] (one LO,HI for every level, or one per "
        "level separated by ';', 'always' = every step); steps outside skip the unconditional rows. "
        "Default: every step",
    )
    parser.add_argument(
        "--guidance-interval-unit", default="sigma", choices=["sigma", "logsnr", "t"],
        help="unit of --guidance-interval: sigma = sqrt((1 - g) / g) of the level's own schedule (default), "
        "logsnr, or t (the sampler's time index 0..1000)",
    )
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="guidance rescale phi in [0, 1] (as diffusers' guidance_rescale; default 0 = off)")
    parser.add_argument("--lora", type=Path, metavar="DIR", action="append", default=[],
                        help="a LoRA adapter directory (a run's lora/); repeat for several, they add up")
    parser.add_argument("--lora-scale", type=float, action="append", default=[], metavar="S",
                        help="the weight of each --lora (default 1; one per --lora, in order)")
    parser.add_argument("--guide-model", metavar="DIR_OR_NAME", default=None,
                        help="autoguidance: guide with this weaker model directory (same levels and conditioning) "
                        "instead of the unconditional branch")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (a grid when > 1)")
    parser.add_argument("--sampler", default=None, choices=available_samplers(),
                        help="sampler (default: the model's recommended, e.g. ddim)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    parser.add_argument("--class", dest="class_label", metavar="NAME_OR_ID", help="class of a class-conditional model")
    parser.add_argument("--all-levels", action="store_true", help="also write FILE.level{i}.png for every level")
    parser.add_argument("--save-each", action="store_true",
                        help="also write every image (or clip) on its own: FILE.{i}.png (with --all-levels, "
                        "also FILE.{i}.level{r}.png)")
    parser.add_argument("--scale", type=int, default=1, metavar="N",
                        help="enlarge the written images or clips N times (nearest neighbour, for viewing small "
                        "models; default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (without it an existing --out is refused, nothing "
                        "is written)")
    parser.add_argument("--init-image", type=Path, metavar="PNG",
                        help="super-resolution / variations: pin a low level to this image (see --init-level)")
    parser.add_argument("--init-level", type=int, default=None,
                        help="level the init image pins (0 = highest; default: the level of its size, else the core)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
        help="bf16 / fp16: run the network under that autocast (faster on GPUs and CPUs with AVX512-BF16; images "
        "differ slightly from fp32 ones; an fp16 step that overflows runs again in fp32). auto: the faster of bf16 "
        "and fp32 for this model and batch (measured once on a CPU, cached in $MATRYOSHKA_CACHE). Default fp32",
    )
    parser.add_argument(
        "--channels-last", action="store_true",
        help="run the network's convolutions channels-last (same images; faster on a CPU, see BENCHMARKS.md)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages, errors only")
    parser.add_argument("--fps", type=float, default=8.0, help="video models: frames per second (default 8)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output file: an image (.png), or for video models .gif or .mp4"
    )


def _guidance(text: str | None) -> float | list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--guidance must be a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _load_pipeline(args: argparse.Namespace):
    from matryoshka.pipeline import MatryoshkaPipeline

    if args.official is not None:
        if args.model is not None:
            raise ValueError("give either --model or --official, not both")
        return MatryoshkaPipeline.from_official(
            args.official, args.config, text_encoder=args.text_encoder, device=args.device
        )
    if args.config is not None:
        raise ValueError("--config is the official YAML of --official; a --model directory has its own config.yaml")
    return MatryoshkaPipeline.from_pretrained(
        resolve_model_dir(args.model), device=args.device, text_encoder=args.text_encoder
    )


def load_adapters(pipe, paths: list[Path], scales: list[float]) -> None:
    """--lora DIR (repeatable) with its --lora-scale: each adapter loaded under its directory's name."""
    if len(scales) > len(paths) or (scales and len(scales) != len(paths)):
        raise UsageError(f"give one --lora-scale per --lora ({len(paths)}), got {len(scales)}")
    for index, path in enumerate(paths):
        if not (path / "adapter.yaml").is_file():
            raise UsageError(f"--lora {path} is not a LoRA adapter directory (no adapter.yaml in it)")
        pipe.load_lora_weights(path, adapter_name=f"lora{index}", scale=scales[index] if scales else 1.0)


def resolve_model_dir(model: Path | str | None, flag: str = "--model") -> Path:
    """--model: a model directory, a bundled model's name ("fashion-t2i") or a hub repository id (from the
    hub cache, or downloaded); None: the embedded default model. FileNotFoundError naming what is missing."""
    from matryoshka.pipeline import resolve_pretrained

    if model is None:
        directory = default_model_dir()
        if not (directory / "config.yaml").is_file():
            raise FileNotFoundError(
                f"no --model given and the embedded default model is not installed ({directory} is missing); "
                + TRAIN_HINT
            )
        return directory
    try:
        return resolve_pretrained(model)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{flag} {model}: {error}") from None


def level_path(out: Path, level: int) -> Path:
    """FILE.png -> FILE.level{level}.png (level 0 = the highest resolution)."""
    return out.with_name(f"{out.stem}.level{level}{out.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        check_device(args.device)
        if args.num_images < 1:
            raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        if args.scale < 1:
            raise UsageError(f"--scale must be a whole number >= 1, got {args.scale}")
        guidance = _guidance(args.guidance)
        class_label = args.class_label
        if class_label is not None and class_label.strip().isdigit():
            class_label = int(class_label)
        init_image = None
        if args.init_image is not None:
            from PIL import Image, UnidentifiedImageError

            try:
                init_image = Image.open(args.init_image)
                init_image.load()
            except (OSError, UnidentifiedImageError) as error:
                raise ValueError(f"--init-image {args.init_image}: not a readable image ({error})") from None
        pipe = _load_pipeline(args)
        load_adapters(pipe, args.lora, args.lora_scale)
        steps = args.steps if args.steps is not None else pipe.config.sampling.num_inference_steps
        if steps > pipe.schedule.num_train_steps:
            raise UsageError(
                f"--steps {steps}: must be between 1 and {pipe.schedule.num_train_steps} (the model's training steps)"
            )
        sampler = args.sampler or pipe.config.sampling.sampler
        _check_out(args.out, pipe.is_video)
        for path in _planned_outputs(args, pipe):
            refuse_existing_file(path, "--out", args.overwrite)
        interval = None
        if args.guidance_interval is not None:
            from matryoshka.guidance import parse_intervals

            try:
                interval = parse_intervals(
                    args.guidance_interval, args.guidance_interval_unit, pipe.config.model.num_levels
                )
            except ValueError as error:
                raise ValueError(f"--guidance-interval {args.guidance_interval!r}: {error}") from None
        if not 0 <= args.guidance_rescale <= 1:
            raise ValueError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
        guide = None
        if args.guide_model is not None:
            from matryoshka.pipeline import MatryoshkaPipeline

            guide = MatryoshkaPipeline.from_pretrained(
                resolve_model_dir(args.guide_model, "--guide-model"), device=args.device,
                text_encoder=pipe.text_encoder,
            )
        if args.channels_last:
            pipe.to(memory_format=torch.channels_last)
        seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        started = time.perf_counter()
        output = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            class_labels=class_label,
            num_inference_steps=steps,
            guidance_scale=guidance,
            sampler=sampler,
            eta=args.eta,
            generator=seed,
            num_images_per_prompt=args.num_images,
            progress=not args.quiet,
            init_image=init_image,
            init_level=args.init_level,
            precision=args.precision,
            guidance_interval=interval,
            guidance_rescale=args.guidance_rescale,
            guide_model=guide,
        )
        elapsed = time.perf_counter() - started
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError, pickle.UnpicklingError) as error:
        print(f"matryoshka generate: error: {error}", file=sys.stderr)
        return 2

    args.out.parent.mkdir(parents=True, exist_ok=True)
    what = f"{len(output.images)} {'video(s)' if pipe.is_video else 'image(s)'}, {steps} {sampler} steps"
    if pipe.is_video:
        written = _write_videos(output.tensors, args)
    else:
        written = _write_images(output.tensors, args)
    if not args.quiet:
        print(f"seed {seed}: {what} in {elapsed:.1f} s -> " + ", ".join(str(p) for p in written))
    return 0


def _enlarged(image, scale: int):
    from PIL import Image

    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _image_of(tensor, scale: int):
    """One image (C, S, S), or a grid of a batch (B, C, S, S), enlarged `scale` times."""
    from matryoshka.data import make_grid, tensor_to_pil

    if tensor.ndim == 3 or tensor.shape[0] == 1:
        return _enlarged(tensor_to_pil(tensor if tensor.ndim == 3 else tensor[0]), scale)
    nrow = max(1, int(tensor.shape[0] ** 0.5 + 0.999))
    return _enlarged(make_grid(tensor, nrow=nrow), scale)


def _write_images(tensors: list, args: argparse.Namespace) -> list[Path]:
    """--out (the top level: one image, or a grid), FILE.level{r}.png, FILE.{i}.png (see _planned_outputs)."""
    written = []
    for path, tensor in _image_outputs(tensors, args):
        _image_of(tensor, args.scale).save(path)
        written.append(path)
    return written


def _image_outputs(tensors: list, args: argparse.Namespace) -> list[tuple[Path, object]]:
    outputs = [(args.out, tensors[0])]
    levels = range(len(tensors)) if args.all_levels else []
    outputs += [(level_path(args.out, level), tensors[level]) for level in levels]
    for i, each in enumerate(_each_paths(args.out, tensors[0].shape[0]) if args.save_each else []):
        outputs.append((each, tensors[0][i]))
        outputs += [(level_path(each, level), tensors[level][i]) for level in levels]
    return outputs


def _each_paths(out: Path, count: int) -> list[Path]:
    """--save-each: FILE.{i}.EXT for every sample of a batch (none for a single sample, --out is it)."""
    return [out.with_name(f"{out.stem}.{i}{out.suffix or '.png'}") for i in range(count)] if count > 1 else []


def _planned_outputs(args: argparse.Namespace, pipe) -> list[Path]:
    """Every file this call will write (checked before sampling, so nothing is overwritten unasked)."""
    import torch

    count = args.num_images
    shapes = [torch.zeros(count, 1, 1, 1)] * pipe.config.model.num_levels  # stand-ins: only the count matters
    if pipe.is_video:
        from matryoshka.video.io import level_video_path

        levels = range(len(shapes)) if args.all_levels else []
        return [path for clip, _ in _video_outputs(args, count)
                for path in (clip, *[level_video_path(clip, r) for r in levels])]
    return [path for path, _ in _image_outputs(shapes, args)]


def _check_out(out: Path, is_video: bool) -> None:
    from matryoshka.video.io import VIDEO_FORMATS

    if is_video and out.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"this is a video model: --out must end in {' or '.join(VIDEO_FORMATS)}, got {out}")
    if not is_video and out.suffix.lower() in VIDEO_FORMATS:
        raise ValueError(f"this is an image model: --out {out} asks for a video; use .png")


def _video_outputs(args: argparse.Namespace, count: int) -> list[tuple[Path, int | None]]:
    """(path, sample index) of every top-level clip: --out (None: every sample, tiled into one clip) and,
    with --save-each, FILE.{i}.gif for sample i. With --all-levels each also gets its FILE.level{r}."""
    eaches = _each_paths(args.out, count) if args.save_each else []
    return [(args.out, None), *[(each, i) for i, each in enumerate(eaches)]]


def _write_videos(tensors: list, args: argparse.Namespace) -> list[Path]:
    """The clips of _video_outputs (the files _planned_outputs checked), enlarged --scale times."""
    from matryoshka.video import save_video, save_video_levels, tile_videos

    written = []
    for path, index in _video_outputs(args, len(tensors[0])):
        levels = tensors if index is None else [level[index : index + 1] for level in tensors]
        top = levels[0]
        written.append(save_video(top[0] if len(top) == 1 else tile_videos(top), path, args.fps, args.scale))
        if args.all_levels:
            written += save_video_levels(levels, path, args.fps, args.scale)
    return written
