"""The `matryoshka` command: a thin dispatcher over `matryoshka.commands.*`.

Each subcommand lives in its own module under `matryoshka/commands/` and exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so that
`matryoshka --help` stays fast and a missing optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep alphabetical.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert-mlmdm": ("matryoshka.commands.convert_mlmdm", "convert an official ml-mdm checkpoint"),
    "demo": ("matryoshka.commands.demo", "serve a local web page (gradio) that generates images with a model"),
    "eval": ("matryoshka.commands.eval", "score a model: FID/KID, precision/recall, conditioning accuracy"),
    "generate": ("matryoshka.commands.generate", "generate images from a prompt (or class) with a trained model"),
    "quickstart": ("matryoshka.commands.quickstart", "train a tiny nested model on Fashion-MNIST, then sample"),
    "train": ("matryoshka.commands.train", "train a nested model from a YAML config (progressive stages, resume, DDP)"),
}

KEEP_FREED_MEMORY = {"demo", "eval", "generate"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matryoshka", description="Matryoshka Diffusion Models: train, sample, evaluate."
    )
    parser.add_argument("--version", "-V", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in sorted(COMMANDS.items()):
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        # Only the chosen command's module is imported for its arguments (see main()).
    return parser


def version_line() -> str:
    import torch

    from matryoshka import __version__

    return f"matryoshka {__version__} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] in ("--version", "-V"):
        print(version_line())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(sorted(COMMANDS))}")
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"matryoshka {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    if name in KEEP_FREED_MEMORY:
        # The command owns the process: keep freed CPU memory for reuse (no page faults on every
        # sampling step's fresh activations; BENCHMARKS.md, "Performance"). `train` follows its config's
        # optim.keep_freed_memory instead.
        from matryoshka.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    from matryoshka.commands.common import UsageError, fail, missing_extra_message, quiet_libraries

    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return int(module.run(args) or 0)
    except UsageError as error:
        return fail(name, str(error))
    except ImportError as error:
        message = missing_extra_message(error)
        if message is None:
            raise
        return fail(name, message)


if __name__ == "__main__":
    sys.exit(main())
