"""Evaluate a trained model: sample it, then FID/KID/precision-recall against a reference set and
conditioning fidelity with a classifier. The orchestration behind ``matryoshka eval``.

    evaluator = Evaluator(EvalSettings(num_samples=1000, steps=20), cache_dir="~/.cache/matryoshka/eval")
    report = evaluator.evaluate(MatryoshkaPipeline.from_pretrained("runs/fashion/model"), out_dir="eval/")

One ``Evaluator`` keeps the Inception network, the reference features and the classifier loaded, so
scoring many checkpoints (benchmarks/study.py) pays for them once. Everything expensive that depends
only on the reference data is cached on disk under a key naming what produced it
(``matryoshka.evaluation.stats_key``): reference Inception features and statistics, and classifiers
trained on the fly.

Conditioning: class-conditional models get balanced labels (sample i asks for class i mod K); text
models get a Fashion-MNIST caption naming class i mod 10 (``matryoshka.data.caption_for_label``), so
the class each sample should show is known either way and a classifier can check it.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from matryoshka.atomic import atomic_path
from matryoshka.data import CLASS_NAMES, FashionMNIST, ImageFolderDataset, caption_for_label, make_grid
from matryoshka.evaluation.classifier import (
    ClassifierConfig,
    SmallCNNClassifier,
    conditioning_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from matryoshka.evaluation.fid import (
    FeatureStats,
    cached_feature_stats,
    fid_from_stats,
    kid,
    precision_recall,
    stats_key,
)
from matryoshka.evaluation.inception import INCEPTION_FEATURE_DIM, InceptionFeatureExtractor
from matryoshka.evaluation.report import plot_bars, write_json_report
from matryoshka.precision import PRECISIONS

__all__ = [
    "FASHION_MNIST",
    "EvalSettings",
    "Evaluator",
    "ReferenceSet",
    "balanced_labels",
    "cached_reference",
    "default_cache_dir",
    "distribution_metrics",
    "fid_from_features",
    "load_reference_images",
    "reference_set",
]

ArrayLike = np.ndarray | torch.Tensor
FASHION_MNIST = "fashion_mnist"
MAX_PLOTTED_CLASSES = 50  # beyond this a bar chart is unreadable: the numbers stay in report.json
# What a report says about FID at small N (the estimator's bias grows as N shrinks).
SMALL_N_NOTE = (
    "FID from {n} samples: the estimate is biased upward roughly in proportion to 1/N and varies with the "
    "seed, so compare FIDs only at equal N and reference set; KID is unbiased and the better guide at small N"
)


def default_cache_dir() -> Path:
    """``$MATRYOSHKA_CACHE/eval``, or ``~/.cache/matryoshka/eval``."""
    base = os.environ.get("MATRYOSHKA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "matryoshka") / "eval"


@dataclass
class EvalSettings:
    """How a model is evaluated (every field is recorded in the report).

    Args:
        num_samples: images generated and scored.
        steps: sampler steps per image.
        guidance: classifier-free guidance scale, one float or one per level (highest first).
        sampler: a scheduler shorthand (``matryoshka.schedulers.available_schedulers``: "ddim", ...).
        seed: seeds the sampler noise, the captions and the KID subsets.
        batch_size: images generated (and classified) per forward pass.
        reference: ``"fashion_mnist"`` (the test split, fitted to the model's size), an image folder, or an
            ``.npz`` of reference statistics as other FID tools write them (``mu`` and ``sigma`` of the
            2048-d pool features; then FID only: KID and precision/recall need the features).
        fit: how Fashion-MNIST's 28 px images are fitted to the model's size, for the reference, the
            real-data floor and a classifier trained on the fly: ``"pad"`` (centred on a black canvas),
            ``"resize"``, or ``"auto"`` (pad when the model is at least 28 px, else resize). Use the fit
            the model was trained with (``data.fit`` of its training config).
        num_reference: reference images used (the first ones: the test split, or the sorted folder).
        kid_subsets, kid_subset_size: KID is averaged over this many random subsets of this size
            (capped by the smaller of the two sets).
        pr_k: k of the k-NN manifolds of precision/recall.
        classifier_epochs, classifier_width: for a classifier trained on the fly on Fashion-MNIST.
        device: where the model, Inception and the classifier run.
        prompts: the prompts of a text-to-image model (sample i gets prompts[i % len]); None: Fashion-MNIST
            captions naming class i mod 10, which only makes sense against the fashion_mnist reference.
        prompt_labels: the class each prompt names (for the fidelity classifier); None: not measured.
        clip_model: a CLIP (hub id or directory) for the CLIP score of a text model; None: not measured.
        precision: the pipeline's while sampling ("fp32", "bf16", "fp16" or "auto": the faster of bf16
            and fp32 for the model; matryoshka.precision). Compare FIDs at equal precision.
    """

    num_samples: int = 1000
    steps: int = 20
    guidance: float | list[float] = 2.0
    sampler: str = "ddim"
    seed: int = 0
    batch_size: int = 100
    reference: str = FASHION_MNIST
    fit: Literal["auto", "pad", "resize"] = "auto"
    num_reference: int = 2000
    kid_subsets: int = 20
    kid_subset_size: int = 1000
    pr_k: int = 3
    classifier_epochs: int = 2
    classifier_width: int = 16
    device: str = "cpu"
    prompts: list[str] | None = None
    prompt_labels: list[int] | None = None
    clip_model: str | None = None
    precision: str = "fp32"

    def resolved_fit(self, image_size: int) -> str:
        """The Fashion-MNIST fit at `image_size`: `fit`, with "auto" made concrete."""
        if self.fit != "auto":
            return self.fit
        return "pad" if image_size >= 28 else "resize"

    def validate(self) -> None:
        checks = [
            (self.fit in ("auto", "pad", "resize"), "fit", "must be auto, pad or resize"),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}"),
            (self.num_samples >= 2, "num_samples", "must be >= 2 (FID needs a covariance)"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.num_reference >= 2, "num_reference", "must be >= 2"),
            (self.kid_subsets >= 1, "kid_subsets", "must be >= 1"),
            (self.kid_subset_size >= 2, "kid_subset_size", "must be >= 2"),
            (self.pr_k >= 1, "pr_k", "must be >= 1"),
            (self.num_samples > self.pr_k, "num_samples", f"must exceed pr_k = {self.pr_k} (precision/recall)"),
            (self.classifier_epochs >= 1, "classifier_epochs", "must be >= 1"),
            (self.classifier_width >= 1, "classifier_width", "must be >= 1"),
        ]
        if self.prompts is not None:
            checks.append((len(self.prompts) >= 1, "prompts", "must hold at least one prompt"))
            if self.prompt_labels is not None:
                checks.append((len(self.prompt_labels) == len(self.prompts), "prompt_labels",
                               f"must give one class per prompt ({len(self.prompts)})"))
        guidance = [self.guidance] if isinstance(self.guidance, int | float) else list(self.guidance)
        checks.append((bool(guidance) and all(math.isfinite(w) for w in guidance), "guidance", "must be finite"))
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------------
# Features -> numbers: the path every FID of a report takes


def fid_from_features(sample_features: ArrayLike, reference: FeatureStats | ArrayLike) -> float:
    """FID of ``(N, D)`` sample features against reference features ``(M, D)`` or their FeatureStats.

    Features -> mean and unbiased covariance (float64) -> Fréchet distance.
    """
    sample_stats = FeatureStats.from_features(sample_features)
    reference_stats = reference if isinstance(reference, FeatureStats) else FeatureStats.from_features(reference)
    return fid_from_stats(sample_stats, reference_stats)


@dataclass
class ReferenceSet:
    """Inception features ``(M, D)`` of the reference images, their statistics, and what made them."""

    features: np.ndarray | None  # None for statistics read from a .npz (FID only)
    stats: FeatureStats
    description: dict[str, Any]

    @property
    def key(self) -> str:
        return self.stats.key


def distribution_metrics(
    sample_features: ArrayLike,
    reference: ReferenceSet,
    kid_subsets: int = 20,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID (mean, std) and precision/recall of ``(N, D)`` sample features against ``reference``.

    The KID subset size is capped by the smaller set, so small evaluations still run.
    """
    samples = sample_features.detach().cpu().numpy() if isinstance(sample_features, torch.Tensor) else sample_features
    samples = np.asarray(samples)
    fid = fid_from_features(samples, reference.stats)
    if reference.features is None:  # statistics only
        return {"fid": fid, "kid": {"mean": None, "std": None, "subsets": 0, "subset_size": 0}, "precision": None,
                "recall": None, "pr_k": pr_k}
    subset_size = min(kid_subset_size, len(samples), len(reference.features))
    kid_mean, kid_std = kid(samples, reference.features, subsets=kid_subsets, subset_size=subset_size, seed=seed)
    pr = precision_recall(reference.features, samples, k=pr_k)
    return {
        "fid": fid,
        "kid": {"mean": kid_mean, "std": kid_std, "subsets": kid_subsets, "subset_size": subset_size},
        "precision": pr.precision,
        "recall": pr.recall,
        "pr_k": pr_k,
    }


def load_reference_stats(path: str | Path) -> FeatureStats:
    """Reference statistics from a .npz: ``mu`` / ``sigma`` (pytorch-fid, clean-fid, fid-helper-pytorch) or
    ``mean`` / ``cov`` (ours)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            mean_name, cov_name = ("mu", "sigma") if {"mu", "sigma"} <= names else ("mean", "cov")
            if not {mean_name, cov_name} <= names:
                raise ValueError(f"{path} holds {sorted(names)}; expected mu and sigma (or mean and cov)")
            mean, cov = np.asarray(data[mean_name], np.float64), np.asarray(data[cov_name], np.float64)
            n = int(data["n"]) if "n" in names else 0
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable reference statistics ({error})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return FeatureStats(mean=mean, cov=cov, n=n, key=f"npz-{digest}")


# ---------------------------------------------------------------------------------------------------
# Reference images, their cached features, and the classifier


def _folder_fingerprint(paths: Sequence[Path], root: Path) -> str:
    """Hash of the names, sizes and modification times of the files used: a changed folder is a new key."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def load_reference_images(
    spec: str, image_size: int, channels: int, limit: int, fit: str = "auto"
) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """``(load, description)`` of up to ``limit`` reference images at ``image_size``.

    ``spec``: ``"fashion_mnist"`` (the test split, 28 px centred on a black canvas of ``image_size``
    (``fit="pad"``) or resized (``"resize"``); ``"auto"``: pad unless smaller than 28) or a folder of
    images (resized + centre-cropped, sorted paths).
    ``load()`` returns ``(M, channels, S, S)`` in ``[-1, 1]``; the description identifies exactly
    those images (it is the cache key's input), and is cheap to build: nothing is decoded for it.
    """
    description: dict[str, Any] = {"image_size": image_size, "channels": channels}
    if spec == FASHION_MNIST:
        if fit == "auto":
            fit = "pad" if image_size >= 28 else "resize"
        dataset = FashionMNIST("test", image_size=image_size, channels=channels, fit=fit)
        count = min(limit, len(dataset))
        description.update(reference="fashion_mnist/test", fit=fit, n=count)

        def load() -> torch.Tensor:
            return torch.stack([dataset.image_tensor(i) for i in range(count)])

        return load, description
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"reference {spec!r} is neither {FASHION_MNIST!r} nor an existing image folder")
    folder = ImageFolderDataset(root, image_size=image_size, channels=channels, captions=False)
    paths = folder.paths[:limit]
    description.update(
        reference="folder", path=str(root.resolve()), n=len(paths), files=_folder_fingerprint(paths, root)
    )

    def load_folder() -> torch.Tensor:
        images = [folder[i]["image"] for i in range(len(paths))]
        if folder.faults.failed:
            raise ValueError(f"{folder.faults.failed} reference image(s) under {root} could not be read")
        return torch.stack(images)

    return load_folder, description


def reference_set(
    extractor: InceptionFeatureExtractor,
    spec: str,
    image_size: int,
    channels: int,
    limit: int,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    fit: str = "auto",
) -> ReferenceSet:
    """Reference features and statistics, from ``cache_dir`` when something identical made them before
    (or the statistics alone, from an ``.npz`` given as ``spec``).

    The cache key covers the images (dataset/split or folder contents, size, channels, count) and the
    extractor's fingerprint (weights + preprocessing); files: ``<key>.npz`` (statistics, see
    ``cached_feature_stats``), ``<key>.json`` (the description) and ``<key>.features.npy``.
    """
    if str(spec).endswith(".npz"):
        stats = load_reference_stats(spec)
        if stats.dim != INCEPTION_FEATURE_DIM:
            raise ValueError(
                f"reference statistics {spec} are {stats.dim}-d; the Inception pool features are "
                f"{INCEPTION_FEATURE_DIM}-d"
            )
        return ReferenceSet(features=None, stats=stats, description={"reference": "npz", "path": str(spec),
                                                                     "n": stats.n, "key": stats.key})
    load, description = load_reference_images(spec, image_size, channels, limit, fit)
    return cached_reference(extractor, load, description, cache_dir, batch_size, progress)


def cached_reference(
    extractor: InceptionFeatureExtractor, load: Callable[[], torch.Tensor], description: dict[str, Any],
    cache_dir: str | Path, batch_size: int = 64, progress: bool = True,
) -> ReferenceSet:
    """The Inception features and statistics of the images `load()` gives (N, C, S, S) in [-1, 1], computed
    once: cached in `cache_dir` under a key of `description` (which must identify the images) and the
    extractor's fingerprint."""
    description = {**description, "extractor": extractor.fingerprint}
    cache_dir = Path(cache_dir).expanduser()
    features_path = cache_dir / f"{stats_key(description)}.features.npy"
    if features_path.is_file():
        features = np.load(features_path, allow_pickle=False)
    else:
        features = extractor.extract(load(), batch_size=batch_size, progress=progress).numpy()
        with atomic_path(features_path) as temporary, open(temporary, "wb") as handle:
            np.save(handle, features)
    stats = cached_feature_stats(cache_dir, description, lambda: FeatureStats.from_features(features))
    if stats.n != len(features):
        raise ValueError(
            f"cache in {cache_dir} is inconsistent: statistics of {stats.n} images, {len(features)} features"
        )
    return ReferenceSet(features=features, stats=stats, description=description)


def fashion_mnist_classifier(
    cache_dir: str | Path,
    image_size: int,
    channels: int,
    epochs: int = 2,
    width: int = 16,
    seed: int = 0,
    progress: bool = True,
    fit: str = "auto",
) -> tuple[SmallCNNClassifier, str]:
    """A classifier trained on the Fashion-MNIST train split (cached); returns it and where it lives."""
    if fit == "auto":
        fit = "pad" if image_size >= 28 else "resize"
    description = {
        "classifier": "SmallCNNClassifier", "dataset": "fashion_mnist/train", "fit": fit, "image_size": image_size,
        "channels": channels, "epochs": epochs, "width": width, "seed": seed,
    }
    directory = Path(cache_dir).expanduser() / "classifiers" / stats_key(description)
    try:
        return load_classifier(directory), str(directory)
    except FileNotFoundError:
        pass
    dataset = FashionMNIST("train", image_size=image_size, channels=channels, fit=fit)
    images = torch.stack([dataset.image_tensor(i) for i in range(len(dataset))])
    labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    config = ClassifierConfig(in_channels=channels, image_size=image_size, num_classes=10, width=width)
    model = train_classifier(
        torch.utils.data.TensorDataset(images, labels), epochs, config=config, seed=seed, progress=progress
    )
    save_classifier(model, directory)
    return model, str(directory)


def _fit_to_classifier(images: torch.Tensor, classifier: SmallCNNClassifier) -> torch.Tensor:
    """Resize ``(N, C, S, S)`` images to the classifier's input size and channel count."""
    config = classifier.config
    if images.shape[1] == 3 and config.in_channels == 1:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-1] != config.image_size:
        images = F.interpolate(images, size=config.image_size, mode="bilinear", antialias=True, align_corners=False)
    return images


# ---------------------------------------------------------------------------------------------------
# Sampling


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """``(N,)`` labels cycling through the classes, so every class gets N // K or N // K + 1 samples."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torch.arange(num_samples) % num_classes


@dataclass
class Samples:
    """Generated top-level images ``(N, C, S, S)`` in ``[-1, 1]`` and what each was asked to show."""

    images: torch.Tensor
    labels: torch.Tensor | None  # (N,) requested classes; None for an unconditional model
    captions: list[str] | None  # text models: the prompt of each sample
    kind: str  # "class", "caption" or "unconditional"


def generate_samples(pipe: Any, settings: EvalSettings, progress: bool = True) -> Samples:
    """``settings.num_samples`` samples from a MatryoshkaPipeline, ``settings.batch_size`` at a time."""
    from tqdm.auto import tqdm

    n = settings.num_samples
    labels: torch.Tensor | None
    captions: list[str] | None
    if pipe.is_text_conditional and settings.prompts is not None:
        kind = "caption"
        captions = [settings.prompts[i % len(settings.prompts)] for i in range(n)]
        given = settings.prompt_labels
        labels = None if given is None else torch.tensor([given[i % len(given)] for i in range(n)])
    elif pipe.is_text_conditional:
        if settings.reference != FASHION_MNIST:
            raise ValueError(
                "a text-to-image model scored against another reference than fashion_mnist needs its prompts "
                "(EvalSettings.prompts; `matryoshka eval --prompts FILE`)"
            )
        kind = "caption"
        labels = balanced_labels(n, len(CLASS_NAMES))
        captions = [
            caption_for_label(int(label), random.Random(f"{settings.seed}/{i}")) for i, label in enumerate(labels)
        ]
    elif pipe.is_class_conditional:
        kind, labels, captions = "class", balanced_labels(n, pipe.config.model.num_classes), None
    else:
        kind, labels, captions = "unconditional", None, None
    generator = torch.Generator(device=pipe.device).manual_seed(settings.seed)
    batches: list[torch.Tensor] = []
    with tqdm(total=n, disable=not progress, desc="sampling", unit="img") as bar:
        for start in range(0, n, settings.batch_size):
            stop = min(n, start + settings.batch_size)
            options: dict[str, Any] = {
                "num_inference_steps": settings.steps,
                "guidance_scale": settings.guidance,
                "sampler": settings.sampler,
                "generator": generator,
                "progress": False,
                "precision": settings.precision,
            }
            if kind == "caption":
                assert captions is not None
                output = pipe(captions[start:stop], **options)
            elif kind == "class":
                assert labels is not None
                output = pipe(class_labels=labels[start:stop].tolist(), **options)
            else:
                output = pipe(num_images_per_prompt=stop - start, **options)
            batches.append(output.tensors[0])
            bar.update(stop - start)
    return Samples(images=torch.cat(batches), labels=labels, captions=captions, kind=kind)


def sample_grid(
    samples: Samples, class_names: Sequence[str] | None, per_class: int = 8, max_classes: int = 16
) -> Any:
    """A PIL grid: one row per class (``per_class`` samples each, the first ``max_classes`` classes),
    or the first 64 samples of an unconditional model."""
    if samples.labels is None:
        return make_grid(samples.images[:64], nrow=8)
    rows = []
    count = min(max_classes, len(class_names) if class_names else int(samples.labels.max()) + 1)
    for label in range(count):
        chosen = samples.images[samples.labels == label][:per_class]
        if len(chosen) < per_class:  # fewer samples than cells: pad the row with black
            chosen = torch.cat([chosen, torch.full((per_class - len(chosen), *samples.images.shape[1:]), -1.0)])
        rows.append(chosen)
    return make_grid(torch.cat(rows), nrow=per_class)


# ---------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class Evaluator:
    """Scores pipelines with fixed settings; Inception, references and classifiers are loaded once.

    Args:
        settings: what to generate and how to score it.
        cache_dir: reference statistics and on-the-fly classifiers (default ``default_cache_dir()``).
        classifier_dir: a saved classifier (``save_classifier``) for conditioning fidelity; None trains
            one on Fashion-MNIST (cached) when the model is conditional.
        skip_classifier: do not measure conditioning fidelity.
        extractor: the Inception feature extractor (default: the standard FID one on ``settings.device``).
        progress: tqdm bars.
    """

    settings: EvalSettings
    cache_dir: str | Path | None = None
    classifier_dir: str | Path | None = None
    skip_classifier: bool = False
    extractor: InceptionFeatureExtractor | None = None
    progress: bool = True
    _references: dict[tuple[int, int], ReferenceSet] = field(default_factory=dict, repr=False)
    _classifier: tuple[SmallCNNClassifier, str] | None = field(default=None, repr=False)
    _clip: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.settings.validate()
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()
        if self.classifier_dir is not None and self.skip_classifier:
            raise ValueError("give either a classifier directory or skip_classifier, not both")

    def inception(self) -> InceptionFeatureExtractor:
        if self.extractor is None:
            self.extractor = InceptionFeatureExtractor(device=self.settings.device)
        return self.extractor

    def reference(self, image_size: int, channels: int) -> ReferenceSet:
        key = (image_size, channels)
        if key not in self._references:
            self._references[key] = reference_set(
                self.inception(), self.settings.reference, image_size, channels, self.settings.num_reference,
                self.cache_dir, batch_size=self.settings.batch_size, progress=self.progress,
                fit=self.settings.resolved_fit(image_size),
            )
        return self._references[key]

    def classifier(self, image_size: int, channels: int) -> tuple[SmallCNNClassifier, str]:
        if self._classifier is None:
            if self.classifier_dir is not None:
                loaded = load_classifier(self.classifier_dir, self.settings.device)
                self._classifier = (loaded, str(self.classifier_dir))
            else:
                self._classifier = fashion_mnist_classifier(
                    self.cache_dir, image_size, channels, self.settings.classifier_epochs,
                    self.settings.classifier_width, progress=self.progress,
                    fit=self.settings.resolved_fit(image_size),
                )
        return self._classifier

    def clip_scorer(self):
        if self._clip is None:
            from matryoshka.evaluation.clip_score import CLIPScorer

            self._clip = CLIPScorer(self.settings.clip_model, self.settings.device)
        return self._clip

    def evaluate(self, pipe: Any, out_dir: str | Path | None = None, model_name: str = "") -> dict[str, Any]:
        """Sample ``pipe`` (a MatryoshkaPipeline) and score it; with ``out_dir``, write the files there.

        Returns the report: ``fid``, ``kid`` {mean, std, ...}, ``precision``, ``recall``,
        ``conditioning`` {kind, accuracy, per_class, classifier} (accuracy None when not measured),
        ``settings``, ``reference``, ``timings_s`` and ``notes``.
        Files: report.json, samples.png, per_class_accuracy.png (conditional models),
        sample_features.npy (the samples' Inception features, for independent checks).
        """
        settings = self.settings
        model_config = pipe.config.model
        size, channels = model_config.image_size, model_config.in_channels
        class_names = pipe.config.class_names
        timings: dict[str, float] = {}
        notes: list[str] = []

        # Validate the classifier against the model before paying for sampling.
        classifier: tuple[SmallCNNClassifier, str] | None = None
        unlabelled_prompts = (
            pipe.is_text_conditional and settings.prompts is not None and settings.prompt_labels is None
        )
        conditional = pipe.is_class_conditional or pipe.is_text_conditional
        if not self.skip_classifier and not unlabelled_prompts and conditional:
            started = time.perf_counter()
            classifier = self.classifier(size, channels)
            timings["classifier"] = time.perf_counter() - started
            wanted = model_config.num_classes if pipe.is_class_conditional else 10
            if classifier[0].config.num_classes != wanted:
                raise ValueError(
                    f"the classifier ({classifier[1]}) has {classifier[0].config.num_classes} classes but the model "
                    f"asks for {wanted}: pass a matching classifier (--classifier DIR) or skip it (--no-classifier)"
                )
            if pipe.is_text_conditional:
                class_names = class_names or list(CLASS_NAMES)

        started = time.perf_counter()
        reference = self.reference(size, channels)
        timings["reference"] = time.perf_counter() - started

        started = time.perf_counter()
        samples = generate_samples(pipe, settings, progress=self.progress)
        timings["sampling"] = time.perf_counter() - started

        started = time.perf_counter()
        features = self.inception().extract(samples.images, batch_size=settings.batch_size, progress=self.progress)
        timings["features"] = time.perf_counter() - started

        started = time.perf_counter()
        metrics = distribution_metrics(
            features, reference, settings.kid_subsets, settings.kid_subset_size, settings.pr_k, settings.seed
        )
        timings["metrics"] = time.perf_counter() - started
        if settings.num_samples < 10000:
            notes.append(SMALL_N_NOTE.format(n=settings.num_samples))

        conditioning: dict[str, Any] = {"kind": samples.kind, "accuracy": None, "per_class": None, "classifier": None}
        if classifier is not None and samples.labels is not None:
            started = time.perf_counter()
            images = _fit_to_classifier(samples.images, classifier[0])
            accuracy, per_class = conditioning_accuracy(classifier[0], images, samples.labels, settings.batch_size)
            timings["classification"] = time.perf_counter() - started
            names = class_names or [str(i) for i in range(classifier[0].config.num_classes)]
            conditioning.update(
                accuracy=accuracy,
                per_class={names[label]: value for label, value in sorted(per_class.items())},
                classifier=classifier[1],
            )
        elif samples.labels is not None:
            notes.append("conditioning fidelity not measured (classifier skipped)")
        elif unlabelled_prompts:
            notes.append("conditioning fidelity not measured (the prompts name no classes)")

        clip_score = None
        if settings.clip_model is not None:
            if samples.captions is None:
                raise ValueError("a CLIP score needs a text-to-image model (its samples have no prompts)")
            started = time.perf_counter()
            scores = self.clip_scorer().scores(samples.images, samples.captions, settings.batch_size)
            timings["clip_score"] = time.perf_counter() - started
            clip_score = {"mean": float(scores.mean()), "std": float(scores.std()), "model": settings.clip_model,
                          "convention": "100 * max(cos, 0), as torchmetrics' CLIPScore"}

        report: dict[str, Any] = {
            "model": model_name,
            "model_config": {
                "sizes": list(model_config.sizes),
                "num_classes": model_config.num_classes,
                "text_dim": model_config.text_dim,
                "parameters": sum(p.numel() for p in pipe.model.parameters()),
            },
            "settings": asdict(settings),
            "num_samples": int(samples.images.shape[0]),
            **metrics,
            "conditioning": conditioning,
            "clip_score": clip_score,
            "reference": {"spec": settings.reference, "key": reference.key, **reference.description},
            "timings_s": timings,
            "notes": notes,
        }
        if out_dir is not None:
            report["files"] = self._write(Path(out_dir), report, samples, features, class_names)
        return report

    def _write(
        self, out_dir: Path, report: dict[str, Any], samples: Samples, features: torch.Tensor,
        class_names: Sequence[str] | None,
    ) -> dict[str, str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {"report": "report.json", "samples": "samples.png", "sample_features": "sample_features.npy"}
        sample_grid(samples, class_names).save(out_dir / files["samples"])
        np.save(out_dir / files["sample_features"], features.numpy())
        per_class = report["conditioning"]["per_class"]
        if per_class and len(per_class) <= MAX_PLOTTED_CLASSES:
            files["per_class_accuracy"] = "per_class_accuracy.png"
            plot_bars(
                per_class, out_dir / files["per_class_accuracy"], ylabel="classifier accuracy",
                title=f"conditioning fidelity: {report['conditioning']['accuracy']:.1%} overall",
            )
        report["files"] = files
        write_json_report(report, out_dir / files["report"])
        return files

