"""The optimised code paths compute what the plain ones do (correctness only; speed is in benchmarks/).

CPU: attention heads laid out for the fused SDPA kernels, float32 attention under CPU bf16 autocast,
bf16 autocast and channels_last against fp32, the pipeline's precision="bf16", fused AdamW as the CPU
default, the trainer's optim.compile wiring (traced whole, without graph breaks), gradient
checkpointing's saved activations.
CUDA (`-m cuda`, run by benchmarks/gpu_check.sh): bf16 autocast against fp32, torch.compile against
eager, a training run on the GPU with at most one host-device synchronisation per step, and a sampler
loop without any.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_sampler
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.models import NestedUNet
from matryoshka.models.layers import SMALL_MATMUL_MACS, Attention, GroupNorm, Linear, attention
from matryoshka.schedule import spaced_timesteps
from matryoshka.training import read_metrics, train
from matryoshka.training.config import OptimConfig
from matryoshka.training.loop import diffusion_loss
from matryoshka.training.optim import make_optimizer
from matryoshka.training.testing import tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_model(overrides: list[str] | None = None, seed: int = 0) -> NestedUNet:
    """The tiny 16-over-8 px class-conditional model with every weight random (zero-initialised output
    layers would make all outputs zero and any comparison trivial)."""
    torch.manual_seed(seed)
    model = NestedUNet(tiny_config(overrides).mdm.model)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def model_inputs(
    model: NestedUNet, batch: int = 4, device: str = "cpu"
) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    pyramid = [torch.randn(batch, config.in_channels, s, s, generator=generator).to(device) for s in config.sizes]
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    labels = torch.arange(batch).remainder(config.num_classes + 1).to(device)
    return pyramid, t, {"labels": labels}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------------
# Attention
def test_attention_heads_are_contiguous_per_head_and_channels_last_needs_no_copy():
    layer = Attention(32, num_heads=4, groups=8)
    x = torch.randn(2, 32, 6, 6)
    heads = layer._heads(x.reshape(2, 32, 36))
    assert heads.shape == (2, 4, 36, 8) and heads.stride(-1) == 1
    # Head h holds channels 8h..8h+7 (ml-mdm's split), in that order.
    torch.testing.assert_close(heads[:, 1, :, 3], x.reshape(2, 32, 36)[:, 8 + 3])

    # channels_last activations already keep each pixel's channels adjacent: the heads are a view.
    qkv = layer.qkv(layer.norm(x.contiguous(memory_format=torch.channels_last)))
    q = qkv.reshape(2, 96, -1).chunk(3, dim=1)[0]
    view = layer._heads(q)
    assert view.stride(-1) == 1 and view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()


def test_attention_runs_the_fused_flash_kernel_and_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    layer = Attention(32, num_heads=4, groups=8, cond_dim=16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    cond = torch.randn(2, 7, 16)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = layer(x, cond, mask)
        out.sum().backward()
    kernels = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in kernels

    # The same computation spelled out: softmax(q k^T / sqrt(d)) v for pixels and for the text tokens.
    with torch.no_grad():
        n, c, h, w = x.shape
        q, k, v = layer.qkv(layer.norm(x)).reshape(n, 3 * c, -1).chunk(3, dim=1)
        k_cond, v_cond = layer.kv_cond(layer.norm_cond(cond)).transpose(1, 2).chunk(2, dim=1)

        def split(t):
            return t.reshape(n, 4, c // 4, t.shape[-1]).transpose(-1, -2)

        def attend(q, k, v, keep=None):
            scores = split(q) @ split(k).transpose(-1, -2) / (c // 4) ** 0.5
            if keep is not None:
                scores = scores.masked_fill(~keep[:, None, None, :].bool(), float("-inf"))
            return scores.softmax(-1) @ split(v)

        mixed = attend(q, k, v) + attend(q, k_cond, v_cond, mask)
        expected = x + layer.proj_out(mixed.transpose(-1, -2).reshape(n, c, h, w))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_cpu_bf16_attention_is_computed_in_float32_below_1024_keys_and_keeps_its_dtype():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 16, generator=generator).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)  # a bf16 kernel would round its intermediate results differently
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()

    # From 1024 keys on, the CPU's bf16 kernel is the faster one: it is used.
    q, k, v = (torch.randn(1, 1, 1024, 16, generator=generator).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_cpu_bf16_small_linear_is_computed_in_float32_and_large_one_in_bf16():
    """Few rows (time embedding, FiLM, caption tokens): float32 inside autocast, returned in bf16 as the
    autocast Linear returns it, gradients to input and parameters; many rows: autocast's bf16 matmul."""
    generator = torch.Generator().manual_seed(0)
    layer = Linear(128, 256)
    x = torch.randn(8, 128, generator=generator, requires_grad=True)
    assert SMALL_MATMUL_MACS > 8 * 128 * 256
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        autocast_result = F.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias).bfloat16())  # float32 math, one rounding
    assert not torch.equal(out, autocast_result)  # the bf16 matmul rounds its inputs first
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    torch.testing.assert_close(layer.bias.grad, torch.full((256,), 8.0))

    rows = SMALL_MATMUL_MACS // (128 * 256) + 1
    big = torch.randn(rows, 128, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(big), F.linear(big, layer.weight, layer.bias))
    # Outside autocast it is torch's nn.Linear, bit for bit, with the same parameter names.
    plain = torch.nn.Linear(128, 256)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), plain(x))


# ------------------------------------------------------------------------------------------------
# bf16 autocast, channels_last
def test_bf16_autocast_forward_matches_fp32_on_cpu():
    model = random_model()
    pyramid, t, kwargs = model_inputs(model)
    with torch.no_grad():
        reference = model(pyramid, t, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(pyramid, t, **kwargs)
    for a, b in zip(low, reference, strict=True):
        assert relative_error(a, b) < 0.05  # bf16 keeps 8 bits of mantissa


def test_channels_last_training_step_matches_contiguous():
    config = tiny_config().mdm
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    noise = [torch.randn(4, 1, s, s, generator=torch.Generator().manual_seed(s)) for s in config.model.sizes]
    t = torch.tensor([3, 200, 500, 999])
    schedule = PyramidSchedule.from_config(config.diffusion, config.model.scales)

    def step(channels_last: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = random_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss = diffusion_loss(model, images, config.model.scales, t, noise, {"labels": torch.tensor([0, 1, 2, 10])},
                              schedule, config.diffusion, channels_last=channels_last)
        loss.mean().backward()
        return loss.total.detach(), [p.grad for p in model.parameters()]

    loss_a, grads_a = step(False)
    loss_b, grads_b = step(True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_groupnorm_normalises_channels_last_bf16_in_float32_and_matches_torch():
    """The channels-last bf16 CPU path (float32 inside, torch's fast kernel) gives torch's GroupNorm
    result, keeps dtype and memory format, and passes gradients to the input and both parameters."""
    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight, generator=generator)
    torch.nn.init.normal_(norm.bias, generator=generator)
    x = (3 * torch.randn(2, 16, 8, 8, generator=generator) + 1).bfloat16()
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x_last)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=2e-2)  # bf16 rounding of the output only
    out.float().sum().backward()
    assert x_last.grad is not None and x_last.grad.dtype == torch.bfloat16
    assert norm.weight.grad is not None and norm.bias.grad is not None
    torch.testing.assert_close(norm.bias.grad, torch.full((16,), 128.0))  # d(sum)/d(bias) = pixels x batch
    # Everything else (fp32, channels-first bf16) is torch's own module, bit for bit.
    plain = torch.nn.GroupNorm(4, 16)
    plain.load_state_dict(norm.state_dict())
    for tensor in (x.float(), x):
        assert torch.equal(norm(tensor), plain(tensor))


def test_pipeline_casts_the_weights_to_bf16_once_per_call_not_once_per_step(monkeypatch):
    """The sampling loop runs inside one outer (disabled) autocast context, so autocast's cache keeps the
    weights' bf16 copies from step to step: the same images, and per step fewer casts than the network
    has weights."""
    from torch.profiler import ProfilerActivity, profile

    import matryoshka.pipeline as pipeline_module
    from matryoshka.model_dir import MDMConfig
    from matryoshka.pipeline import MatryoshkaPipeline

    model = random_model()
    pipe = MatryoshkaPipeline(model, MDMConfig(model=model.config, diffusion=DiffusionConfig()))

    def run(steps: int) -> tuple[list[torch.Tensor], int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            images = pipe(class_labels=[1, 7], num_inference_steps=steps, guidance_scale=2.0, generator=0,
                          progress=False, precision="bf16").tensors
        return images, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    weights = sum(1 for p in model.parameters() if p.dim() == 4)
    kept_images, kept_2 = run(2)
    kept_4 = run(4)[1]
    monkeypatch.setattr(pipeline_module, "_casts_kept_across_steps", lambda device, precision: contextlib.nullcontext())
    fresh_images, fresh_2 = run(2)
    fresh_4 = run(4)[1]
    assert all(torch.equal(a, b) for a, b in zip(kept_images, fresh_images, strict=True))
    assert (fresh_4 - fresh_2) - (kept_4 - kept_2) >= 2 * weights  # two steps' worth of weight casts saved


def test_pipeline_bf16_option_runs_the_network_in_bf16_and_stays_close_to_fp32():
    from matryoshka.model_dir import MDMConfig
    from matryoshka.pipeline import MatryoshkaPipeline

    model = random_model()
    pipe = MatryoshkaPipeline(model, MDMConfig(model=model.config, diffusion=DiffusionConfig()))
    dtypes = []
    model.conv_out.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))

    def generate(precision: str) -> list[torch.Tensor]:
        return pipe(class_labels=[1, 7], num_inference_steps=4, guidance_scale=2.0, generator=0, progress=False,
                    precision=precision).tensors

    full = generate("fp32")
    calls = len(dtypes)
    low = generate("bf16")
    assert set(dtypes[:calls]) == {torch.float32} and set(dtypes[calls:]) == {torch.bfloat16}
    for a, b in zip(low, full, strict=True):
        assert a.dtype == torch.float32 and not torch.equal(a, b)
        assert relative_error(a, b) < 0.1
    with pytest.raises(ValueError, match="precision"):
        pipe(class_labels=[1], num_inference_steps=2, precision="int8", progress=False)


# ------------------------------------------------------------------------------------------------
# Optimizer, compile, checkpointing
def test_auto_optimizer_is_fused_on_cpu_and_steps_like_foreach():
    def stepped(implementation: str, sharded: bool = False):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        optimizer = make_optimizer(
            layer.parameters(), OptimConfig(implementation=implementation, weight_decay=0.01), 1e-2,
            torch.device("cpu"), sharded,
        )
        for i in range(3):
            layer(torch.full((2, 8), float(i + 1))).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer, [p.detach() for p in layer.parameters()]

    auto, auto_weights = stepped("auto")
    assert auto.param_groups[0]["fused"] is True
    sharded, _ = stepped("auto", sharded=True)
    assert not sharded.param_groups[0]["fused"] and sharded.param_groups[0]["foreach"]
    _, foreach_weights = stepped("foreach")
    for a, b in zip(auto_weights, foreach_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_trainer_compiles_the_training_forward_whole_and_trains_as_eager(tmp_path: Path, monkeypatch):
    """optim.compile goes through torch.compile; here with the "eager" backend and fullgraph=True,
    which traces the nested network (any graph break fails) without minutes of C++ code generation."""
    compiled = []
    real_compile = torch.compile

    def tracing_compile(module, **_):
        compiled.append(type(module).__name__)
        return real_compile(module, backend="eager", fullgraph=True)

    overrides = ["stages=[{levels: 2, steps: 2}]", "logging.sample_count=0", "checkpoint.every=0"]
    eager = train(tiny_config(overrides), tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", tracing_compile)
    traced = train(tiny_config([*overrides, "optim.compile=true"]), tmp_path / "compiled")
    assert compiled == ["NestedUNet"]
    losses = [[r["loss"] for r in read_metrics(tmp_path / name)] for name in ("eager", "compiled")]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-7)
    for name, value in eager.ema_model.state_dict().items():
        torch.testing.assert_close(traced.ema_model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_keeps_fewer_activations_for_the_backward_pass():
    model = random_model()
    pyramid, t, kwargs = model_inputs(model)

    def saved_bytes() -> int:
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(pyramid, t, **kwargs)
        sum(o.square().mean() for o in outputs).backward()
        return total

    plain = saved_bytes()
    model.set_gradient_checkpointing(True)  # the outer (16 px) band only
    outer_only = saved_bytes()
    model.set_gradient_checkpointing(True, outer_only=False)
    everywhere = saved_bytes()
    assert everywhere < outer_only < 0.7 * plain


# ------------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh runs these with -m cuda)
@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_autocast_forward_matches_fp32():
    model = random_model(["mdm.model.levels.1.channels=[64, 128]", "mdm.model.levels.1.num_heads=2"]).cuda()
    pyramid, t, kwargs = model_inputs(model, device="cuda")
    with torch.no_grad():
        reference = model(pyramid, t, **kwargs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(pyramid, t, **kwargs)
    for a, b in zip(low, reference, strict=True):
        assert relative_error(a, b) < 0.05


@pytest.mark.cuda
@needs_cuda
def test_cuda_compile_matches_eager_in_forward_and_gradients():
    model = random_model().cuda()
    pyramid, t, kwargs = model_inputs(model, device="cuda")

    def run(forward) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        outputs = forward(pyramid, t, **kwargs)
        sum(o.square().mean() for o in outputs).backward()
        return [o.detach() for o in outputs], [p.grad.clone() for p in model.parameters()]

    eager_out, eager_grads = run(model)
    compiled_out, compiled_grads = run(torch.compile(model))
    # Inductor fuses and reorders reductions, and cuDNN may pick other (TF32) algorithms: close, not equal.
    for a, b in zip(compiled_out, eager_out, strict=True):
        assert relative_error(a, b) < 1e-2
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        assert relative_error(a, b) < 1e-2


def _count_syncs(run) -> int:
    """Host-device synchronisations during run() (torch.cuda's sync debug mode warns on each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@needs_cuda
def test_cuda_training_run_syncs_at_most_once_per_step(tmp_path: Path):
    """A bf16 run on the GPU trains (finite, falling loss); the steps between logs synchronise with the
    host at most once each (the NaN/inf check before the optimizer step): the difference between a
    run of 2N and of N steps, which share all the one-off work (set-up, logging at the end, export)."""
    # A labelled image folder, so that the GPU machine needs no Fashion-MNIST files.
    from PIL import Image

    for i in range(64):
        folder = tmp_path / "images" / ("light" if i % 2 else "dark")
        folder.mkdir(parents=True, exist_ok=True)
        ramp = torch.linspace(0, 1, 16)[None, :] * torch.linspace(0, 1, 16)[:, None] * (i % 7 + 1) / 7
        pixels = ((ramp if i % 2 else 1 - ramp) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")  # 8-bit grey
    base = ["device=cuda", "optim.precision=bf16", "logging.sample_count=0", "checkpoint.every=0",
            "logging.every=1000", "data.batch_size=16", "optim.lr=3e-3", "data.dataset=folder",
            f"data.path={tmp_path / 'images'}", "data.labels=true", "data.captions=false", "data.limit=null",
            "mdm.model.num_classes=2"]
    train(tiny_config([*base, "stages=[{levels: 2, steps: 2}]"]), tmp_path / "warm")  # CUDA, cuDNN set-up
    counts = {}
    for steps in (4, 8):
        config = tiny_config([*base, f"stages=[{{levels: 2, steps: {steps}}}]"])
        counts[steps] = _count_syncs(lambda config=config, steps=steps: train(config, tmp_path / f"run{steps}"))
    assert counts[8] - counts[4] <= 4, counts
    long = train(tiny_config([*base, "stages=[{levels: 2, steps: 40}]", "logging.every=10"]), tmp_path / "long")
    losses = [r["loss"] for r in read_metrics(tmp_path / "long")]
    assert long.step == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.cuda
@needs_cuda
def test_cuda_guided_sampling_loop_never_waits_for_the_gpu():
    model = random_model().cuda().eval()
    schedule = PyramidSchedule.from_config(DiffusionConfig(), model.config.scales).to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    noise = [torch.randn(2, 1, s, s, device="cuda", generator=generator) for s in model.config.sizes]
    cond = {"labels": torch.tensor([1, 2], device="cuda")}
    uncond = {"labels": torch.full((2,), 10, device="cuda")}
    denoiser = classifier_free_guidance(model, cond, uncond, 3.0)
    timesteps = spaced_timesteps(1000, 5)

    def run():
        return run_sampler(denoiser, noise, schedule, timesteps, method="ddpm", generator=generator)

    run()  # first use: the schedule's table is copied to the GPU once, kernels load
    assert _count_syncs(run) == 0
