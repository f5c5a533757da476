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
    from matryoshka.data import DataFaultError
    from matryoshka.training import load_train_config, train
    from matryoshka.training.checkpoint import CheckpointWriteError
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
    try:
        config = load_train_config(config_path, args.overrides)
        result = train(config, args.out, resume=args.resume, max_steps=args.max_steps)
    except ConfigError as err:
        print(f"matryoshka train: invalid config {config_path}: {err}", file=sys.stderr)
        return 2
    except (DataFaultError, NonFiniteLossError, CheckpointWriteError) as err:
        print(f"matryoshka train: stopped: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:  # a dataset, model directory or checkpoint that is not there
        print(f"matryoshka train: {err}", file=sys.stderr)
        return 2
    if result.model_dir is not None:
        print(f"model: {result.model_dir}  (try: matryoshka generate --model {result.model_dir} --out sample.png)")
    return 0
