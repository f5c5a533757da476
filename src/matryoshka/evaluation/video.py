"""Evaluate a text-to-video model: per-frame FID/KID against real clips' frames, the motion-direction
accuracy of prompts that name a direction, and frame-to-frame consistency. What `matryoshka eval` runs
for a video model.

    report = VideoEvaluator(VideoEvalSettings(num_clips=64)).evaluate(pipe, out_dir="eval/video")

Prompts are moving Fashion-MNIST captions ("a bag sliding to the right"): clip i asks for class
(i // 4) mod 10 moving in direction i mod 4, so classes and directions are balanced. The reference is the
same kind of clip rendered from the Fashion-MNIST test split at the model's size and frame count.

- frame FID / KID: the Inception features of every frame of every clip, against the real clips' frames
  (what a clip looks like, frame by frame), beside the floor: as many real training clips scored the same
  way (what a perfect model would get with this many clips);
- motion: a small 3D-CNN classifier (matryoshka.video.motion, trained on real clips and cached; 4
  directions + "still") says which way each clip moves: accuracy (the asked direction), axis accuracy
  (the asked axis, either sign) and the share classified as still, next to real clips and to still
  copies of the generated ones (first frame repeated: a model that never moves);
- consistency: the mean correlation of consecutive frames' pixels (1 = frozen, low = flicker), for the
  samples and the real clips.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from matryoshka.evaluation.fid import stats_key
from matryoshka.evaluation.report import plot_bars, write_json_report
from matryoshka.evaluation.run import cached_reference, default_cache_dir, distribution_metrics
from matryoshka.precision import PRECISIONS


@dataclass
class VideoEvalSettings:
    num_clips: int = 64  # generated clips (a multiple of 4 keeps the directions balanced)
    steps: int | None = None  # None: the model's recommended
    guidance: float | None = None
    sampler: str | None = None
    seed: int = 0
    batch_size: int = 16  # clips per pipeline call
    num_reference_clips: int = 256
    kid_subsets: int = 20
    kid_subset_size: int = 500
    classifier_steps: int = 300
    device: str = "cpu"
    precision: str = "fp32"  # the pipeline's while sampling (matryoshka.precision.PRECISIONS)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("num_clips", "batch_size", "num_reference_clips", "kid_subsets", "classifier_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_clips < 2:
            raise ValueError("num_clips must be >= 2")


def frame_consistency(clips: torch.Tensor) -> float:
    """Mean Pearson correlation between consecutive frames' pixels of clips (N, C, T, H, W)."""
    a, b = clips[:, :, :-1].float(), clips[:, :, 1:].float()
    a = a.transpose(1, 2).flatten(2)  # (N, T - 1, C * H * W)
    b = b.transpose(1, 2).flatten(2)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    correlation = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-8)
    return float(correlation.mean())


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N * T, C, H, W)."""
    return clips.transpose(1, 2).flatten(0, 1)


class VideoEvaluator:
    """Scores text-to-video pipelines; Inception, reference features and the motion classifier are loaded
    (or trained) once and cached in `cache_dir`."""

    def __init__(self, settings: VideoEvalSettings, cache_dir: str | Path | None = None, progress: bool = True,
                 classifier_dir: str | Path | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.progress = progress
        self.classifier_dir = classifier_dir
        self._extractor = None

    def inception(self):
        if self._extractor is None:
            from matryoshka.evaluation.inception import InceptionFeatureExtractor

            self._extractor = InceptionFeatureExtractor(device=self.settings.device)
        return self._extractor

    def real_clips(self, model_config, split: str = "test", count: int | None = None) -> torch.Tensor:
        """(N, C, T, S, S) real clips of `split`: the reference (test; num_reference_clips) or the floor."""
        from matryoshka.video import MovingFashionMNIST

        data = MovingFashionMNIST(split, num_frames=model_config.num_frames, image_size=model_config.image_size,
                                  channels=model_config.in_channels, caption_seed=0)
        count = min(count or self.settings.num_reference_clips, len(data))
        return torch.stack([data[i]["video"] for i in range(count)])

    def floor(self, model_config, reference) -> dict[str, Any]:
        """Frame FID/KID of num_clips real training clips against the reference (cached features)."""
        n = self.settings.num_clips
        description = {"floor": "moving_fashion_mnist/train frames", "clips": n, "frames": model_config.num_frames,
                       "size": model_config.image_size, "channels": model_config.in_channels}
        real = cached_reference(self.inception(), lambda: frames_of(self.real_clips(model_config, "train", n)),
                                description, self.cache_dir, progress=self.progress)
        metrics = distribution_metrics(real.features, reference, self.settings.kid_subsets,
                                       self.settings.kid_subset_size, seed=self.settings.seed)
        return {"clips": n, "frame_fid": metrics["fid"], "frame_kid": metrics["kid"]}

    def motion_classifier(self, model_config):
        from matryoshka.video import MovingFashionMNIST
        from matryoshka.video.motion import load_motion_classifier, save_motion_classifier, train_motion_classifier

        if self.classifier_dir is not None:
            return load_motion_classifier(self.classifier_dir), str(self.classifier_dir)
        description = {"classifier": "MotionClassifier", "frames": model_config.num_frames,
                       "size": model_config.image_size, "channels": model_config.in_channels,
                       "steps": self.settings.classifier_steps}
        directory = self.cache_dir / "motion-classifiers" / stats_key(description)
        try:
            return load_motion_classifier(directory), str(directory)
        except (FileNotFoundError, OSError):
            pass
        data = MovingFashionMNIST("train", num_frames=model_config.num_frames, image_size=model_config.image_size,
                                  channels=model_config.in_channels)
        model = train_motion_classifier(data, steps=self.settings.classifier_steps,
                                        in_channels=model_config.in_channels, progress=self.progress)
        save_motion_classifier(model, directory)
        return model, str(directory)

    def evaluate(self, pipe, out_dir: str | Path | None = None, model_name: str = "") -> dict[str, Any]:
        from matryoshka.video import DIRECTIONS, motion_caption, save_video, tile_videos
        from matryoshka.video.motion import STILL, predict_directions

        settings, config = self.settings, pipe.config.model
        if not pipe.is_video:
            raise ValueError("VideoEvaluator scores video models (model.num_frames > 0)")
        if not pipe.is_text_conditional:
            raise ValueError("the video evaluation prompts the model with motion captions: it must be text-conditional")
        timings: dict[str, float] = {}
        n = settings.num_clips
        classes = [(i // 4) % 10 for i in range(n)]
        directions = torch.tensor([i % 4 for i in range(n)])
        prompts = [motion_caption(c, int(d), random.Random(f"{settings.seed}/{i}"))
                   for i, (c, d) in enumerate(zip(classes, directions.tolist(), strict=True))]

        started = time.perf_counter()
        classifier, classifier_path = self.motion_classifier(config)
        timings["classifier"] = time.perf_counter() - started

        started = time.perf_counter()
        real = self.real_clips(config)
        description = {"reference": "moving_fashion_mnist/test frames", "clips": len(real),
                       "frames": config.num_frames, "size": config.image_size, "channels": config.in_channels}
        reference = cached_reference(self.inception(), lambda: frames_of(real), description, self.cache_dir,
                                     progress=self.progress)
        floor = self.floor(config, reference)
        timings["reference"] = time.perf_counter() - started

        started = time.perf_counter()
        generator = torch.Generator(device=pipe.device).manual_seed(settings.seed)
        batches = []
        for start in range(0, n, settings.batch_size):
            out = pipe(prompts[start : start + settings.batch_size], num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance, sampler=settings.sampler, generator=generator,
                       progress=False, precision=settings.precision)
            batches.append(out.tensors[0])
        clips = torch.cat(batches)
        timings["sampling"] = time.perf_counter() - started

        started = time.perf_counter()
        features = self.inception().extract(frames_of(clips), batch_size=64, progress=self.progress)
        metrics = distribution_metrics(features, reference, settings.kid_subsets, settings.kid_subset_size,
                                       seed=settings.seed)
        timings["frame_metrics"] = time.perf_counter() - started

        predicted = predict_directions(classifier, clips)
        still_copies = clips[:, :, :1].expand_as(clips).contiguous()
        predicted_still = predict_directions(classifier, still_copies)
        real_predicted = predict_directions(classifier, real)
        real_directions = torch.tensor([i % 4 for i in range(len(real))])

        def motion(pred: torch.Tensor, asked: torch.Tensor) -> dict[str, float]:
            axis = (pred < STILL) & ((pred // 2) == (asked // 2))
            return {"direction_accuracy": float((pred == asked).float().mean()),
                    "axis_accuracy": float(axis.float().mean()), "still": float((pred == STILL).float().mean())}

        per_direction = {name: float((predicted[directions == d] == d).float().mean())
                         for d, name in enumerate(DIRECTIONS)}
        report: dict[str, Any] = {
            "model": model_name,
            "model_config": {"sizes": list(config.sizes), "frames": list(config.frames),
                             "parameters": sum(p.numel() for p in pipe.model.parameters())},
            "settings": asdict(settings),
            "num_clips": n,
            "frame_fid": metrics["fid"],
            "frame_kid": metrics["kid"],
            "real_floor": floor,
            "motion": {**motion(predicted, directions), "per_direction": per_direction,
                       "real": motion(real_predicted, real_directions),
                       "still_copies": motion(predicted_still, directions), "chance": 0.25,
                       "classifier": classifier_path},
            "consistency": {"samples": frame_consistency(clips), "real": frame_consistency(real)},
            "timings_s": timings,
        }
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            save_video(tile_videos(clips[: min(16, n)]), out_dir / "samples.gif", upscale=2)
            plot_bars(per_direction, out_dir / "per_direction_accuracy.png", ylabel="asked direction classified",
                      title=f"motion: {report['motion']['direction_accuracy']:.0%} of clips move as asked")
            report["files"] = {"report": "report.json", "samples": "samples.gif",
                               "per_direction_accuracy": "per_direction_accuracy.png"}
            write_json_report(report, out_dir / "report.json")
        return report


__all__ = ["VideoEvalSettings", "VideoEvaluator", "frame_consistency", "frames_of"]
