"""`matryoshka quickstart`: train a tiny nested model on Fashion-MNIST (a few CPU minutes), then sample it.

Trains the packaged preset presets/fashion_tiny_32x16.yaml (a 32 px band over a 16 px core, class-
conditional; 150 core steps, then 150 nested) into --out with a progress bar, writes a grid of samples,
one labelled row per class, and prints what it wrote and what to try next.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESET = Path(__file__).resolve().parent.parent / "presets" / "fashion_tiny_32x16.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="run directory (default runs/quickstart)")
    parser.add_argument("--resume", action="store_true", help="continue a quickstart run in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing --out aside (to OUT.old-<time>, never deleted) and start afresh")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop training at step N of the preset's 300 (a shorter try)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages, errors only")


def run(args: argparse.Namespace) -> int:
    from matryoshka.commands.common import check_device, fail, set_aside
    from matryoshka.commands.train import next_command
    from matryoshka.data import DatasetNotFoundError, label_rows, make_grid
    from matryoshka.training import load_train_config, train

    check_device(args.device)
    if args.max_steps is not None and args.max_steps < 1:
        return fail("quickstart", f"--max-steps must be >= 1, got {args.max_steps}")
    if args.resume and args.overwrite:
        return fail("quickstart", "--resume continues the run in --out and --overwrite sets it aside: give one")
    if not args.resume and args.out.is_dir() and any(args.out.iterdir()):
        if not args.overwrite:
            return fail("quickstart", (
                f"--out {args.out} already holds files; continue it with --resume, choose another --out, or pass "
                "--overwrite to move it aside"
            ))
        moved = set_aside(args.out)
        if not args.quiet:
            print(f"moved the old {args.out} aside to {moved}")
    overrides = [f"device={args.device}", "logging.tensorboard=false", f"logging.progress={not args.quiet}"]
    config = load_train_config(PRESET, overrides)
    if not args.quiet:
        print(f"training {PRESET.name} into {args.out}: the 16 px core alone, then nested in the 32 px band")
    try:
        result = train(config, args.out, resume=args.resume, max_steps=args.max_steps, quiet=args.quiet)
    except DatasetNotFoundError as error:
        return fail("quickstart", str(error))
    if result.model_dir is None or not (result.model_dir / "config.yaml").is_file():
        return fail("quickstart", f"training wrote no model into {args.out}", code=1)

    from matryoshka.pipeline import MatryoshkaPipeline

    pipe = MatryoshkaPipeline.from_pretrained(result.model_dir, device=args.device)
    names = pipe.config.class_names or [str(i) for i in range(pipe.config.model.num_classes)]
    per_class = 8
    output = pipe(class_labels=[c for c in range(len(names)) for _ in range(per_class)], num_inference_steps=20,
                  guidance_scale=2.0, generator=0, progress=not args.quiet)
    grid = label_rows(make_grid(output.tensors[0], nrow=per_class), names, scale=3)
    samples = args.out / "samples.png"
    grid.save(samples)
    if not args.quiet:
        print(
            f"wrote\n  {result.model_dir}   the model (a model directory)\n  {samples}   {per_class} samples per "
            f"class\n  {args.out / 'samples'}   the previews of each stage\n"
            f"next:\n  {next_command(config, result.model_dir)}\n"
            f"  matryoshka demo --model {result.model_dir}\n"
            f"  matryoshka eval --model {result.model_dir} --num-samples 200 --out {args.out / 'eval'}"
        )
    return 0

