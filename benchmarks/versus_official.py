"""Our training and guided sampling steps against the official ml-mdm code's, on the same architecture
and the same weights.

    python -m venv --system-site-packages /tmp/venv-official
    /tmp/venv-official/bin/pip install einops torchinfo simple-parsing==0.1.5 "dataclass-wizard<0.30" boto3 mlx-data
    git clone https://github.com/apple/ml-mdm /tmp/ml-mdm
    /tmp/venv-official/bin/python benchmarks/versus_official.py --official-src /tmp/ml-mdm/ml-mdm-matryoshka

The architecture is an official checkpoint (default: the conformance fixture `nested_tiny`, 32 over 16
px, masked cross-attention, FFN, micro-conditioning; 1.3M parameters), read by the official code from
its YAML and loaded by ours with `load_official`. Steps, each in its own spawned process
(perf_common.IsolatedRuns), taking turns round by round:
- official train: `NestedDiffusion.get_loss` on a batch, backward, gradient clipping and
  `torch.optim.AdamW`, as the official `train_batch` does (fp32; bf16: under CPU autocast);
- ours train: the trainer's step (perf_common.build_train_step: our loss, backward, gradient clipping, the
  trainer's AdamW);
- sample: one denoiser call on 2 x batch rows (a guided step, both branches in one batch).
The official code imports torchvision for an image-saving helper it never calls here; its process gets
a stand-in module for it, since torchvision's registry builds do not import beside our torch.
`--profile train` (or sample) shows instead where the fp32 step's time goes, op by op, in both codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import types
import typing
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import (  # noqa: E402
    IsolatedRuns,
    Options,
    Workload,
    fmt_speedup,
    forward_runs,
    machine_line,
    train_step_runs,
)
from profile_ops import _mean_profile, op_profile  # noqa: E402

from matryoshka.interop.mlmdm import load_official, read_checkpoint  # noqa: E402
from matryoshka.models.memory_format import set_memory_format  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ml-mdm" / "nested_tiny"
OURS = {  # the trainer's defaults: fused AdamW, gradients clipped
    "fp32": Options(optimizer="auto", grad_clip=1.0),
    "bf16": Options(precision="bf16", optimizer="auto", grad_clip=1.0),
    "bf16+cl": Options(precision="bf16", channels_last=True, optimizer="auto", grad_clip=1.0),
    "compiled": Options(compile=True, optimizer="auto", grad_clip=1.0),
}


def build_dataclass(cls: type, values: dict):
    """An official config dataclass from its YAML dict: nested dataclasses and enums by their field types;
    keys the class does not have are left out (the YAML's top level mixes several configs)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, kind = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = build_dataclass(kind, value)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(value, str):
            value = kind[value]
        kwargs[f.name] = value
    return cls(**kwargs)


def _import_official(source: str):
    sys.path.insert(0, source)
    if "torchvision" not in sys.modules:  # only ml_mdm.diffusion's save_image, never called here
        stand_in = types.ModuleType("torchvision")
        stand_in.utils = types.ModuleType("torchvision.utils")
        stand_in.utils.save_image = lambda *args, **kwargs: None
        sys.modules.update({"torchvision": stand_in, "torchvision.utils": stand_in.utils})
    from ml_mdm import diffusion
    from ml_mdm.models import nested_unet

    return diffusion, nested_unet


def official_runs(source: str, fixture: str, kind: str, precision: str, batch: int) -> tuple[dict, dict]:
    """IsolatedRuns builder: the official code's training step or guided denoiser call."""
    diffusion, nested_unet = _import_official(source)
    official = yaml.safe_load((Path(fixture) / "config.yaml").read_text())
    network = nested_unet.NestedUNet(3, 3, build_dataclass(nested_unet.NestedUNetConfig, official["unet_config"]))
    network.load_state_dict(read_checkpoint(Path(fixture) / "vis_model.pth")[0])
    config = build_dataclass(diffusion.NestedDiffusionConfig, official["diffusion_config"])
    model = diffusion.NestedDiffusion(network, config)
    inputs = _official_batch(official, network, batch)
    bf16 = precision == "bf16"
    if kind == "train":
        model.train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0, eps=1e-8)

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = model.get_loss(inputs)[0]
                loss = losses.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    else:
        model.eval()
        rows = {k: torch.cat([v, v]) for k, v in inputs.items()}
        pyramid = [torch.randn(2 * batch, 3, s, s) for s in _sizes(official, network)]
        times = torch.randint(0, 1000, (2 * batch,))

        @torch.no_grad()
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.model(pyramid, times, rows["lm_outputs"], rows["lm_mask"], {})

    run()
    return {"run": run}, {"params": sum(p.numel() for p in network.parameters())}


def _sizes(official: dict, network) -> list[int]:
    """Each level's size, top first (the official nest_ratio: each lower level's scale from the base)."""
    scales = network.nest_ratio + [1]
    return [official["sample_image_size"] * s // scales[0] for s in scales]


def _official_batch(official: dict, network, batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    size, dim = official["sample_image_size"], official["unet_config"]["conditioning_feature_dim"]
    return {"images": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
            "lm_outputs": torch.randn(batch, 32, dim, generator=generator),
            "lm_mask": torch.ones(batch, 32, dtype=torch.long)}


def ours_runs(fixture: str, kind: str, path: str, batch: int) -> tuple[dict, dict]:
    """IsolatedRuns builder: our trainer's step or guided denoiser call on the official checkpoint."""
    model, model_config, diffusion_config = load_official(Path(fixture) / "vis_model.pth",
                                                          Path(fixture) / "config.yaml")
    options = OURS[path]
    workload = Workload("official checkpoint", model_config, diffusion_config, batch)
    model = set_memory_format(model, torch.channels_last if options.channels_last else torch.preserve_format)
    if kind == "train":
        runs, info = train_step_runs(workload, options, model=model)
    else:
        runs, info = forward_runs(workload, options, 2 * batch, model=model)
    return runs, {**info, "params": workload.parameters}


def print_profile(args) -> None:
    """Op by op (torch.profiler, self CPU time per step), the official fp32 step beside ours, in this
    process, taking turns over 3 rounds of 5 profiled steps after 3 warm-up steps."""
    torch.set_num_threads(args.threads)
    runs = {"official": official_runs(args.official_src, str(args.fixture), args.kind_profiled, "fp32",
                                      args.batch)[0]["run"],
            "ours": ours_runs(str(args.fixture), args.kind_profiled, "fp32", args.batch)[0]["run"]}
    for run in runs.values():
        for _ in range(3):
            run()
    rounds: dict[str, list] = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            rounds[name].append(op_profile(run, 5))
    (official, official_wall), (ours, ours_wall) = (_mean_profile(rounds[name]) for name in runs)
    print(f"{args.kind_profiled} step, batch {args.batch}, fp32, {args.threads} thread(s)\n")
    print("| op | official ms/step | ours ms/step | calls official | calls ours |")
    print("|---|---:|---:|---:|---:|")
    nothing = (0.0, 0)
    for name in sorted(set(official) | set(ours), key=lambda n: -max(official.get(n, nothing)[0],
                                                                       ours.get(n, nothing)[0]))[:15]:
        (a, calls_a), (b, calls_b) = official.get(name, nothing), ours.get(name, nothing)
        print(f"| {name} | {a / 1e3:.2f} | {b / 1e3:.2f} | {calls_a} | {calls_b} |")
    print()
    for name, ops, wall in (("official", official, official_wall), ("ours", ours, ours_wall)):
        in_ops = sum(us for us, _ in ops.values()) / 1e6
        print(f"{name}: {wall * 1e3:.1f} ms/step under the profiler; ops' self time {in_ops * 1e3:.1f} ms "
              f"({in_ops / wall:.0%}); {sum(c for _, c in ops.values())} op calls per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", required=True, help="the ml-mdm-matryoshka folder of apple/ml-mdm")
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="an official checkpoint folder "
                        "(vis_model.pth, config.yaml)")
    parser.add_argument("--paths", nargs="+", default=["fp32", "bf16", "compiled"], choices=list(OURS))
    parser.add_argument("--kinds", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", dest="kind_profiled", choices=["train", "sample"], default=None,
                        help="instead: where the fp32 step's time goes, op by op, official beside ours")
    args = parser.parse_args()
    if not (Path(args.official_src) / "ml_mdm").is_dir():
        parser.error(f"--official-src {args.official_src}: no ml_mdm package in it")
    if not (args.fixture / "vis_model.pth").is_file():
        parser.error(f"--fixture {args.fixture}: no vis_model.pth in it")
    if args.kind_profiled:
        print(f"machine: {machine_line()}")
        return print_profile(args)
    print(f"machine: {machine_line()}; {args.threads} thread(s) per process, {args.rounds} rounds of "
          f"{args.calls} calls\n")
    print("| step | official fp32 | official bf16 | ours fp32 | ours over official fp32 | ours bf16 over official "
          "bf16 | " + " | ".join(f"ours {p} over official fp32" for p in args.paths if p != "fp32") + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * (len(args.paths) - 1))
    for kind in args.kinds:
        with IsolatedRuns(args.threads) as isolated:
            for precision in ("fp32", "bf16"):
                isolated.add(f"official {precision}", official_runs, args.official_src, str(args.fixture), kind,
                             precision, args.batch)
            for path in args.paths:
                isolated.add(f"ours {path}", ours_runs, str(args.fixture), kind, path, args.batch)
            params = {name: info["params"] for name, info in isolated.info.items()}
            if len(set(params.values())) != 1:
                raise SystemExit(f"the two models differ in size: {params}")
            timings = isolated.time_round_robin(args.rounds, args.calls, torch.device("cpu"))
        official, ours = timings["official fp32"], timings["ours fp32"]
        cells = [f"{kind} (batch {args.batch}{'' if kind == 'train' else f', {2 * args.batch} rows'})",
                 f"{1e3 * official.median:.1f} ms", f"{1e3 * timings['official bf16'].median:.1f} ms",
                 f"{1e3 * ours.median:.1f} ms", fmt_speedup(official, ours)]
        cells.append(fmt_speedup(timings["official bf16"], timings["ours bf16"]) if "bf16" in args.paths else "-")
        cells += [fmt_speedup(official, timings[f"ours {p}"]) for p in args.paths if p != "fp32"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
