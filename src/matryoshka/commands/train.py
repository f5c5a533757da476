"""`matryoshka train CONFIG.yaml --out DIR [--resume] [--max-steps N] [--set key=value ...]`.

Distributed: `torchrun --nproc_per_node N -m matryoshka.cli train CONFIG.yaml --out DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", type=Path,
        help="training YAML (see configs/); with --resume it defaults to DIR/config.yaml",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, samples, model)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in DIR")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in a DIR that holds a run: the old run is moved aside to DIR.old-<time> (never deleted). "
        "Without --resume or --overwrite, a non-empty DIR is refused before anything is written",
    )
    parser.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines, errors only")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop at global step N")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: torch's choice; 1 is often fastest for tiny models on a busy CPU)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-4 --set stages.0.steps=200 (values are YAML)",
    )


def run(args: argparse.Namespace) -> int:
    from matryoshka.commands.common import check_device, fail, set_aside
    from matryoshka.data import DataFaultError
    from matryoshka.training import load_train_config, train
    from matryoshka.training.checkpoint import RunWriteError
    from matryoshka.training.loop import NonFiniteLossError
    from matryoshka.typed_config import ConfigError

    config_path = args.config
    if config_path is None:
        if not args.resume:
            print("matryoshka train: a CONFIG.yaml is required (or --resume with an existing --out)", file=sys.stderr)
            return 2
        config_path = args.out / "config.yaml"
    if not config_path.is_file():
        print(f"matryoshka train: config file {config_path} does not exist", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 0:
        print("matryoshka train: --max-steps must be >= 0", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("matryoshka train: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if args.resume and args.overwrite:
        return fail("train", "--resume continues the run in --out and --overwrite sets it aside: give one of them")
    overrides = list(args.overrides)
    if args.device is not None:
        if args.device != "auto":
            check_device(args.device)
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("logging.progress=false")
    try:
        config = load_train_config(config_path, overrides)
        if config.device not in ("auto",):
            check_device(config.device, "device (in the config)")
        if not args.resume and _holds_files(args.out):
            if not args.overwrite:
                return fail("train", (
                    f"--out {args.out} already holds files (a run?); nothing was written. Continue it with --resume, "
                    "choose another --out, or pass --overwrite to move it aside and start afresh"
                ))
            if _is_main_process():
                moved = set_aside(args.out)
                print(f"matryoshka train: moved the old {args.out} aside to {moved}", file=sys.stderr)
        result = train(config, args.out, resume=args.resume, max_steps=args.max_steps, quiet=args.quiet)
    except ConfigError as err:
        print(f"matryoshka train: invalid config {config_path}: {err}", file=sys.stderr)
        return 2
    except (DataFaultError, NonFiniteLossError, RunWriteError) as err:
        print(f"matryoshka train: stopped: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:  # a dataset, model directory or checkpoint that is not there
        print(f"matryoshka train: {err}", file=sys.stderr)
        return 2
    if result.model_dir is not None and not args.quiet:
        print(f"model: {result.model_dir}\nnext: {next_command(config, result.model_dir)}")
    return 0


def next_command(config, model_dir: Path) -> str:
    """A `matryoshka generate` command that works for the trained model's kind of conditioning."""
    model = config.mdm.model
    out = "sample.gif" if model.num_frames else "sample.png"
    command = f"matryoshka generate --model {model_dir} --num-images 4 --out {out}"
    if model.num_classes:
        names = config.mdm.class_names
        label = names[0] if names else "0"
        return command + f" --class {label!r}" if " " in label or "/" in label else command + f" --class {label}"
    if model.text_dim:
        prompt = (config.logging.sample_prompts or ["a photo"])[0]
        return f'matryoshka generate "{prompt}" --model {model_dir} --num-images 4 --out {out}'
    return command


def _holds_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
