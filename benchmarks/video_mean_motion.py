"""Does a text-to-video model know, at high noise, which way the caption says things move?

At high noise the best estimate of the clean clip is the average of all clips with that caption: for
moving Fashion-MNIST "a bag moving right" averages to a blur drifting right by the whole path (7 px over
8 frames in the 16 px core). This script prints, for a few captions and noise levels, how far the
centroid of the model's x0 estimate moves from the first frame to the last (dx, dy in core pixels), next
to the same measure on the data's own average clip. A model that has learned the caption's direction
shows the data's sign; one whose motion only arises later in sampling (from the noise) shows ~0.

    python benchmarks/video_mean_motion.py --model runs/video-tiny/model
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.video.motion import centroid_track
from matryoshka.video.moving_fashion_mnist import DIRECTIONS, MovingFashionMNIST


def centroid_motion(x0: torch.Tensor) -> tuple[float, float]:
    """x0 (N, 1, T, S, S) in [-1, 1] -> mean (dx, dy) of the brightness centroid, last frame minus first."""
    track = centroid_track(x0.clamp(-1, 1)).mean(dim=0)  # (T, 2)
    dx, dy = (track[-1] - track[0]).tolist()
    return dx, dy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a moving-Fashion-MNIST text-to-video model directory")
    parser.add_argument("--item", default="a bag", help="the item named in the captions")
    parser.add_argument("--samples", type=int, default=16, help="noise draws per caption")
    parser.add_argument("--times", default="990,950,850,700,500", help="network times to probe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = MatryoshkaPipeline.from_pretrained(args.model)
    model = pipe.model.eval()
    shapes = pipe.level_shapes()
    core = len(shapes) - 1
    if len(shapes[core]) != 4:
        raise SystemExit("not a video model")
    frames, side = shapes[core][1], shapes[core][-1]

    data = MovingFashionMNIST(num_frames=pipe.config.model.num_frames, image_size=pipe.config.model.image_size)
    pool = pipe.config.model.image_size // side
    print(f"model {args.model}: core {frames} x {side} px; "
          "centroid motion (dx, dy) in core pixels, first to last frame\n")
    header = "| | " + " | ".join(DIRECTIONS) + " | no caption |"
    print(header)
    print("|---" * (len(DIRECTIONS) + 2) + "|")
    row = []
    for direction in range(len(DIRECTIONS)):
        clips = torch.stack([data[4 * i + direction]["video"] for i in range(200)])
        n, c, t, h, w = clips.shape
        small = F.avg_pool2d(clips.transpose(1, 2).reshape(n * t, c, h, w), pool).reshape(n, t, c, side, side)
        row.append(centroid_motion(small.transpose(1, 2).mean(0, keepdim=True)))
    print("| data: average clip | " + " | ".join(f"{dx:+.2f}, {dy:+.2f}" for dx, dy in row) + " | |")

    captions = [f"{args.item} moving {d}" for d in DIRECTIONS] + [""]
    embedding = pipe.text_encoder(captions)
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(args.samples, *shape, generator=generator) for shape in shapes]
    for time in (int(v) for v in args.times.split(",")):
        alpha_bar = pipe.schedule.at(torch.tensor([time]))[core]
        cells = []
        for i in range(len(captions)):
            states = embedding.states[i : i + 1].expand(args.samples, -1, -1)
            mask = embedding.mask[i : i + 1].expand(args.samples, -1)
            with torch.no_grad():
                prediction = model(noise, torch.full((args.samples,), time), text_states=states, text_mask=mask)[core]
            x0 = pyramid_x0(noise[core], prediction, alpha_bar, pipe.config.diffusion.prediction)
            cells.append(centroid_motion(x0))
        print(f"| model x0 at t={time} | " + " | ".join(f"{dx:+.2f}, {dy:+.2f}" for dx, dy in cells) + " |")
    return 0


def pyramid_x0(x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    from matryoshka import pyramid

    return pyramid.convert(x_t, prediction, alpha_bar, kind, "x0")


if __name__ == "__main__":
    sys.exit(main())
