"""Fine-tuning what exists: a whole model (ours or an official checkpoint) in full or with LoRA adapters,
adapters saved, reloaded, scaled, fused and removed; fp16 mixed precision with loss scaling."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from matryoshka import cli, lora
from matryoshka.conditioning.testing import make_tiny_t5
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.training import train
from matryoshka.training.testing import tiny_config
from matryoshka.typed_config import ConfigError, to_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ml-mdm" / "nested_tiny"
if not FIXTURE.is_dir():
    FIXTURE = Path("/work/shared/fixtures/ml-mdm/nested_tiny")
QUIET = ["logging.progress=false", "logging.sample_count=0"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A trained tiny class-conditional 16/8 model (the model to fine-tune)."""
    return train(tiny_config(QUIET), tmp_path_factory.mktemp("base"), quiet=True).model_dir


def finetune_config(base: Path, *extra: str):
    return tiny_config([*QUIET, f"stages=[{{levels: 2, steps: 3, init_from: '{base}', lr: 0.01}}]", *extra])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from matryoshka.model_dir import load_model_dir

    return load_model_dir(model_dir)[0].state_dict()


def test_full_fine_tuning_starts_from_the_whole_model_and_resumes_exactly(base_model, tmp_path):
    whole = train(finetune_config(base_model, "checkpoint.every=1"), tmp_path / "whole", quiet=True)
    before, after = weights(base_model), weights(whole.model_dir)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    cut = tmp_path / "cut"
    train(finetune_config(base_model, "checkpoint.every=1"), cut, max_steps=1, quiet=True)
    resumed = train(finetune_config(base_model, "checkpoint.every=1"), cut, resume=True, quiet=True)
    assert all(torch.equal(v, weights(resumed.model_dir)[k]) for k, v in after.items())
    with pytest.raises(ConfigError, match="init_from: the model has 2 levels but the stage trains 1"):
        train(tiny_config([*QUIET, f"stages=[{{levels: 1, steps: 1, init_from: '{base_model}'}}]"]),
              tmp_path / "x", quiet=True)


def test_lora_fine_tuning_saves_a_small_adapter_that_a_fresh_pipeline_loads_and_unloads(base_model, tmp_path):
    result = train(finetune_config(base_model, "lora={rank: 4, alpha: 4}"), tmp_path / "run", quiet=True)
    adapter = tmp_path / "run" / "lora"
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter.yaml").is_file()
    # Only the adapters trained: the base weights of the exported model's un-adapted layers are the base's.
    base, tuned = weights(base_model), weights(result.model_dir)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith((".qkv.weight", ".proj_out.weight", ".kv_cond.weight")) for k in changed)
    # The default adapter file is under 5% of the model's (the tiny model's and the embedded one's).
    model_size = (base_model / "model.safetensors").stat().st_size
    assert (adapter / "adapter.safetensors").stat().st_size < 0.05 * model_size
    embedded = MatryoshkaPipeline.from_pretrained("fashion-t2i")
    lora.add_adapter(embedded.model, lora.LoRAConfig())
    lora.save_adapter(embedded.model, tmp_path / "embedded-adapter", lora.LoRAConfig())
    embedded_size = (Path(lora.__file__).parent / "assets" / "fashion-t2i" / "model.safetensors").stat().st_size
    assert (tmp_path / "embedded-adapter" / "adapter.safetensors").stat().st_size < 0.05 * embedded_size

    pipe = MatryoshkaPipeline.from_pretrained(base_model)
    options = {"class_labels": [1, 4], "num_inference_steps": 3, "generator": 0, "progress": False}
    plain = pipe(**options).tensors[0]
    pipe.load_lora_weights(adapter, adapter_name="tuned")
    adapted = pipe(**options).tensors[0]
    assert not torch.equal(adapted, plain)
    # The adapted pipeline draws what the exported (fused) model draws.
    torch.testing.assert_close(adapted, MatryoshkaPipeline.from_pretrained(result.model_dir)(**options).tensors[0],
                               rtol=1e-4, atol=1e-4)
    pipe.set_adapters("tuned", 0.0)
    torch.testing.assert_close(pipe(**options).tensors[0], plain, rtol=1e-5, atol=1e-5)  # scale 0: no update
    pipe.set_adapters("tuned", 1.0)
    pipe.fuse_lora()
    torch.testing.assert_close(pipe(**options).tensors[0], adapted, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert torch.equal(pipe(**options).tensors[0], plain)  # exactly as before
    assert not lora.has_adapters(pipe.model)


def test_several_adapters_by_name_and_the_generate_flags(base_model, tmp_path, capsys):
    model = MatryoshkaPipeline.from_pretrained(base_model).model
    for name, seed in (("one", 1), ("two", 2)):
        lora.add_adapter(model, lora.LoRAConfig(rank=2), name)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for parameter_name, parameter in model.named_parameters():
                if f"lora_B.{name}" in parameter_name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        lora.save_adapter(model, tmp_path / name, lora.LoRAConfig(rank=2), name)
    pipe = MatryoshkaPipeline.from_pretrained(base_model)
    pipe.load_lora_weights(tmp_path / "one", adapter_name="one")
    pipe.load_lora_weights(tmp_path / "two", adapter_name="two", scale=0.5)
    assert pipe.get_active_adapters() == ["one", "two"]
    with pytest.raises(ValueError, match="already has an adapter named 'one'"):
        pipe.load_lora_weights(tmp_path / "one", adapter_name="one")
    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(base_model), "--class", "2", "--steps", "2", "--seed", "0", "--quiet",
            "--lora", str(tmp_path / "one"), "--lora", str(tmp_path / "two"), "--lora-scale", "1", "--lora-scale",
            "0.5", "--out", str(out)]
    assert cli.main(argv) == 0 and out.is_file()
    assert cli.main([*argv[:-2], "--lora-scale", "2", "--out", str(tmp_path / "y.png")]) == 2
    assert "one --lora-scale per --lora" in capsys.readouterr().err


def test_an_official_checkpoint_fine_tunes_in_full_and_with_lora(tmp_path):
    from matryoshka.interop import load_official

    _, model_config, diffusion = load_official(FIXTURE / "vis_model.pth", FIXTURE / "config.yaml")
    t5 = make_tiny_t5(tmp_path / "t5", d_model=model_config.text_dim)
    base = {
        "mdm": {"model": to_dict(model_config), "diffusion": to_dict(diffusion), "text_encoder": f"t5:{t5}"},
        "data": {"dataset": "fashion_mnist", "split": "test", "batch_size": 2, "limit": 16},
        "optim": {"lr": 1e-3},
        "stages": [{"levels": 2, "steps": 2, "init_from": str(FIXTURE / "vis_model.pth")}],
        "ema": {"decay": 0.9}, "checkpoint": {"every": 0},
        "logging": {"every": 1, "sample_count": 0, "tensorboard": False, "progress": False},
    }
    from matryoshka.training.config import TrainConfig
    from matryoshka.typed_config import from_dict

    full = train(from_dict(TrainConfig, base), tmp_path / "full", quiet=True)
    with_lora = train(from_dict(TrainConfig, {**base, "lora": {"rank": 2}}), tmp_path / "lora", quiet=True)
    for result in (full, with_lora):
        assert all(torch.isfinite(torch.tensor(v)) for k, v in result.losses.items() if k.startswith("loss"))
    assert (tmp_path / "lora" / "lora" / "adapter.safetensors").is_file()
    official = load_official(FIXTURE / "vis_model.pth", FIXTURE / "config.yaml")[0].state_dict()
    tuned = weights(with_lora.model_dir)
    frozen = [k for k in official if "qkv" not in k and "proj_out" not in k and "kv_cond" not in k and "ffn" not in k]
    assert all(torch.equal(official[k], tuned[k]) for k in frozen)  # LoRA left the rest as released


def test_fp16_mixed_precision_keeps_its_loss_scale_across_a_resume(tmp_path):
    config = ["optim.precision=fp16", "checkpoint.every=1", *QUIET]
    whole = train(tiny_config(config), tmp_path / "whole", quiet=True)
    train(tiny_config(config), tmp_path / "cut", max_steps=3, quiet=True)
    import json

    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 1
    resumed = train(tiny_config(config), tmp_path / "cut", resume=True, quiet=True)
    for key, value in whole.ema_model.state_dict().items():
        assert torch.equal(value, resumed.ema_model.state_dict()[key]), key


def test_fp16_sampling_reruns_an_overflowing_step_in_fp32(base_model):
    pipe = MatryoshkaPipeline.from_pretrained(base_model)
    real_forward = pipe.model.forward
    overflowed = []

    def overflowing(*args, **kwargs):
        outputs = real_forward(*args, **kwargs)
        if torch.is_autocast_enabled("cpu") and not overflowed:  # the first fp16 call overflows
            overflowed.append(True)
            return [torch.full_like(o, float("inf")) for o in outputs]
        return outputs

    pipe.model.forward = overflowing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(class_labels=[3], num_inference_steps=3, generator=0, progress=False, precision="fp16")
    assert overflowed and torch.isfinite(out.tensors[0]).all()
    assert any("fp16 overflowed" in str(w.message) for w in caught)


# CUDA (benchmarks/gpu_check.sh runs these with -m cuda)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
def test_fp16_training_on_cuda_scales_the_loss_and_resumes_exactly(tmp_path):
    config = ["optim.precision=fp16", "device=cuda", "checkpoint.every=1", *QUIET]
    whole = train(tiny_config(config), tmp_path / "whole", quiet=True)
    train(tiny_config(config), tmp_path / "cut", max_steps=2, quiet=True)
    resumed = train(tiny_config(config), tmp_path / "cut", resume=True, quiet=True)
    for key, value in whole.ema_model.state_dict().items():
        assert torch.equal(value, resumed.ema_model.state_dict()[key]), key
    assert all(torch.isfinite(torch.tensor(v)) for k, v in whole.losses.items() if k.startswith("loss"))


@pytest.mark.cuda
@needs_cuda
def test_fp16_sampling_on_cuda_gives_finite_images_close_to_fp32(base_model):
    pipe = MatryoshkaPipeline.from_pretrained(base_model, device="cuda")
    options = {"class_labels": [1, 5], "num_inference_steps": 4, "generator": 0, "progress": False}
    full = pipe(**options).tensors[0]
    half = pipe(**options, precision="fp16").tensors[0]
    assert torch.isfinite(half).all() and (half - full).abs().mean() < 0.05
