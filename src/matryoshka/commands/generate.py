"""`matryoshka generate "PROMPT" --out FILE.png`: sample images from a model directory, an official
ml-mdm checkpoint, or (with neither) the small text-to-image model embedded in the package."""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "fashion-t2i"
TRAIN_HINT = (
    "train one with `matryoshka train configs/fashion_t2i_32x16.yaml --out runs/fashion-t2i` and pass its "
    "exported model directory with --model"
)


def default_model_dir() -> Path:
    """The embedded default model: src/matryoshka/assets/fashion-t2i (installed as package data)."""
    return Path(__file__).resolve().parent.parent / "assets" / DEFAULT_MODEL_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matryoshka.pipeline import available_samplers

    parser.add_argument("prompt", nargs="?", default=None, help="what to draw (omit for class-conditional models)")
    source = parser.add_argument_group("model (default: the embedded Fashion-MNIST text-to-image model)")
    source.add_argument("--model", type=Path, help="a model directory (config.yaml + model.safetensors)")
    source.add_argument("--official", type=Path, metavar="CKPT", help="an official ml-mdm checkpoint (vis_model.pth)")
    source.add_argument("--config", type=Path, metavar="YAML", help="the official YAML of --official")
    source.add_argument(
        "--text-encoder",
        metavar="SPEC",
        help='text encoder: "minilm", "t5:google/flan-t5-xl", "t5:/local/dir" (overrides the model\'s)',
    )
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument(
        "--guidance", default="7.5", help="guidance scale w, or one per level highest first: 7.5 or 7.5,3 (default 7.5)"
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
    parser.add_argument("--guide-model", type=Path, metavar="DIR", default=None,
                        help="autoguidance: guide with this weaker model directory (same levels and conditioning) "
                        "instead of the unconditional branch")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (a grid when > 1)")
    parser.add_argument("--sampler", default="ddim", choices=available_samplers(), help="sampler (default ddim)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    parser.add_argument("--class", dest="class_label", metavar="NAME_OR_ID", help="class of a class-conditional model")
    parser.add_argument("--all-levels", action="store_true", help="also write FILE.level{i}.png for every level")
    parser.add_argument("--init-image", type=Path, metavar="PNG",
                        help="super-resolution / variations: pin a low level to this image (see --init-level)")
    parser.add_argument("--init-level", type=int, default=None,
                        help="level the init image pins (0 = highest; default: the level of its size, else the core)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"],
        help="bf16: run the network under bf16 autocast (faster on GPUs and CPUs with AVX512-BF16; images "
        "differ slightly from fp32 ones). Default fp32",
    )
    parser.add_argument(
        "--channels-last", action="store_true",
        help="run the network's convolutions channels-last (same images; about 1.13x faster on a CPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--fps", type=float, default=8.0, help="video models: frames per second (default 8)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output file: an image (.png), or for video models .gif or .mp4"
    )


def _guidance(text: str) -> float | list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--guidance must be a number or comma-separated numbers, got {text!r}") from None
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


def resolve_model_dir(model: Path | None) -> Path:
    """--model, or the embedded default model when it is None; FileNotFoundError naming what is missing."""
    if model is None:
        directory = default_model_dir()
        if not (directory / "config.yaml").is_file():
            raise FileNotFoundError(
                f"no --model given and the embedded default model is not installed ({directory} is missing); "
                + TRAIN_HINT
            )
        return directory
    if not (model / "config.yaml").is_file():
        raise FileNotFoundError(f"--model {model} is not a model directory (no config.yaml in it)")
    return model


def level_path(out: Path, level: int) -> Path:
    """FILE.png -> FILE.level{level}.png (level 0 = the highest resolution)."""
    return out.with_name(f"{out.stem}.level{level}{out.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    import torch

    from matryoshka.data import make_grid, tensor_to_pil

    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
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
                resolve_model_dir(args.guide_model), device=args.device, text_encoder=pipe.text_encoder
            )
        if args.channels_last:
            pipe.to(memory_format=torch.channels_last)
        _check_out(args.out, pipe.is_video)
        seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        started = time.perf_counter()
        output = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            class_labels=class_label,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            sampler=args.sampler,
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
    except (ValueError, TypeError, FileNotFoundError, pickle.UnpicklingError) as error:
        print(f"matryoshka generate: error: {error}", file=sys.stderr)
        return 2

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if pipe.is_video:
        written = _write_videos(output.tensors, args)
        print(
            f"seed {seed}: {len(output.images)} video(s), {args.steps} {args.sampler} steps in {elapsed:.1f} s -> "
            + ", ".join(str(p) for p in written)
        )
        return 0
    nrow = max(1, int(len(output.images) ** 0.5 + 0.999))
    written = []
    top = output.images[0] if len(output.images) == 1 else make_grid(output.tensors[0], nrow=nrow)
    top.save(args.out)
    written.append(args.out)
    if args.all_levels:
        for level, tensor in enumerate(output.tensors):
            path = level_path(args.out, level)
            image = make_grid(tensor, nrow=nrow) if tensor.shape[0] > 1 else tensor_to_pil(tensor[0])
            image.save(path)
            written.append(path)
    print(
        f"seed {seed}: {len(output.images)} image(s), {args.steps} {args.sampler} steps in {elapsed:.1f} s -> "
        + ", ".join(str(p) for p in written)
    )
    return 0


def _check_out(out: Path, is_video: bool) -> None:
    from matryoshka.video.io import VIDEO_FORMATS

    if is_video and out.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"this is a video model: --out must end in {' or '.join(VIDEO_FORMATS)}, got {out}")
    if not is_video and out.suffix.lower() in VIDEO_FORMATS:
        raise ValueError(f"this is an image model: --out {out} asks for a video; use .png")


def _write_videos(tensors: list, args: argparse.Namespace) -> list[Path]:
    """The top level to --out (several samples tiled into one clip); every level with --all-levels."""
    from matryoshka.video import save_video, save_video_levels, tile_videos

    top = tensors[0]
    written = [save_video(top[0] if len(top) == 1 else tile_videos(top), args.out, fps=args.fps)]
    if args.all_levels:
        written += save_video_levels(tensors, args.out, fps=args.fps)
    return written
