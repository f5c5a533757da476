"""Pieces of the trainer: nesting, EMA, checkpoints, data order, per-sample draws, schedule, loss, conditioning."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka.data import FaultCounter
from matryoshka.diffusion import PyramidSchedule
from matryoshka.models import NestedUNet
from matryoshka.training import EMA, diffusion_loss, initial_models, nest_model, nest_weights, stage_mdm_config
from matryoshka.training.checkpoint import (
    capture_rng_state,
    find_latest,
    join_optimizer_state,
    list_checkpoints,
    read_state,
    read_tensors,
    restore_rng_state,
    split_optimizer_state,
    write_checkpoint,
)
from matryoshka.training.conditioning import BatchConditioner
from matryoshka.training.data import BatchStream, DataPosition, GlobalBatchSampler, build_dataset
from matryoshka.training.noise import draw
from matryoshka.training.optim import learning_rate
from matryoshka.training.testing import tiny_config


def perturbed(model: NestedUNet, seed: int, skip: tuple[str, ...] = ()) -> NestedUNet:
    """Give every parameter (zero-initialised output layers too) random values, except names containing `skip`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def three_level_config():
    return tiny_config(
        [
            "mdm.model.image_size=32",
            "mdm.model.levels=[{channels: [8, 8], num_res_blocks: [1, 1], norm_groups: 4, temb_dim: 32},"
            " {channels: [8, 8], num_res_blocks: [1, 1], norm_groups: 4, temb_dim: 32},"
            " {channels: [8, 16], num_res_blocks: [1, 1], attention_layers: [0, 1], num_heads: 2, norm_groups: 4,"
            " temb_dim: 32}]",
            "stages=[{levels: 1, steps: 1}, {levels: 3, steps: 1}]",
        ]
    )



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# ------------------------------------------------------------------------------------------------ nesting
def test_nested_model_keeps_the_old_models_predictions_exactly():
    config = tiny_config()
    final = config.mdm.model
    old = perturbed(NestedUNet(final.innermost(1)), seed=1)
    new = nest_model(old, final.innermost(2))
    # Train-like outer weights, but the adapters keep their zero initialisation.
    perturbed(new, seed=2, skip=("inner_unet.", "in_adapter", "out_adapter"))
    pyramid = [torch.randn(3, 1, 16, 16), torch.randn(3, 1, 8, 8)]
    t, labels = torch.tensor([5, 400, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        inner_before = old(pyramid[1:], t, labels=labels)[0]
        top, inner_after = new(pyramid, t, labels=labels)
    assert torch.equal(inner_after, inner_before)
    assert top.abs().sum() > 0  # the new outer band does predict something
    # Once the adapters learn, the inner prediction may change: the equality is the adapters' doing.
    perturbed(new, seed=3, skip=("inner_unet.",))
    with torch.no_grad():
        assert not torch.allclose(new(pyramid, t, labels=labels)[1], inner_before)


def test_initial_models_nest_weights_and_ema_weights_separately():
    config = three_level_config()
    final = config.mdm.model
    core, core_ema = perturbed(NestedUNet(final.innermost(1)), 4), perturbed(NestedUNet(final.innermost(1)), 5)
    model, ema_model = initial_models(config, 1, (core.state_dict(), core_ema.state_dict(), 1))
    assert model.config.num_levels == 3
    pyramid = [torch.randn(2, 1, s, s) for s in final.sizes]
    t, labels = torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(pyramid, t, labels=labels)[2], core(pyramid[2:], t, labels=labels)[0])
        assert torch.equal(ema_model(pyramid, t, labels=labels)[2], core_ema(pyramid[2:], t, labels=labels)[0])
    # The new outer bands start identical in the live and EMA models, from the (seed, stage) generator.
    outer = {k: v for k, v in model.state_dict().items() if not k.startswith("inner_unet.inner_unet.")}
    assert all(torch.equal(v, ema_model.state_dict()[k]) for k, v in outer.items())
    again, _ = initial_models(config, 1, (core.state_dict(), core_ema.state_dict(), 1))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_nesting_refuses_a_model_that_does_not_match(tmp_path: Path):
    config = tiny_config()
    other = tiny_config(["mdm.model.levels.1.channels=[16, 16]", "mdm.model.levels.1.attention_layers=null"])
    wrong = NestedUNet(other.mdm.model.innermost(1))
    with pytest.raises(ValueError, match="innermost"):
        nest_model(wrong, config.mdm.model.innermost(2))
    with pytest.raises(ValueError, match="cannot nest"):
        nest_weights(NestedUNet(config.mdm.model.innermost(1)), wrong.state_dict(), 2)


def test_init_inner_from_a_model_directory(tmp_path: Path):
    from matryoshka.model_dir import save_model_dir

    config = tiny_config()
    core = perturbed(NestedUNet(config.mdm.model.innermost(1)), 6)
    save_model_dir(tmp_path / "core", core, stage_mdm_config(config, 0))
    config = tiny_config(["stages=[{levels: 2, steps: 1, init_inner_from: " + str(tmp_path / "core") + "}]"])
    model, ema_model = initial_models(config, 0, None)
    for name, value in core.state_dict().items():
        assert torch.equal(model.inner_unet.state_dict()[name], value)
        assert torch.equal(ema_model.inner_unet.state_dict()[name], value)


def test_init_inner_from_an_official_checkpoint():
    """An ml-mdm checkpoint file (the shared conformance fixture) starts a stage, converted by load_official."""
    from matryoshka.interop import load_official
    from matryoshka.training import TrainConfig
    from matryoshka.training.testing import tiny_config_dict
    from matryoshka.typed_config import from_dict, to_dict

    shared = Path(__file__).resolve().parents[1].parent / "shared"
    path = shared / "fixtures" / "ml-mdm" / "nested_tiny" / "vis_model.pth"
    if not path.is_file():
        pytest.skip(f"no ml-mdm fixture at {path} (it lives beside the repository, in the project's shared folder)")
    official, model_config, diffusion = load_official(path)
    raw = tiny_config_dict()
    raw["mdm"] = {"model": to_dict(model_config), "diffusion": to_dict(diffusion)}
    raw["stages"] = [{"levels": model_config.num_levels, "steps": 1, "init_inner_from": str(path)}]
    model, ema_model = initial_models(from_dict(TrainConfig, raw), 0, None)
    for name, value in official.state_dict().items():
        assert torch.equal(model.state_dict()[name], value) and torch.equal(ema_model.state_dict()[name], value)


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_warms_up_then_averages():
    live = torch.nn.Linear(3, 2)
    ema = EMA(torch.nn.Linear(3, 2), decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    before = ema.module.weight.detach().clone()
    ema.update(live)
    assert torch.allclose(ema.module.weight, 0.1 * before + 0.9 * live.weight)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99
    assert EMA(torch.nn.Linear(3, 2), decay=0.5, warmup=False).current_decay() == 0.5
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_follows_replaced_weights_buffers_and_models():
    """EMA.update keeps the parameter lists of the last model it saw; what replaces a parameter's data or
    a buffer (`param.data = ...`, `.to()`) and a different live model must still be followed."""
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    live = net()
    ema = EMA(net(), decay=0.5, warmup=False)
    ema.update(live)
    live[0].weight.data = torch.full((2, 3), 4.0)  # new storage behind the same Parameter
    live[1].running_mean = torch.full((2,), 7.0)  # a new buffer tensor
    before = ema.module[0].weight.detach().clone()
    ema.update(live)
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 0.5 * 4.0)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 7.0))
    other = net()
    with torch.no_grad():
        other[0].weight.fill_(-2.0)
    before = ema.module[0].weight.detach().clone()
    ema.update(other)
    assert torch.allclose(ema.module[0].weight, 0.5 * before - 1.0)
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(3, 2))


# ------------------------------------------------------------------------------------------------ checkpoints
def adam_with_state() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path):
    from matryoshka.training.distributed import full_optimizer_state, load_optimizer_state

    model, optimizer = adam_with_state()
    tensors, meta = split_optimizer_state(full_optimizer_state(model, optimizer))
    write_checkpoint(tmp_path, 2, {"optimizer": tensors}, {"optimizer": meta}, keep_last=2)
    saved = find_latest(tmp_path)
    state = read_state(saved)
    restored = join_optimizer_state(read_tensors(saved, "optimizer"), json.loads(json.dumps(state["optimizer"])))
    copy_model, _ = adam_with_state()
    copy_model.load_state_dict(model.state_dict())
    copy_optimizer = torch.optim.AdamW(copy_model.parameters(), lr=1e-2)
    load_optimizer_state(copy_model, copy_optimizer, restored)
    x = torch.randn(5, 4)
    for m, o in ((model, optimizer), (copy_model, copy_optimizer)):
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy_model.parameters(), strict=True))


def test_find_latest_ignores_temporary_and_incomplete_checkpoints(tmp_path: Path):
    weights = {"w": torch.arange(3.0)}
    write_checkpoint(tmp_path, 4, {"model": weights}, {}, keep_last=5)
    good = write_checkpoint(tmp_path, 6, {"model": weights}, {}, keep_last=5)
    # A run killed while writing step 8 leaves a temporary directory; a step-10 directory without its
    # state.json and a step-12 one whose listed file is missing are not complete either.
    (tmp_path / ".tmp-step-0000008-999").mkdir()
    (tmp_path / ".tmp-step-0000008-999" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step-0000010").mkdir()
    broken = tmp_path / "step-0000012"
    broken.mkdir()
    (broken / "state.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    assert find_latest(tmp_path) == good
    (tmp_path / "latest").write_text("step-0000012\n")  # a pointer to an incomplete one is not trusted
    assert find_latest(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000006"]
    assert torch.equal(read_tensors(good, "model")["w"], weights["w"])


def test_old_checkpoints_are_pruned_and_latest_is_written_last(tmp_path: Path):
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, {"note": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000004"
    state = read_state(find_latest(tmp_path))
    assert {k: state[k] for k in ("note", "step", "files")} == {"note": 4, "step": 4, "files": ["model.safetensors"]}
    assert set(state["checksums"]) == {"model.safetensors"}  # size and SHA-256, for finding damage later
    # Writing a step again (a resumed run) replaces it whole.
    write_checkpoint(tmp_path, 4, {"model": {"w": torch.zeros(2)}}, {}, keep_last=2)
    assert torch.equal(read_tensors(find_latest(tmp_path), "model")["w"], torch.zeros(2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_rng_states_survive_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


# ------------------------------------------------------------------------------------------------ data order
def test_global_batches_do_not_depend_on_the_number_of_processes():
    single = list(GlobalBatchSampler(100, 8, 0, 1, epoch=3, offset=0, seed=7, shuffle=True))
    ranks = [list(GlobalBatchSampler(100, 8, r, 4, epoch=3, offset=0, seed=7, shuffle=True)) for r in range(4)]
    assert len(single) == 12  # 100 // 8, the incomplete batch dropped
    for k, batch in enumerate(single):
        assert sum((ranks[r][k] for r in range(4)), []) == batch
    other_epoch = list(GlobalBatchSampler(100, 8, 0, 1, epoch=4, offset=0, seed=7, shuffle=True))
    assert other_epoch != single
    resumed = list(GlobalBatchSampler(100, 8, 0, 1, epoch=3, offset=40, seed=7, shuffle=True))
    assert resumed == single[5:]


def test_batch_stream_resumes_at_its_position():
    config = tiny_config(["data.limit=40"])
    dataset = build_dataset(config.data, 16, 1, 0, 1, 0, FaultCounter())
    stream = BatchStream(dataset, config.data, 0, 1, seed=0)
    for _ in range(6):  # 40 // 8 = 5 batches per epoch: this crosses into epoch 1
        stream.next(8)
    assert stream.position == DataPosition(epoch=1, offset=8)
    position = DataPosition.from_dict(json.loads(json.dumps(stream.position.to_dict())))
    expected = stream.next(8)
    resumed = BatchStream(dataset, config.data, 0, 1, seed=0, position=position).next(8)
    assert torch.equal(resumed["image"], expected["image"]) and resumed["caption"] == expected["caption"]
    assert torch.equal(resumed["label"], expected["label"])


# ------------------------------------------------------------------------------------------------ per-sample draws
def test_draws_depend_only_on_the_global_sample_index():
    shapes = [(1, 16, 16), (1, 8, 8)]
    device = torch.device("cpu")
    whole = draw(list(range(10, 18)), shapes, 1000, 0.5, 3, device)
    second_half = draw(list(range(14, 18)), shapes, 1000, 0.5, 3, device)
    assert torch.equal(whole.t[4:], second_half.t) and torch.equal(whole.drop[4:], second_half.drop)
    assert all(torch.equal(a[4:], b) for a, b in zip(whole.noise, second_half.noise, strict=True))
    other_seed = draw(list(range(10, 18)), shapes, 1000, 0.5, 4, device)
    assert not torch.equal(whole.noise[0], other_seed.noise[0])
    many = draw(list(range(2000)), [(1, 1, 1), (1, 1, 1)], 1000, 0.25, 0, device)
    assert int(many.t.min()) >= 0 and int(many.t.max()) <= 999 and len(set(many.t.tolist())) > 800
    assert abs(many.drop.float().mean().item() - 0.25) < 0.05
    # Every level gets its own noise (not pooled copies of one another).
    levels = torch.stack([many.noise[0].flatten(), many.noise[1].flatten()])
    assert abs(float(torch.corrcoef(levels)[0, 1])) < 0.1


# ------------------------------------------------------------------------------------------------ learning rate
def test_learning_rate_warmup_and_cosine():
    assert learning_rate(0, 100, 1.0, 10, "constant", 0.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, "constant", 0.0) == pytest.approx(1.0)
    assert learning_rate(50, 100, 1.0, 10, "constant", 0.0) == 1.0
    assert learning_rate(10, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert learning_rate(100, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------ loss of a batch
class ShapeSpy(torch.nn.Module):
    """Wraps a model and records the shapes it was called with."""

    def __init__(self, model: NestedUNet) -> None:
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, pyramid, t, **kwargs):
        self.shapes.append([tuple(x.shape) for x in pyramid])
        return self.model(pyramid, t, **kwargs)


def test_mixed_resolution_batches_slice_the_high_levels_before_the_model():
    config = tiny_config(["mdm.diffusion.mixed_ratio=[0.25, 1.0]"])
    mdm = stage_mdm_config(config, 1)
    spy = ShapeSpy(perturbed(NestedUNet(mdm.model), 0))
    schedule = PyramidSchedule.from_config(mdm.diffusion, mdm.model.scales)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    draws = draw(list(range(8)), [(1, 16, 16), (1, 8, 8)], 1000, 0.0, 0, torch.device("cpu"))
    loss = diffusion_loss(spy, images, mdm.model.scales, draws.t, draws.noise, {}, schedule, mdm.diffusion)
    assert spy.shapes == [[(2, 1, 16, 16), (8, 1, 8, 8)]]
    assert loss.total.shape == (8,) and bool((loss.per_level[0][2:] == 0).all())
    assert bool((loss.per_level[0][:2] > 0).all()) and bool((loss.per_level[1] > 0).all())
    loss.mean().backward()


def test_the_loss_uses_the_stage_level_weights():
    config = tiny_config(["stages.1.level_weights=[0.0, 1.0]"])
    mdm = stage_mdm_config(config, 1)
    model = perturbed(NestedUNet(mdm.model), 0)
    schedule = PyramidSchedule.from_config(mdm.diffusion, mdm.model.scales)
    draws = draw(list(range(4)), [(1, 16, 16), (1, 8, 8)], 1000, 0.0, 0, torch.device("cpu"))
    loss = diffusion_loss(model, torch.zeros(4, 1, 16, 16), [2, 1], draws.t, draws.noise, {}, schedule, mdm.diffusion)
    assert torch.allclose(loss.total, loss.per_level[1])


# ------------------------------------------------------------------------------------------------ conditioning
def test_label_dropout_and_unlabelled_samples_get_the_null_label():
    conditioner = BatchConditioner(tiny_config().mdm, torch.device("cpu"))
    kwargs = conditioner(torch.tensor([1, 2, -1, 4]), ["a", "b", "c", "d"], torch.tensor([False, True, False, False]))
    assert kwargs["labels"].tolist() == [1, 10, 10, 4] and "text_states" not in kwargs
    with pytest.raises(ValueError, match="num_classes"):
        conditioner(torch.tensor([12]), ["x"], torch.tensor([False]))


def test_caption_dropout_uses_the_unconditional_embedding(tmp_path: Path):
    from matryoshka.conditioning.testing import TINY_T5_DIM, make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5")
    config = tiny_config(
        ["mdm.model.num_classes=0", f"mdm.model.text_dim={TINY_T5_DIM}", f"mdm.text_encoder=t5:{t5}"]
    )
    conditioner = BatchConditioner(config.mdm, torch.device("cpu"), embedding_cache=str(tmp_path / "cache"))
    captions = ["a red dress", "a bag"]
    kwargs = conditioner(torch.tensor([-1, -1]), captions, torch.tensor([True, False]))
    assert "labels" not in kwargs
    null_states, null_mask = conditioner.encode_text([""])
    n = int(null_mask.sum())
    assert torch.allclose(kwargs["text_states"][0, :n], null_states[0, :n]) and int(kwargs["text_mask"][0].sum()) == n
    direct = conditioner.encoder.encode(["a bag"])
    m = int(direct.mask.sum())
    assert torch.allclose(kwargs["text_states"][1, :m], direct.states[0, :m], atol=1e-6)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2  # "" and "a bag"; the dropped one never
    assert not math.isnan(float(kwargs["text_states"].sum()))


# ------------------------------------------------------------------------------------------------
# Resuming across library versions
def test_resume_check_accepts_a_checkpoint_written_before_a_config_field_existed():
    """A model-config field added to the library since the checkpoint was written takes its default:
    the run resumes. A real change is refused, naming the field; an unreadable config is refused too."""
    from matryoshka.training.loop import check_resumable
    from matryoshka.typed_config import ConfigError, to_dict

    config = tiny_config()
    saved = {"config": to_dict(config)}
    check_resumable(config, saved)

    older = to_dict(config)
    del older["mdm"]["model"]["levels"][0]["num_heads"]  # as written by a version without this field
    del older["mdm"]["diffusion"]["shift_power"]
    check_resumable(config, {"config": older})

    changed = to_dict(config)
    changed["mdm"]["model"]["levels"][-1]["channels"][0] += 8
    with pytest.raises(ConfigError, match=r"mdm\.model\.levels\[1\]\.channels\[0\]"):
        check_resumable(config, {"config": changed})

    unreadable = to_dict(config)
    unreadable["mdm"]["model"]["no_such_option"] = 1
    with pytest.raises(ConfigError, match="cannot read.*no_such_option"):
        check_resumable(config, {"config": unreadable})

    other_stages = to_dict(config)
    other_stages["stages"][0]["steps"] += 1
    with pytest.raises(ConfigError, match="stages"):
        check_resumable(config, {"config": other_stages})
