"""`matryoshka demo`: serve a local web page (gradio) that generates images with a model.

Bound to 127.0.0.1 unless --host says otherwise; a non-loopback host is served with a warning (there
is no authentication). Limits on steps, image count and prompt length are enforced on the server.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import os
import pickle
import sys
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR_OR_NAME",
        help="a model directory, a bundled model's name or a hub id (default: the embedded Fashion-MNIST "
        "text-to-image model)"
    )
    parser.add_argument(
        "--text-encoder", metavar="SPEC", help='text encoder spec overriding the model\'s ("minilm", "t5:/local/dir")'
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page to the network)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                        help="bf16: the network under bf16 autocast (see `matryoshka generate --help`). Default fp32")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the network's convolutions channels-last (same images; faster on a CPU)")
    parser.add_argument("--lora", type=Path, metavar="DIR", action="append", default=[],
                        help="a LoRA adapter directory to serve the model with (repeatable)")
    parser.add_argument("--lora-scale", type=float, action="append", default=[], metavar="S",
                        help="the weight of each --lora (default 1)")
    parser.add_argument("--guide-model", metavar="DIR_OR_NAME", default=None,
                        help="a weaker model of the same levels for autoguidance (the page then offers it)")
    parser.add_argument("--max-steps", type=int, default=100, help="most sampling steps a request may ask for")
    parser.add_argument("--max-images", type=int, default=4, help="most images a request may ask for")
    parser.add_argument("--max-prompt-chars", type=int, default=300, help="longest prompt accepted, in characters")
    parser.add_argument("--title", default=None, help="page title")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load_pipeline(args: argparse.Namespace):
    from matryoshka.commands.generate import resolve_model_dir
    from matryoshka.pipeline import MatryoshkaPipeline

    directory = resolve_model_dir(args.model)
    pipe = MatryoshkaPipeline.from_pretrained(directory, device=args.device, text_encoder=args.text_encoder)
    if args.channels_last:
        import torch

        pipe.to(memory_format=torch.channels_last)
    return pipe


def run(args: argparse.Namespace) -> int:
    # gradio must not phone home: the page is local and may run without a network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from matryoshka.demo import DemoLimits
    from matryoshka.typed_config import ConfigError

    def fail(message: str) -> int:
        print(f"matryoshka demo: error: {message}", file=sys.stderr)
        return 2

    from matryoshka.commands.common import check_device

    check_device(args.device)
    if not 1 <= args.port <= 65535:
        return fail(f"--port must be between 1 and 65535, got {args.port}")
    limits = DemoLimits(max_steps=args.max_steps, max_images=args.max_images, max_prompt_chars=args.max_prompt_chars)
    try:
        limits.validate()
    except ConfigError as error:
        reason = str(error).split(": ", 1)[-1]
        return fail(f"--{error.path.replace('_', '-')} {reason}, got {getattr(limits, error.path)!r}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail("the demo needs gradio: pip install 'matryoshka-diffusion[demo]'")
    try:
        pipe = _load_pipeline(args)
        from matryoshka.commands.generate import load_adapters

        load_adapters(pipe, args.lora, args.lora_scale)
        guide = None
        if args.guide_model is not None:
            from matryoshka.commands.generate import resolve_model_dir
            from matryoshka.pipeline import MatryoshkaPipeline

            guide = MatryoshkaPipeline.from_pretrained(
                resolve_model_dir(args.guide_model, "--guide-model"), device=args.device,
                text_encoder=pipe.text_encoder,
            )
            pipe.guide_network(guide)  # the same levels and conditioning, or a clear error now
    except (ValueError, TypeError, FileNotFoundError, pickle.UnpicklingError) as error:
        return fail(str(error))

    from matryoshka.demo import build_demo

    if not is_loopback(args.host):
        print(
            f"matryoshka demo: warning: listening on {args.host}: anyone who can reach this machine on port "
            f"{args.port} can use the model (there is no authentication). Use --host 127.0.0.1 to keep it local.",
            file=sys.stderr,
        )
    demo = build_demo(pipe, limits, title=args.title, precision=args.precision, guide=guide)
    print(f"matryoshka demo: serving on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    options = {"server_name": args.host, "server_port": args.port, "share": False, "show_error": True}
    if "ssr_mode" in inspect.signature(demo.launch).parameters:
        options["ssr_mode"] = False  # gradio >= 5 could render through a Node server; plain serving suffices
    demo.launch(**options)
    return 0
