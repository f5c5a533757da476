"""Network blocks of the NestedUNet (REFERENCE.md section 5).

Parameter names follow ml-mdm's modules (norm1, conv1, time_layer, qkv, kv_cond, proj_out, ...) so
that official checkpoints load by name. Layers whose output joins a residual path start at zero.
Frames of a video are folded into the batch, (B * T, C, H, W), by the caller; blocks that need the
time embedding per frame repeat it (`_match_rows`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _match_rows(emb: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat per-sample embeddings (B, D) for frames folded into the batch (B * T rows)."""
    if emb.shape[0] == rows:
        return emb
    return emb.repeat_interleave(rows // emb.shape[0], dim=0)


class SinusoidalEmbedding(nn.Module):
    """sin/cos features of a scalar (time step or micro-conditioning value), then Linear-SiLU-Linear.

    width // 8 frequencies 10000^(-k / (width // 8)): features of width // 4 channels, as ml-mdm.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        half = width // 8
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / half))
        self.register_buffer("freqs", freqs.unsqueeze(0), persistent=False)
        self.width = width

    def features(self, values: torch.Tensor) -> torch.Tensor:
        """values (B,) -> (B, width // 4)."""
        angles = values.float().view(-1, 1) * self.freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """F.scaled_dot_product_attention, computed in float32 on the CPU for fewer than 1024 keys.

    q (N, heads, L, d), k and v (N, heads, S, d), mask broadcastable to (N, heads, L, S), True = attend.
    The CPU's bf16/fp16 attention kernels are slower than its fp32 ones unless there are many keys
    (benchmarks/attention_kernels.py; the figures are in BENCHMARKS.md, "Performance"), so under CPU
    autocast such attention runs in float32 (the convolutions, where bf16 pays, do not). On CUDA the low-precision
    kernels are the fast ones.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] < 1024:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises channels-last bf16/fp16 CPU activations in float32.

    Same parameters and result as nn.GroupNorm. torch's CPU GroupNorm is fast for channels-first
    tensors of any dtype and for channels-last float32 ones, but its channels-last bf16 kernel is much
    slower than the channels-first one (BENCHMARKS.md, "Performance"); that alone made channels_last
    lose under bf16 autocast although its convolutions are faster. The output keeps the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # inductor generates its own GroupNorm kernels
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            with torch.autocast("cpu", enabled=False):
                out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
            return out.to(x.dtype)
        return super().forward(x)


# Below this many multiply-adds (rows x in x out) a CPU matmul is slower in bf16 than in float32:
# the per-call conversion and packing cost more than the narrower arithmetic saves
# (benchmarks/profile_ops.py; BENCHMARKS.md, "Every architecture a user brings").
SMALL_MATMUL_MACS = 2_000_000


class Linear(nn.Linear):
    """nn.Linear whose small CPU matmuls run in float32 under low-precision autocast.

    Same parameters and result as nn.Linear. The time-embedding MLPs, the FiLM layers of every ResNet
    and the text projections multiply only a few rows (one per sample, or per token of a short
    caption); under CPU autocast such a matmul is slower in bf16 than in float32, so it is computed in
    float32 and returned in the autocast dtype, as the autocast Linear would return it. Large ones keep
    autocast's bf16 matmul.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.device.type == "cpu" and x.numel() * self.out_features < SMALL_MATMUL_MACS
        dtype = _cpu_autocast_dtype() if small and not torch.compiler.is_compiling() else None
        if dtype is None:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            out = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return out.to(dtype)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype when CPU autocast is on, else None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4 names the device; the old calls are deprecated
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


class ResNet(nn.Module):
    """GN -> SiLU -> conv3x3, FiLM by the time embedding, dropout, zero-init conv3x3, 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_layer = Linear(temb_dim, 2 * out_channels)
        self.norm2 = GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (N, Cin, H, W), temb (B, D) with N a multiple of B -> (N, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_layer(F.silu(temb)).chunk(2, dim=1)
        scale, shift = _match_rows(scale, h.shape[0]), _match_rows(shift, h.shape[0])
        h = F.silu(self.norm2(h) * (1 + scale[..., None, None]) + shift[..., None, None])
        h = self.conv2(self.dropout(h))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class Attention(nn.Module):
    """Self-attention over pixels plus cross-attention to text in one module (ml-mdm's SelfAttention).

    Both use the same queries; the two attention results are added before the zero-init projection.
    softmax(q k^T / sqrt(d)) equals ml-mdm's scaling of q and k by d^(-1/4) each.
    """

    def __init__(
        self, channels: int, num_heads: int, groups: int, cond_dim: int = 0, ffn: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.cond_dim = cond_dim
        if cond_dim > 0:
            self.norm_cond = nn.LayerNorm(cond_dim)
            self.kv_cond = Linear(cond_dim, 2 * channels)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        self.ffn = (
            nn.Sequential(
                GroupNorm(groups, channels),
                nn.Conv2d(channels, 4 * channels, 1),
                nn.GELU(),
                zero_init(nn.Conv2d(4 * channels, channels, 1)),
            )
            if ffn
            else None
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, L) -> (N, heads, L, C / heads); channel c belongs to head c // (C / heads).

        The fused SDPA kernels (flash attention, on CPU and CUDA) need each head's channels adjacent in
        memory; a channels-first activation has them L apart, which silently selects the slower,
        memory-hungry math kernel (L x L scores). Channels-last activations already qualify (no copy).
        """
        n, c, length = x.shape
        heads = x.reshape(n, self.num_heads, c // self.num_heads, length).transpose(-1, -2)
        return heads if heads.stride(-1) == 1 else heads.contiguous()

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (N, C, H, W); cond (B, S, D) text states; cond_mask (B, S), 1 = attend, or None."""
        n, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3 * c, -1).chunk(3, dim=1)
        q = self._heads(q)
        h = attention(q, self._heads(k), self._heads(v))
        if self.cond_dim > 0 and cond is not None:
            cond = _match_rows(cond, n)
            k_cond, v_cond = self.kv_cond(self.norm_cond(cond)).transpose(1, 2).chunk(2, dim=1)
            mask = None
            if cond_mask is not None:
                mask = _match_rows(cond_mask, n).bool()
                # A row with no token at all would give NaN; let it attend to its (zero) states instead.
                mask = mask | ~mask.any(dim=1, keepdim=True)
                mask = mask[:, None, None, :]
            h = h + attention(q, self._heads(k_cond), self._heads(v_cond), mask)
        h = h.transpose(-1, -2).reshape(n, c, height, width)
        x = x + self.proj_out(h)
        if self.ffn is not None:
            x = x + self.ffn(x)
        return x


class TokenSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over a sequence (B, S, D) with a zero-init projection."""

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = Linear(channels, 3 * channels)
        self.proj_out = zero_init(Linear(channels, channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        attn_mask = None
        if mask is not None:
            keep = mask.bool()
            keep = keep | ~keep.any(dim=1, keepdim=True)
            attn_mask = keep[:, None, None, :]
        h = attention(q, k, v, attn_mask)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, s, d))


class TokenMLP(nn.Module):
    """x + (LN -> Linear 4x -> GELU -> zero-init Linear)(x)."""

    def __init__(self, channels: int, multiplier: int = 4) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.LayerNorm(channels),
            Linear(channels, multiplier * channels),
            nn.GELU(),
            zero_init(Linear(multiplier * channels, channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class TextHeadLayer(nn.Module):
    """A trainable transformer layer over frozen text states (ml-mdm's lm_head)."""

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        self.attn = TokenSelfAttention(channels, num_heads)
        self.mlp = TokenMLP(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(self.attn(x, mask))


def frame_position_features(num_frames: int, channels: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sin/cos features of the frame index: (T, channels), values in [-1, 1].

    Parameter-free, so a temporal layer knows the order of frames from its first step and works for any
    number of frames (a level trained on 8 frames can be run on 16).
    """
    half = channels // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000) / max(half, 1)))
    angles = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * freqs[None]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if features.shape[1] < channels:  # odd width
        features = F.pad(features, (0, channels - features.shape[1]))
    return features.to(dtype or torch.float32)


def _frames_as_sequences(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B * T, C, H, W) -> (B * H * W, T, C): one sequence of T frames per pixel."""
    n, c, h, w = x.shape
    if n % num_frames:
        raise ValueError(f"{n} folded rows are not a whole number of {num_frames}-frame videos")
    return x.reshape(n // num_frames, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(-1, num_frames, c)


def _sequences_as_frames(seq: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `_frames_as_sequences` for a tensor shaped like `like` (B * T, C, H, W)."""
    n, c, h, w = like.shape
    t = seq.shape[1]
    return seq.reshape(n // t, h, w, t, c).permute(0, 3, 4, 1, 2).reshape(n, c, h, w)


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each pixel, then an MLP: a transformer layer over time.

    x (B * T, C, H, W) -> same shape; the T frames at one (b, h, w) form a sequence. Tokens are
    layer-normalised, then fixed sinusoidal frame positions are added (after the norm, so the positions
    keep their scale whatever the feature magnitudes), so attention knows which frame is earlier.
    Both residual branches end in zero-initialised projections: a new layer is exactly the identity,
    which is what makes inflating an image model exact. A single frame (an image, or a level nested
    down to one frame) passes through unchanged, so video models also denoise images as images.
    """

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads if channels % num_heads == 0 else 1
        self.norm = nn.LayerNorm(channels)
        self.qkv = Linear(channels, 3 * channels)
        self.proj_out = zero_init(Linear(channels, channels))
        self.mlp = TokenMLP(channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames == 1:
            return x
        seq = _frames_as_sequences(x, num_frames)
        b, t, c = seq.shape
        tokens = self.norm(seq) + frame_position_features(t, c, seq.device, seq.dtype)
        q, k, v = self.qkv(tokens).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v)
        seq = seq + self.proj_out(h.transpose(1, 2).reshape(b, t, c))
        return _sequences_as_frames(self.mlp(seq), x)


class TemporalConv(nn.Module):
    """x + conv3d(SiLU(GN(x))) with kernel (3 frames, space, space); the conv starts at zero (identity).

    x (B * T, C, H, W) -> same shape. space=1 mixes each pixel over neighbouring frames only; space=3
    also over its 3x3 neighbourhood, so one layer sees an object move by a pixel per frame. Frames and
    pixels beyond the edges count as zero (zero padding). A single frame passes through unchanged (an
    image is not a one-frame video padded with black).
    """

    def __init__(self, channels: int, groups: int, space: int = 1) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.conv = zero_init(nn.Conv3d(channels, channels, (3, space, space), padding=(1, space // 2, space // 2)))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames == 1:
            return x
        n, c, h, w = x.shape
        if n % num_frames:
            raise ValueError(f"{n} folded rows are not a whole number of {num_frames}-frame videos")
        y = F.silu(self.norm(x)).reshape(n // num_frames, num_frames, c, h, w).transpose(1, 2)  # (B, C, T, H, W)
        y = self.conv(y).transpose(1, 2).reshape(n, c, h, w)
        return x + y


class ResNetBlock(nn.Module):
    """ResNets at one resolution, each followed by its attention (and temporal) layers, then resample.

    `forward` returns the output and the activations that the up path consumes as skips.
    """

    def __init__(
        self,
        in_out: list[tuple[int, int]],
        temb_dim: int,
        groups: int,
        dropout: float,
        attention_layers: int = 0,
        num_heads: int = 8,
        attention_groups: int = 32,
        cond_dim: int = 0,
        ffn: bool = False,
        resample: str | None = None,  # "down", "up" or None
        temporal_attention_layers: int = 0,
        temporal_conv: bool = False,
        temporal_conv_space: int = 1,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResNet(i, o, temb_dim, groups, dropout) for i, o in in_out)
        self.num_attention_layers = attention_layers
        if attention_layers > 0:
            self.attn = nn.ModuleList(
                Attention(o, num_heads, attention_groups, cond_dim, ffn)
                for _, o in in_out
                for _ in range(attention_layers)
            )
        self.num_temporal_layers = temporal_attention_layers + int(temporal_conv)
        if self.num_temporal_layers:
            layers = []
            for _, o in in_out:
                if temporal_conv:
                    layers.append(TemporalConv(o, groups, temporal_conv_space))
                layers.extend(TemporalAttention(o, num_heads=num_heads) for _ in range(temporal_attention_layers))
            self.t_layers = nn.ModuleList(layers)
        width = in_out[-1][1]
        self.resample_mode = resample
        if resample == "down":
            self.resample = nn.Conv2d(width, width, 3, stride=2, padding=1)
        elif resample == "up":
            self.resample = nn.Conv2d(width, width, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        activations = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            for j in range(self.num_attention_layers):
                x = self.attn[i * self.num_attention_layers + j](x, cond, cond_mask)
            for j in range(self.num_temporal_layers):
                x = self.t_layers[i * self.num_temporal_layers + j](x, num_frames)
            activations.append(x)
        if self.resample_mode == "down":
            x = self.resample(x)
            activations.append(x)
        elif self.resample_mode == "up":
            x = self.resample(F.interpolate(x.float(), scale_factor=2, mode="nearest").to(x.dtype))
        return x, activations
