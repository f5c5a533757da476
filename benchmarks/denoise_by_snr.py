"""How well each model denoises its top level at each noise level: x0 error against log-SNR.

For every model and every log-SNR lambda of a grid: the integer time t whose *top-level* log-SNR is
nearest lambda (each model has its own shifted schedule, so t differs between models), N held-out test
images noised to it at every level with the same top-level noise for every model, one conditional
network call (class labels, no guidance), and the mean squared error of the top level's x0 estimate.
A nested model whose top band denoises worse than a plain UNet at high lambda lacks detail; at low lambda,
structure. The sampler and guidance play no part: this is the denoiser the training loss measures,
split by noise level.

    python benchmarks/denoise_by_snr.py --fit resize --models runs/study/study64/a/seed1/model \
        runs/study/study64/c/seed1/model
"""

from __future__ import annotations

import argparse

import torch
from perf_common import machine_line

from matryoshka import pyramid as pyr
from matryoshka import schedule as sched
from matryoshka.data import FashionMNIST
from matryoshka.pipeline import MatryoshkaPipeline


@torch.no_grad()
def top_level_error(pipe: MatryoshkaPipeline, images: torch.Tensor, labels: torch.Tensor, log_snr: float,
                    seed: int) -> tuple[int, float, float]:
    """(t, the top level's log-SNR at t, its mean squared x0 error) at the time whose top-level log-SNR is
    nearest log_snr.

    images: (N, C, S, S) in [-1, 1] at the model's top size; labels: (N,) class indices.
    """
    schedule, diffusion = pipe.schedule, pipe.config.diffusion
    top_log_snr = sched.log_snr(schedule.gammas[0, 1:])  # time t has noise level gammas[:, t + 1]
    t = int((top_log_snr - log_snr).abs().argmin())
    clean = schedule.scale_signal(pyr.build_pyramid(images, pipe.config.model.scales))
    top_noise = torch.Generator().manual_seed(seed)  # the same top-level noise for every model
    low_noise = torch.Generator().manual_seed(seed + 1)
    noise = [torch.randn(x.shape, generator=top_noise if r == 0 else low_noise) for r, x in enumerate(clean)]
    times = torch.full((len(images),), t, dtype=torch.long)
    gammas = schedule.at(times + 1)
    noisy = [pyr.add_noise(x, z, g) for x, z, g in zip(clean, noise, gammas, strict=True)]
    inputs = [pyr.model_input(x, g, diffusion.prediction) for x, g in zip(noisy, gammas, strict=True)]
    predictions = pipe.model(inputs, times, labels=labels)
    estimate = pyr.convert(noisy[0], predictions[0], gammas[0], diffusion.prediction, "x0")
    return t, float(top_log_snr[t]), float((estimate - clean[0]).pow(2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--images", type=int, default=500, help="held-out test images per noise level")
    parser.add_argument("--log-snr", type=float, nargs="+", default=[-6, -4, -2, 0, 2, 4, 6, 8])
    parser.add_argument("--fit", choices=["pad", "resize"], default="pad",
                        help="how the 28 px test images reach the models' size: as the models were trained")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        pipes = {model: MatryoshkaPipeline.from_pretrained(model) for model in args.models}
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--models: {error}")
    if len({pipe.config.model.sizes[0] for pipe in pipes.values()}) != 1:
        parser.error("--models: every model must have the same top size")
    if any(not pipe.is_class_conditional for pipe in pipes.values()):
        parser.error("--models: this benchmark needs class-conditional models (it passes the test labels)")
    torch.set_num_threads(1)
    top = next(iter(pipes.values())).config.model.sizes[0]
    test = FashionMNIST("test", image_size=top, channels=1, fit=args.fit)
    images = torch.stack([test.image_tensor(i) for i in range(args.images)])
    labels = torch.as_tensor([int(c) for c in test.labels[: args.images]])
    print(f"# {machine_line()}; {args.images} test images, fit {args.fit}, noise seed {args.seed}")
    print("| top-level log-SNR | " + " | ".join(f"{m}: x0 MSE (t, its log-SNR)" for m in pipes)
          + " | x0 MSE ratio, last / first |")
    print("|---:|" + "---:|" * (len(pipes) + 1))
    for log_snr in args.log_snr:
        cells, errors = [], []
        for pipe in pipes.values():
            t, actual, error = top_level_error(pipe, images, labels, log_snr, args.seed)
            cells.append(f"{error:.5f} ({t}, {actual:.2f})")
            errors.append(error)
        print(f"| {log_snr:g} | " + " | ".join(cells) + f" | {errors[-1] / errors[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
