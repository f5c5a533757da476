"""Temporal layers, the video NestedUNet's frame handling, and inflating an image model into a video model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.models.layers import TemporalAttention, TemporalConv
from matryoshka.typed_config import ConfigError
from matryoshka.video import image_counterpart, inflate_image_model, temporal_parameters

T, C, H = 4, 8, 3


def _frames(batch: int = 2, frames: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch * frames, C, H, H, generator=torch.Generator().manual_seed(seed))


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


LAYERS = [TemporalAttention(C, num_heads=2), TemporalConv(C, groups=4), TemporalConv(C, groups=4, space=3)]


@pytest.mark.parametrize("layer", LAYERS)
def test_temporal_layers_keep_shape_and_start_as_identity(layer):
    x = _frames()
    out = layer(x, T)
    assert out.shape == x.shape
    assert torch.equal(out, x)  # zero-initialised outputs: exactly the identity


@pytest.mark.parametrize("layer", LAYERS)
def test_temporal_layers_pass_single_frames_through_even_when_trained(layer):
    _randomize(layer)
    x = _frames(frames=1)
    assert torch.equal(layer(x, 1), x)
    assert not torch.equal(layer(_frames(), T), _frames())  # the weights do act on real videos


def test_temporal_attention_mixes_frames_not_pixels():
    layer = TemporalAttention(C, num_heads=2)
    _randomize(layer)
    x = _frames(batch=1)
    poked = x.clone()
    poked[0, :, 0, 0] += torch.linspace(-1, 1, C)  # frame 0, pixel (0, 0); not constant (LayerNorm)
    delta = (layer(poked, T) - layer(x, T)).abs()  # (T, C, H, W)
    assert delta[3, :, 0, 0].max() > 1e-4  # the last frame at that pixel hears about frame 0
    assert delta[:, :, 1:, :].max() == 0 and delta[:, :, :, 1:].max() == 0  # other pixels do not


def test_temporal_attention_knows_frame_order():
    """Frame positions break permutation symmetry: reversing the input does not just reverse the output."""
    layer = TemporalAttention(C, num_heads=2)
    _randomize(layer)
    x = _frames(batch=1)
    reverse = torch.arange(T - 1, -1, -1)
    assert not torch.allclose(layer(x[reverse], T)[reverse], layer(x, T), atol=1e-4)


def test_temporal_attention_learns_to_mix_after_one_step():
    layer = TemporalAttention(C, num_heads=2)
    x = _frames(batch=2)
    target = x.reshape(2, T, C, H, H).roll(1, dims=1).reshape_as(x)  # predict the previous frame
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    loss = (layer(x, T) - target).square().mean()
    loss.backward()
    optimizer.step()
    poked = x.clone()
    poked[0] += torch.linspace(-1, 1, C)[:, None, None]  # frame 0 of video 0
    delta = (layer(poked, T) - layer(x, T)).abs().reshape(2, T, C, H, H)
    assert delta[0, 1:].max() > 1e-4  # other frames of video 0 now depend on frame 0
    assert delta[1].max() == 0  # video 1 is untouched


@pytest.mark.parametrize("space", [1, 3])
def test_temporal_conv_reaches_neighbouring_frames_only(space):
    layer = TemporalConv(C, groups=4, space=space)
    _randomize(layer)
    layer.norm = torch.nn.Identity()  # GroupNorm spreads a poke over its whole frame; look at the conv's reach
    x = _frames(batch=1)
    poked = x.clone()
    poked[0, :, 0, 0] += torch.linspace(-1, 1, C)  # frame 0, pixel (0, 0)
    delta = (layer(poked, T) - layer(x, T)).abs()  # (T, C, H, W)
    assert delta[1, :, 0, 0].max() > 1e-4 and delta[2:].max() == 0  # the next frame only
    # A 3x3 space-time kernel also reaches the neighbouring pixels of the next frame; a 1x1 one does not.
    assert (delta[1, :, 1, 1].max() > 1e-4) == (space == 3) and delta[1, :, 2, 2].max() == 0


def test_temporal_layers_reject_rows_that_are_not_whole_videos():
    with pytest.raises(ValueError, match="whole number"):
        TemporalAttention(C, num_heads=2)(_frames(batch=1)[:3], T)


# ---- the NestedUNet with video --------------------------------------------------------------------


def image_config(levels: int = 2, **kwargs) -> ModelConfig:
    outer = [LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32) for _ in range(levels - 1)]
    core = LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, mid_block=True,
                       norm_groups=4, attention_norm_groups=4, temb_dim=32)
    kwargs.setdefault("text_dim", 6)
    return ModelConfig(levels=[*outer, core], image_size=4 * 2**levels, in_channels=1, **kwargs)


def video_config(image: ModelConfig, num_frames: int = T, ratios: list[int] | None = None, extra_levels: int = 0,
                 frame_embedding: bool = False):
    levels = [dataclasses.replace(lv, temporal_attention_layers=[1] * len(lv.channels), temporal_conv=True,
                                  frame_embedding=frame_embedding)
              for lv in image.levels]
    for _ in range(extra_levels):
        levels.insert(0, LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32, temporal_conv=True))
    return dataclasses.replace(
        image, levels=levels, image_size=image.image_size * 2**extra_levels, num_frames=num_frames,
        temporal_ratios=ratios or [1] * (len(levels) - 1),
    )


def _random_image_model(config: ModelConfig, zero_in_adapter: bool = False) -> NestedUNet:
    model = NestedUNet(config)
    _randomize(model, std=0.1)  # zero-initialised layers too, so every path counts
    if zero_in_adapter:
        with torch.no_grad():
            for p in model.in_adapter.parameters():
                p.zero_()
    return model.eval()


def _video_pyramid(config: ModelConfig, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, f, s, s, generator=gen) for f, s in zip(config.frames, config.sizes, strict=True)]


def _cond(batch: int = 2):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(batch, 3, 6, generator=gen), torch.tensor([[1, 1, 0], [1, 1, 1]])[:batch]


def _per_frame(model: NestedUNet, levels: list[torch.Tensor], t: torch.Tensor, text, mask) -> list[torch.Tensor]:
    """Run an image model on every frame: levels (B, C, T, H, W) with equal T -> outputs in that layout."""
    b, _, frames = levels[0].shape[:3]
    fold = [x.transpose(1, 2).reshape(b * frames, *x.shape[1:2], *x.shape[3:]) for x in levels]
    rep = lambda v: v.repeat_interleave(frames, dim=0)  # noqa: E731
    out = model(fold, rep(t), rep(text), rep(mask))
    return [o.reshape(b, frames, *o.shape[1:]).transpose(1, 2) for o in out]


@pytest.mark.parametrize("frame_embedding", [False, True])
def test_inflated_model_equals_the_image_model_frame_by_frame(frame_embedding):
    image = image_config(2)
    model = _random_image_model(image)
    video_cfg = video_config(image, frame_embedding=frame_embedding)
    video = inflate_image_model(model, video_cfg)
    assert temporal_parameters(video)
    outputs = [p for n, p in video.named_parameters()
               if ("t_layers" in n and ("proj_out" in n or ".conv." in n)) or "frame_emb.1." in n]
    assert outputs and all(p.abs().max() == 0 for p in outputs)  # new temporal layers start at zero
    assert any("frame_emb" in n for n, _ in video.named_parameters()) == frame_embedding
    levels, t = _video_pyramid(video_cfg), torch.tensor([17, 640])
    text, mask = _cond()
    with torch.no_grad():
        got = video(levels, t, text, mask)
        want = _per_frame(model, levels, t, text, mask)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_temporal_nesting_inner_level_sees_key_frames():
    """Level 1 keeps every 2nd frame: inner frame j pairs with outer frame 2j, and outer frames 2j, 2j+1
    receive the inner features of key frame 2j."""
    image = image_config(2)
    video_cfg = video_config(image, ratios=[2])
    assert video_cfg.frames == [T, T // 2]
    t, (text, mask) = torch.tensor([17, 640]), _cond()
    levels = _video_pyramid(video_cfg)
    keys = levels[0][:, :, ::2]

    # Key frames and the inner level: exactly the image model on (outer key frame, inner frame) pairs.
    model = _random_image_model(image)
    video = inflate_image_model(model, video_cfg)
    with torch.no_grad():
        got = video(levels, t, text, mask)
        want = _per_frame(model, [keys, levels[1]], t, text, mask)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0][:, :, ::2], want[0], rtol=0, atol=1e-6)
    assert not torch.allclose(got[0][:, :, 1::2], want[0], atol=1e-3)  # the in-between frames are their own

    # The in-between frames: with no outer features handed inward, outer frame i is exactly the image model
    # on (outer frame i, inner frame i // 2): the key frame's inner features are held over its group.
    model = _random_image_model(image, zero_in_adapter=True)
    video = inflate_image_model(model, video_cfg)
    held = levels[1].repeat_interleave(2, dim=2)
    with torch.no_grad():
        got = video(levels, t, text, mask)
        want = _per_frame(model, [levels[0], held], t, text, mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)


def test_inflating_into_a_deeper_video_model_keeps_the_inner_levels():
    """The paper's layout: new outer video levels around the image model (their adapters start at zero)."""
    image = image_config(2)
    model = _random_image_model(image)
    video_cfg = video_config(image, extra_levels=1)
    video = inflate_image_model(model, video_cfg)
    levels, t, (text, mask) = _video_pyramid(video_cfg), torch.tensor([3, 999]), _cond()
    with torch.no_grad():
        got = video(levels, t, text, mask)
        want = _per_frame(model, levels[1:], t, text, mask)
    assert got[0].shape == levels[0].shape
    for g, w in zip(got[1:], want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_video_model_denoises_image_pyramids_as_images_even_after_training():
    image = image_config(2)
    model = _random_image_model(image)
    video = inflate_image_model(model, video_config(image))
    for p in temporal_parameters(video):  # as if trained: temporal layers no longer zero
        torch.nn.init.normal_(p, std=0.1)
    x = [torch.randn(2, 1, s, s) for s in image.sizes]
    t, (text, mask) = torch.tensor([5, 500]), _cond()
    with torch.no_grad():
        for g, w in zip(video(x, t, text, mask), model(x, t, text, mask), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_inflation_from_a_model_directory(tmp_path):
    image = image_config(1)
    model = _random_image_model(image)
    save_model_dir(tmp_path / "image", model, MDMConfig(model=image, diffusion=DiffusionConfig()))
    video = inflate_image_model(tmp_path / "image", video_config(image))
    x = torch.randn(1, 1, T, 8, 8)
    t, (text, mask) = torch.tensor([9]), _cond(1)
    with torch.no_grad():
        torch.testing.assert_close(video([x], t, text, mask)[0], _per_frame(model, [x], t, text, mask)[0],
                                   rtol=0, atol=1e-6)


def test_inflation_names_what_does_not_fit():
    image = image_config(2)
    model = NestedUNet(image)
    wider = video_config(image)
    wider.levels[-1] = dataclasses.replace(wider.levels[-1], channels=[8, 32])
    with pytest.raises(ValueError, match="channels"):
        inflate_image_model(model, wider)
    with pytest.raises(ValueError, match="text_dim"):
        inflate_image_model(model, dataclasses.replace(video_config(image), text_dim=4))
    with pytest.raises(ValueError, match="not a video model"):
        inflate_image_model(model, image)
    with pytest.raises(ValueError, match="only 1"):
        inflate_image_model(model, video_config(image_config(1)))


def test_image_counterpart_strips_time():
    video_cfg = video_config(image_config(2), ratios=[2])
    stage1 = image_counterpart(video_cfg, 1)
    assert stage1.num_frames == 0 and stage1.temporal_ratios is None and stage1.num_levels == 1
    assert stage1.image_size == video_cfg.sizes[1]
    assert all(lv.temporal_attention_layers is None and not lv.temporal_conv for lv in stage1.levels)
    stage1.validate()


def test_forward_rejects_frames_that_do_not_match_the_temporal_ratios():
    video_cfg = video_config(image_config(2), ratios=[2])
    model = NestedUNet(video_cfg)
    bad = [torch.randn(1, 1, 4, 16, 16), torch.randn(1, 1, 4, 8, 8)]
    with pytest.raises(ValueError, match="temporal ratio"):
        model(bad, torch.tensor([1]))
    with pytest.raises(ValueError, match="all videos"):
        model([bad[0], torch.randn(1, 1, 8, 8)], torch.tensor([1]))


def test_temporal_layers_need_a_video_model():
    image = image_config(1)
    image.levels[0].temporal_conv = True
    with pytest.raises(ConfigError, match=r"levels\[0\].temporal_conv"):
        image.validate()


def test_frame_embedding_tells_every_frame_its_index_and_leaves_images_alone():
    """Trained (non-zero) frame embeddings make identical frames come out different, frame by frame;
    images (one frame) through the same model are exactly what the model without them gives."""
    image = image_config(2)
    plain = NestedUNet(video_config(image))
    framed = NestedUNet(video_config(image, frame_embedding=True))
    _randomize(plain, std=0.1)
    framed.load_state_dict(plain.state_dict(), strict=False)
    _randomize(framed.frame_emb, std=0.3, seed=7)
    _randomize(framed.inner_unet.frame_emb, std=0.3, seed=8)
    t, (text, mask) = torch.tensor([17, 640]), _cond()
    still = [x[:, :, :1].expand_as(x).contiguous() for x in _video_pyramid(framed.config)]  # one frame, repeated
    with torch.no_grad():
        plain_out = plain(still, t, text, mask)
        framed_out = framed(still, t, text, mask)
    for level in framed_out:
        per_frame = level[:, :, 1:] - level[:, :, :1]
        assert per_frame.abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3  # every later frame differs from frame 0
    assert not torch.allclose(framed_out[0], plain_out[0], atol=1e-3)

    images = [x[:, :, 0] for x in _video_pyramid(framed.config)]  # (B, C, H, W): images through a video model
    with torch.no_grad():
        for a, b in zip(framed(images, t, text, mask), plain(images, t, text, mask), strict=True):
            assert torch.equal(a, b)
