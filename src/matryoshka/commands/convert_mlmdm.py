"""`matryoshka convert-mlmdm CHECKPOINT --config CONFIG.yaml --out DIR`: official -> our model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matryoshka.interop import OfficialConfigError, UnsafeCheckpointError, load_official
from matryoshka.model_dir import MDMConfig, save_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="official vis_model.pth (read without unpickling code)")
    parser.add_argument("--config", type=Path, default=None,
                        help="the official YAML config; default: the config pickled in the checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="if --out holds files, move them aside to OUT.old-<time> (never deleted) and write "
                        "there; without it such an --out is refused")
    parser.add_argument("--text-encoder", default="t5:google/flan-t5-xl",
                        help="text encoder spec recorded in the model directory (default: %(default)s)")
    parser.add_argument("--text-dim", type=int, default=None,
                        help="width of the text states when the config leaves it at -1 (default: from the weights)")


def run(args: argparse.Namespace) -> int:
    from matryoshka.commands.common import fail, set_aside

    occupied = args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir()))
    if occupied and not args.overwrite:
        return fail("convert-mlmdm", (
            f"--out {args.out} already exists and is not empty; choose another --out or pass --overwrite to "
            "move it aside"
        ))
    try:
        model, model_config, diffusion_config = load_official(args.checkpoint, args.config, args.text_dim)
    except (UnsafeCheckpointError, OfficialConfigError, OSError) as error:
        print(f"matryoshka convert-mlmdm: refused {args.checkpoint}: {error}", file=sys.stderr)
        return 1
    config = MDMConfig(
        model=model_config,
        diffusion=diffusion_config,
        text_encoder=args.text_encoder if model_config.text_dim > 0 else None,
    )
    card = (
        f"# Converted ml-mdm model\n\nConverted from `{args.checkpoint.name}` with "
        f"`matryoshka convert-mlmdm`.\n\n- levels: {model_config.sizes}\n- parameters: "
        f"{sum(p.numel() for p in model.parameters()):,}\n- text encoder: {config.text_encoder}\n"
    )
    if occupied:
        print(f"matryoshka convert-mlmdm: moved the old {args.out} aside to {set_aside(args.out)}", file=sys.stderr)
    save_model_dir(args.out, model, config, card)
    print(f"wrote {args.out} ({model_config.num_levels} levels {model_config.sizes}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
