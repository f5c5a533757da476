"""Sampler quality against the number of steps: how close each sampler gets to the ODE's solution.

For every sampler (ddim, ddpm, dpmpp_2m, euler, heun) and every step count K, samples are drawn from
the same initial noise with the official spacing (`spaced_timesteps(T, K)`, which starts at t_0 < T).
The distance is the RMSE (pixel values in [-1, 1]) of the top level (and of the base level) to a
reference that integrates the same probability-flow ODE from the same t_0 and the same noise with many
steps: DPM-Solver++(2M) with --reference-steps steps (default 250). A 250-step DDIM(eta = 0) reference
is computed too and its distance to the DPM-Solver++ one is printed: it bounds how accurate the
reference itself is (on a Gaussian problem with a closed-form flow, 250-step DDIM is off by ~3e-3 and
250-step DPM-Solver++ by ~1e-5, see tests/test_schedulers.py; on a learned model, which is smooth in t only
down to about one time index, many-step solvers agree to ~0.005, see BENCHMARKS.md). ddpm is
stochastic: its distance is to the ODE solution, i.e. how far an ancestral sample lands from the
deterministic one, not an error.

Models: --model DIR (a model directory), else the embedded model src/matryoshka/assets/fashion-t2i when
it exists, else --quick-train N trains a small class-conditional 32/16 model on Fashion-MNIST for N
steps first (saved to --save-model) so that the denoiser is at least a learned one.

    python benchmarks/sampler_quality.py --model runs/fashion/model --samples 32 --markdown table.md
    python benchmarks/sampler_quality.py --quick-train 1500 --save-model runs/sampler-bench-model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from matryoshka import pyramid as pyr
from matryoshka import sampling
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.schedule import spaced_timesteps
from matryoshka.schedulers import available_schedulers, make_scheduler

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "matryoshka" / "assets" / "fashion-t2i"


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, load average {load:.1f} "
            f"(torch {torch.__version__})")


def quick_train(steps: int, out: Path, device: torch.device, seed: int, batch: int = 32) -> Path:
    """A small class-conditional 32/16 NestedUNet trained briefly on Fashion-MNIST (10% null labels,
    for guidance). Only a stand-in for a real model: its samples are blurry, but its denoiser is learned."""
    from matryoshka.data import CLASS_NAMES, FashionMNIST
    from matryoshka.losses import multi_resolution_loss
    from matryoshka.model_dir import MDMConfig, save_model_dir
    from matryoshka.models import LevelConfig, ModelConfig, NestedUNet

    torch.manual_seed(seed)
    outer = LevelConfig([32, 32], [1, 1], norm_groups=8, temb_dim=128)
    core = LevelConfig([32, 64], [1, 1], attention_layers=[0, 1], num_heads=4, norm_groups=8, temb_dim=128)
    model_config = ModelConfig(levels=[outer, core], image_size=32, in_channels=1, num_classes=10)
    model_config.validate()
    diffusion = DiffusionConfig()
    config = MDMConfig(model=model_config, diffusion=diffusion, class_names=list(CLASS_NAMES))
    schedule = PyramidSchedule.from_config(diffusion, model_config.scales).to(device)
    model = NestedUNet(model_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = max(1, steps // 20)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / steps)
    )
    data = FashionMNIST("train", 32, 1, download=False)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(data), (batch,), generator=generator)
        items = [data[int(i)] for i in index]
        images = torch.stack([item["image"] for item in items]).to(device)
        labels = torch.tensor([item["label"] for item in items], device=device)
        drop = torch.rand(batch, generator=generator).to(device) < 0.1
        labels = torch.where(drop, torch.full_like(labels, model_config.num_classes), labels)
        clean = schedule.scale_signal(pyr.build_pyramid(images, model_config.scales))
        noise = pyr.sample_noise(clean)
        t = torch.randint(0, diffusion.num_train_steps, (batch,), device=device)
        gammas = schedule.at(t + 1)
        noisy = [pyr.add_noise(x, e, g) for x, e, g in zip(clean, noise, gammas, strict=True)]
        loss = multi_resolution_loss(model(noisy, t, labels=labels), clean, noise, noisy, t, schedule, diffusion)
        optimizer.zero_grad(set_to_none=True)
        loss.total.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}/{steps} loss {loss.total.mean().item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    card = f"Benchmark stand-in: trained {steps} steps (batch {batch}) on Fashion-MNIST by sampler_quality.py."
    return save_model_dir(out, model.eval(), config, card=card)


def make_denoiser(directory: Path, device: torch.device, samples: int, guidance: float):
    """The guided denoiser of a model directory for `samples` rows, its schedule and its config."""
    from matryoshka.pipeline import MatryoshkaPipeline

    pipe = MatryoshkaPipeline.from_pretrained(directory, device=device)
    config = pipe.config
    conditional: dict = {}
    unconditional: dict = {}
    names = config.class_names or [str(i) for i in range(max(config.model.num_classes, 1))]
    if pipe.is_text_conditional:
        from matryoshka.conditioning import pad_embeddings

        classes = config.class_names or ["shirt", "sneaker", "bag", "dress", "ankle boot"]
        prompts = [f"a photo of a {classes[i % len(classes)].lower()}" for i in range(samples)]
        cond, uncond = pad_embeddings([pipe.text_encoder.encode(prompts), pipe.text_encoder.encode([""] * samples)])
        conditional.update(text_states=cond.states.to(device), text_mask=cond.mask.to(device))
        unconditional.update(text_states=uncond.states.to(device), text_mask=uncond.mask.to(device))
        what = f"text prompts 'a photo of a <class>', guidance {guidance}"
    elif pipe.is_class_conditional:
        labels = torch.arange(samples, device=device) % config.model.num_classes
        conditional["labels"] = labels
        unconditional["labels"] = torch.full_like(labels, config.model.num_classes)
        what = f"class labels {', '.join(names[:3])}, ..., guidance {guidance}"
    else:
        what = "unconditional"
    if conditional:
        denoiser = classifier_free_guidance(pipe.model, conditional, unconditional, guidance)
    else:
        def denoiser(pyramid, t):
            return pipe.model(pyramid, t)
    return denoiser, pipe.schedule.to(device), config, what


class CountingDenoiser:
    """Counts network evaluations (NFE): Heun calls the network twice per step."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, pyramid, t):
        self.calls += 1
        return self.denoiser(pyramid, t)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--label", default="", help="how to name the model in the table (default: its path)")
    parser.add_argument("--quick-train", type=int, default=0, metavar="STEPS",
                        help="without a model: train a small stand-in for STEPS steps first")
    parser.add_argument("--save-model", type=Path, default=Path("runs/sampler-bench-model"))
    parser.add_argument("--samples", type=int, default=16, help="samples per run (one batch)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--methods", nargs="+", default=available_schedulers(), choices=available_schedulers())
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--reference-steps", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each run this many times and keep the fastest (shared machines are noisy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    directory, model_note = args.model, ""
    if directory is None and EMBEDDED.is_dir():
        directory, model_note = EMBEDDED, "the embedded model"
    if directory is None:
        if args.quick_train <= 0:
            parser.error("no --model given and the embedded model does not exist yet: pass --model or --quick-train N")
        train_start = time.perf_counter()
        directory = quick_train(args.quick_train, args.save_model, device, args.seed)
        model_note = (f"STAND-IN: small class-conditional 32/16 model trained {args.quick_train} steps here "
                      f"({time.perf_counter() - train_start:.0f} s), not the embedded model")
    denoiser, schedule, config, what = make_denoiser(directory, device, args.samples, args.guidance)
    model_note = args.label or model_note or str(directory)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    noise = [
        torch.randn((args.samples, config.model.in_channels, size, size), generator=generator, device=device)
        for size in config.model.sizes
    ]
    options = dict(prediction=config.diffusion.prediction, threshold=config.diffusion.threshold)
    T = schedule.num_train_steps

    def run_sampler(denoiser, noise, schedule, timesteps, method, generator=None, **options):
        scheduler = make_scheduler(method)
        scheduler.set_timesteps(None, schedule, timesteps=timesteps, **options)
        return sampling.sample(denoiser, noise, scheduler, generator=generator)

    references: dict[int, list[torch.Tensor]] = {}
    reference_notes = []
    for num_steps in sorted(set(args.steps)):
        start = int(spaced_timesteps(T, num_steps)[0])
        if start in references:
            continue
        grid = torch.linspace(start, 0, args.reference_steps + 1).round().long().unique_consecutive()
        references[start] = run_sampler(denoiser, noise, schedule, grid, "dpmpp_2m", **options)
        if reference_notes:  # the DDIM cross-check once (at the smallest K's start) is enough
            continue
        ddim = run_sampler(denoiser, noise, schedule, grid, "ddim", **options)
        reference_notes.append(
            f"t0 = {start}: {args.reference_steps}-step DDIM vs {args.reference_steps}-step DPM-Solver++ reference: "
            f"top RMSE {rmse(ddim[0], references[start][0]):.4f}"
        )
        print(reference_notes[-1], flush=True)

    rows = []
    for method in args.methods:
        for num_steps in args.steps:
            timesteps = spaced_timesteps(T, num_steps)
            seconds = float("inf")
            for _ in range(max(1, args.repeats)):
                counted = CountingDenoiser(denoiser)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                out = run_sampler(
                    counted, noise, schedule, timesteps, method,
                    generator=torch.Generator(device=device).manual_seed(args.seed + 1), **options,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = min(seconds, (time.perf_counter() - begin) / args.samples)
            reference = references[int(timesteps[0])]
            rows.append(dict(method=method, steps=num_steps, nfe=counted.calls, top_rmse=rmse(out[0], reference[0]),
                             base_rmse=rmse(out[-1], reference[-1]), seconds_per_sample=seconds))
            print(f"{method:9s} {num_steps:3d} steps  NFE {counted.calls:3d}  top RMSE {rows[-1]['top_rmse']:.4f}  "
                  f"base RMSE {rows[-1]['base_rmse']:.4f}  {seconds * 1000:.1f} ms/sample", flush=True)

    machine = machine_name(device)
    sizes = "/".join(str(s) for s in config.model.sizes)
    lines = [
        f"Machine: {machine}. Model: {model_note} ({sizes}, {what}). {args.samples} samples, seed {args.seed}.",
        f"Reference: DPM-Solver++(2M), {args.reference_steps} steps from the same t0 and noise. "
        + "; ".join(reference_notes) + ".",
        "",
        "| sampler | steps | NFE | top RMSE | base RMSE | ms / sample |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['steps']} | {row['nfe']} | {row['top_rmse']:.4f} | "
                     f"{row['base_rmse']:.4f} | {row['seconds_per_sample'] * 1000:.1f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, model=model_note, rows=rows,
                                             references=reference_notes), indent=2))


if __name__ == "__main__":
    main()
