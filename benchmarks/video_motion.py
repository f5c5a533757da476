"""Do generated clips move the way their captions say? Motion-direction accuracy of a text-to-video model.

A small 3D-CNN motion classifier (matryoshka.video.motion, 4 directions + "still") is trained on real
moving Fashion-MNIST clips (or loaded from --classifier). For each direction, the model generates clips
from captions naming that direction ("a bag sliding to the right"); the table gives the share of clips
classified as moving in the asked direction, next to:
  real    held-out real clips (the classifier's own ceiling);
  still   the generated clips with their first frame repeated (a model that draws the item but never
          moves it);
  random  a uniformly random direction per clip (what ignoring the caption's direction scores; the
          expected values, 25% per direction and 50% for the axis).
"right axis" counts clips moving along the asked axis (horizontal for left/right, vertical for up/down)
whatever their sign. A training-free cross-check follows the brightness centroid: its direction
accuracy, its mean velocity along the asked direction (pixels per frame, signed: real clips +2) and its
speed along the asked axis (the mean of that velocity's magnitude: motion of either sign); the lower
levels' centroids are given too (in top-level pixels per top-level frame).

    OMP_NUM_THREADS=1 python benchmarks/video_motion.py --model runs/video-tiny/model \
        --classifier runs/motion-classifier --samples runs/video-tiny/motion-samples
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.video import DIRECTIONS, MovingFashionMNIST, motion_caption, save_video, tile_videos
from matryoshka.video.motion import (
    MOTION_CLASSES,
    STILL,
    centroid_directions,
    centroid_motion,
    load_motion_classifier,
    predict_directions,
    save_motion_classifier,
    train_motion_classifier,
    velocity_along,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a text-to-video model directory or bundled name")
    parser.add_argument("--classifier", type=Path, default=Path("runs/motion-classifier"),
                        help="motion classifier directory (trained and saved there if missing)")
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--per-direction", type=int, default=16, help="generated clips per direction")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", default="3.0", help="guidance scale(s), comma-separated: one row each")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--samples", type=Path, help="write one GIF per direction (and guidance) here")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    return parser.parse_args(argv)


def classifier(args: argparse.Namespace, num_frames: int, image_size: int, channels: int):
    if (args.classifier / "motion_classifier.safetensors").is_file():
        return load_motion_classifier(args.classifier)
    print(f"training the motion classifier ({args.classifier_steps} steps) ...", file=sys.stderr, flush=True)
    train = MovingFashionMNIST("train", num_frames=num_frames, image_size=image_size, channels=channels)
    model = train_motion_classifier(train, steps=args.classifier_steps, in_channels=channels, seed=args.seed)
    save_motion_classifier(model, args.classifier)
    return model


def scores(predicted: torch.Tensor, clips: torch.Tensor | None, asked: torch.Tensor) -> dict:
    """Per-direction and overall accuracy of `predicted` classes; centroid measures of `clips`."""
    row = {name: float((predicted[asked == d] == d).float().mean()) for d, name in enumerate(DIRECTIONS)}
    row["all"] = float((predicted == asked).float().mean())
    # Right axis (left/right vs up/down), either sign: separates "moves sideways when asked to" from the sign.
    row["axis"] = float(((predicted != STILL) & (predicted // 2 == asked // 2)).float().mean())
    row["still"] = float((predicted == STILL).float().mean())
    if clips is not None:
        along = velocity_along(centroid_motion(clips), asked)
        row["centroid"] = float((centroid_directions(clips) == asked).float().mean())
        row["velocity"] = float(along.mean())
        row["speed"] = float(along.abs().mean())
    return row


def chance_row() -> dict:
    """The expected scores of a uniformly random direction (no sampling noise)."""
    share = 1 / len(DIRECTIONS)
    return {**{name: share for name in DIRECTIONS}, "all": share, "axis": 2 * share, "still": 0.0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = MatryoshkaPipeline.from_pretrained(args.model)
    config = pipe.config.model
    if not config.num_frames:
        raise SystemExit(f"{args.model} is not a video model (model.num_frames = 0)")
    motion = classifier(args, config.num_frames, config.image_size, config.in_channels)
    n = args.per_direction
    asked = torch.arange(len(DIRECTIONS)).repeat_interleave(n)
    rows: dict[str, dict] = {}

    real_set = MovingFashionMNIST("test", num_frames=config.num_frames, image_size=config.image_size,
                                  channels=config.in_channels, seed=args.seed + 1)
    picks = random.Random(args.seed).sample(range(len(real_set) // 4), n)
    real = torch.stack([real_set[4 * i + d]["video"] for d in range(len(DIRECTIONS)) for i in picks])
    rows["real clips"] = scores(predict_directions(motion, real), real, asked)

    rng = random.Random(args.seed)
    captions = [motion_caption(i % 10, int(d), rng) for i, d in enumerate(asked.tolist())]
    timings = {}
    for guidance in [float(g) for g in args.guidance.split(",")]:
        started = time.perf_counter()
        clips, lower = [], []
        for d in range(len(DIRECTIONS)):
            out = pipe(captions[d * n : (d + 1) * n], num_inference_steps=args.steps, guidance_scale=guidance,
                       sampler=args.sampler, generator=args.seed + d, progress=False)
            clips.append(out.tensors[0])
            lower.append(out.tensors[1:])
            if args.samples:
                save_video(tile_videos(out.tensors[0]), args.samples / f"w{guidance:g}-{DIRECTIONS[d]}.gif", upscale=2)
        generated = torch.cat(clips)
        timings[guidance] = time.perf_counter() - started
        rows[f"generated, w={guidance:g}"] = scores(predict_directions(motion, generated), generated, asked)
        for r in range(1, config.num_levels):  # the centroid of the lower levels, in top-level pixels
            level = torch.cat([levels[r - 1] for levels in lower])
            factor = config.sizes[0] / config.sizes[r] * config.frames[r] / config.frames[0]
            along = velocity_along(centroid_motion(level), asked) * factor
            row = {"centroid": float((centroid_directions(level) == asked).float().mean()),
                   "velocity": float(along.mean()), "speed": float(along.abs().mean())}
            rows[f"generated, w={guidance:g}, level {r} ({config.frames[r]}x{config.sizes[r]} px)"] = row
        still = generated[:, :, :1].expand_as(generated)
        rows[f"still (w={guidance:g} first frames)"] = scores(predict_directions(motion, still), still, asked)
    rows["random direction (expected)"] = chance_row()

    header = ("| clips | " + " | ".join(DIRECTIONS)
              + " | all | right axis | classified still | centroid acc | velocity | speed |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, row in rows.items():
        cells = [f"{100 * row[d]:.0f}%" if d in row else "-" for d in (*DIRECTIONS, "all", "axis", "still")]
        cells += (
            [f"{100 * row['centroid']:.0f}%", f"{row['velocity']:+.2f}", f"{row['speed']:.2f}"]
            if "centroid" in row else ["-", "-", "-"]
        )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{n} clips per direction, {args.steps} {args.sampler} steps; classifier classes: "
          f"{', '.join(MOTION_CLASSES)}; sampling time: "
          + ", ".join(f"w={g:g}: {s:.0f} s" for g, s in timings.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "per_direction": n, "steps": args.steps,
                                         "sampling_seconds": timings, "model": str(args.model)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
