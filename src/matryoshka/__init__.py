"""Matryoshka Diffusion Models: nested multi-resolution pixel-space diffusion."""

__version__ = "0.1.0"
