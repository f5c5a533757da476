"""The training loop. `train(config, out_dir)` is the whole of it, to be read top to bottom.

    start_run:             a fresh run or the newest intact checkpoint; data, conditioning, monitor
    for each stage:        open_stage: nest the last stage's model into the new outer levels (or resume one)
        for each step:     optimizer_step: micro-batches -> pyramid, per-sample t/noise -> model ->
                           multi-resolution loss -> backward; clip, AdamW step and EMA if finite
                           after_step: log, plateau end, sample, checkpoint
        close_stage:       checkpoint, export DIR/model (EMA weights), sample grid

Everything random that shapes a step (data order, time steps, noise, conditioning dropout) is a
function of the seed and the global sample index, so a resumed run, or a run on N processes, trains
on exactly what an uninterrupted single-process run would have.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka import pyramid as pyr
from matryoshka.cpu_allocator import keep_freed_memory
from matryoshka.data import DataFaultError, FaultCounter, label_rows
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.lora import LoRAConfig, add_adapter, freeze_all_but_adapters, merged_state_dict, save_adapter
from matryoshka.losses import LossOutput, multi_resolution_loss, rows_per_level
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import NestedUNet
from matryoshka.models.memory_format import set_memory_format, with_memory_format
from matryoshka.precision import resolve_precision
from matryoshka.training import distributed
from matryoshka.training.checkpoint import (
    RunWriteError,
    capture_rng_state,
    find_intact,
    join_optimizer_state,
    read_state,
    read_tensors,
    remove_stale_temporaries,
    restore_rng_state,
    split_optimizer_state,
    write_checkpoint,
)
from matryoshka.training.conditioning import BatchConditioner
from matryoshka.training.config import StageConfig, TrainConfig
from matryoshka.training.data import BatchStream, DataPosition, build_dataset
from matryoshka.training.ema import EMA
from matryoshka.training.monitor import RunMonitor
from matryoshka.training.noise import draw
from matryoshka.training.optim import learning_rate, make_optimizer
from matryoshka.training.plateau import PlateauTracker, held_out_items, held_out_loss
from matryoshka.training.previews import preview_labels, pyramid_grid, sample_pyramid, save_grid
from matryoshka.training.stages import initial_models, stage_mdm_config
from matryoshka.typed_config import ConfigError, from_dict, save_yaml, to_dict


class NonFiniteLossError(RuntimeError):
    """optim.max_nonfinite_steps steps in a row had a NaN/inf loss or gradient (none of them was applied)."""


@dataclass
class TrainResult:
    step: int  # the global step the run stopped at
    stage: int  # index of the last stage trained
    model_dir: Path | None  # DIR/model, the exported EMA model (None if nothing was trained)
    checkpoint: Path | None  # the last checkpoint written
    losses: dict[str, float] = field(default_factory=dict)  # the last logged scalars
    # The live and EMA networks of the last stage trained in this call (sharded under FSDP); None when
    # nothing was trained.
    model: NestedUNet | None = field(default=None, repr=False)
    ema_model: NestedUNet | None = field(default=None, repr=False)


def train(
    config: TrainConfig, out_dir: str | Path, *, resume: bool = False, max_steps: int | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train `config` into `out_dir`; with `resume`, continue from its latest intact checkpoint.

    For each stage: nest the last stage's model into the new outer levels (or resume the stage from the
    checkpoint), take its optimizer steps (logging, previews, checkpoints, an early end on a plateau), then
    checkpoint and export it. max_steps: stop at this global step (a checkpoint and a model directory are
    written there); the trajectory does not depend on it, so a later `resume` continues exactly.
    quiet: no messages.
    """
    runtime = distributed.setup(config.device)
    try:
        run = start_run(config, Path(out_dir), runtime, resume, max_steps, quiet)
        for stage_index in range(run.first_stage, len(config.stages)):
            if run.closed_by_checkpoint(stage_index):
                continue
            if run.step >= run.last_step:
                break
            stage = open_stage(run, stage_index)
            while run.step < min(stage.end, run.last_step):
                optimizer_step(run, stage)
                if after_step(run, stage):  # the stage ended on its plateau
                    break
            close_stage(run, stage)
        return run.finish()
    finally:
        distributed.cleanup(runtime)


@dataclass
class Run:
    """What a run carries from stage to stage: where it is, its data, conditioning, monitor and result."""

    config: TrainConfig
    out_dir: Path
    runtime: distributed.Runtime
    max_steps: int | None
    saved: dict[str, Any] | None  # the state.json of the checkpoint being resumed
    start: Path | None  # that checkpoint, until its stage has been loaded
    step: int
    first_stage: int
    samples_seen: int
    ended: dict[int, int]  # stages that ended on a plateau (end_on_plateau) -> the steps they ran
    faults: FaultCounter
    stream: BatchStream
    conditioner: BatchConditioner
    preview_prompts: list[str] | None
    monitor: RunMonitor
    autocast_dtype: torch.dtype | None  # bf16 / fp16 mixed precision, or None (fp32)
    scaler: torch.amp.GradScaler | None  # fp16's loss scaling
    sharded: bool
    result: TrainResult
    precision: str = "fp32"  # optim.precision resolved ("auto" -> what this machine runs fastest)
    stage_flops: list[float] | None = None  # FLOPs of each stage's optimizer step, when budget_tflops sizes the last
    previous: tuple[dict, dict, int] | None = None  # (weights, EMA weights, levels) of the last stage

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def bounds(self) -> list[int]:
        return self.config.stage_bounds(self.ended, self.stage_flops)

    @property
    def last_step(self) -> int:
        return self.bounds[-1] if self.max_steps is None else min(self.bounds[-1], self.max_steps)

    def resumes(self, stage_index: int) -> bool:
        return self.saved is not None and self.start is not None and stage_index == self.saved["stage"]

    def closed_by_checkpoint(self, stage_index: int) -> bool:
        """Whether the checkpoint being resumed closed this stage (or the run); if so its model is exported
        again (a run killed between the checkpoint and the export left that unfinished) and kept for nesting."""
        if not self.resumes(stage_index) or self.step < min(self.bounds[stage_index + 1], self.last_step):
            return False
        stage = self.config.stages[stage_index]
        self.previous = (read_tensors(self.start, "model"), read_tensors(self.start, "ema"), stage.levels)
        mdm = stage_mdm_config(self.config, stage_index)
        ema_weights = self.previous[1]
        self.result.model_dir = export_weights(
            self.out_dir, stage_index, self.step, ema_weights, mdm, self.runtime, self.config.lora
        )
        self.start = None
        return True

    def finish(self) -> TrainResult:
        if self.result.model_dir is None and (self.out_dir / "model").is_dir():
            self.result.model_dir = self.out_dir / "model"
        model_dir = self.result.model_dir
        self.monitor.message(f"done at step {self.step}" + (f"; model in {model_dir}" if model_dir else ""))
        if self.faults.report()["attempted"]:
            self.monitor.message(fault_summary(self.faults))
        self.monitor.close()
        distributed.barrier(self.runtime)
        return self.result


def start_run(
    config: TrainConfig, out_dir: Path, runtime: distributed.Runtime, resume: bool, max_steps: int | None, quiet: bool
) -> Run:
    """Where the run starts (a fresh run, or the newest intact checkpoint), its data stream, conditioning,
    monitor and random state."""
    device = runtime.device
    if device.type == "cpu" and config.optim.keep_freed_memory:
        keep_freed_memory()
    checkpoints = out_dir / "checkpoints"
    start, damaged = find_intact(checkpoints) if resume else (None, [])
    saved = read_state(start) if start is not None else None
    if saved is not None:
        check_resumable(config, saved)
    step = saved["step"] if saved else 0
    ended = saved_stage_ends(saved) if saved else {}
    stage_flops = budgeted_stage_flops(config)
    bounds = config.stage_bounds(ended, stage_flops)  # refuses a budget the earlier stages exceed
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoints)
        save_yaml(config, out_dir / "config.yaml")
    last_step = bounds[-1] if max_steps is None else min(bounds[-1], max_steps)

    final = config.mdm.model
    faults = FaultCounter(config.data.max_failure_ratio, config.data.min_samples)
    dataset = build_dataset(
        config.data, final.image_size, final.in_channels, runtime.rank, runtime.world_size, config.seed, faults,
        num_frames=final.num_frames,
    )
    found_classes = getattr(dataset, "class_names", None)
    if found_classes is not None and len(found_classes) != final.num_classes:
        raise ConfigError(
            "mdm.model.num_classes",
            f"is {final.num_classes} but {config.data.path} has {len(found_classes)} class folders",
        )
    position = per_rank(saved, "data", runtime) if saved else None
    stream = BatchStream(
        dataset, config.data, runtime.rank, runtime.world_size, config.seed,
        DataPosition.from_dict(position) if position else None, pin_memory=device.type == "cuda",
    )
    conditioner = BatchConditioner(config.mdm, device, config.data.embedding_cache)
    monitor = RunMonitor(
        out_dir, runtime.is_main, config.logging.tensorboard, config.logging.progress and not quiet, last_step, step,
        quiet,
    )
    precision = training_precision(config, device, runtime, saved)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = None
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device.type)
        if saved is not None and saved.get("grad_scaler"):
            scaler.load_state_dict(saved["grad_scaler"])
    if damaged and runtime.is_main:  # said even under --quiet: the run goes back in time
        for path, reason in damaged:
            print(f"warning: skipped the damaged checkpoint {path} ({reason})", file=sys.stderr)
        fallback = start.name if start else "none: starting from scratch"
        print(f"warning: resuming from the newest intact checkpoint: {fallback}", file=sys.stderr)
    monitor.message(
        f"training on {device} x {runtime.world_size} process(es), {precision}, "
        f"steps {step}..{last_step} of {bounds[-1]}" + (f", resumed from {start}" if start else "")
    )
    # Everything that may draw from the global generators (text encoder construction, ...) is done:
    # seed them now, or restore them from the checkpoint (they drive dropout layers).
    rng = per_rank(saved, "rng", runtime) if saved else None
    if rng is not None:
        restore_rng_state(rng)
    else:
        seed_everything(config.seed * 1000 + runtime.rank)
    return Run(
        config, out_dir, runtime, max_steps, saved, start, step, saved["stage"] if saved else 0,
        saved["samples_seen"] if saved else 0, ended, faults, stream, conditioner, config.logging.sample_prompts,
        monitor, autocast_dtype, scaler, config.distributed == "fsdp" and runtime.distributed,
        TrainResult(step, saved["stage"] if saved else 0, None, start), precision, stage_flops,
    )


def budgeted_stage_flops(config: TrainConfig) -> list[float] | None:
    """Each stage's FLOPs per optimizer step, counted once at the start, when budget_tflops sizes the last
    stage; else None (nothing to count)."""
    if config.budget_tflops is None:
        return None
    from matryoshka.training.flops import training_step_flops  # it imports this module's loss

    return [training_step_flops(config, index) for index in range(len(config.stages))]


def training_precision(config: TrainConfig, device: torch.device, runtime: distributed.Runtime,
                       saved: dict | None) -> str:
    """optim.precision, with "auto" resolved: bf16 on GPUs that support it; on a CPU the faster of fp32
    and bf16 for the final model's training step at this batch, measured once per machine
    (matryoshka.precision). A resumed "auto" run keeps the precision it started with."""
    if config.optim.precision != "auto":
        return config.optim.precision
    if saved is not None and saved.get("precision"):
        return saved["precision"]
    rows = max(1, config.data.batch_size // runtime.world_size)
    return resolve_precision("auto", config.mdm.model, device, rows, train=True,
                             channels_last=config.optim.channels_last)


@dataclass
class Stage:
    """One stage in training: its model, EMA, optimizer and the running state of its steps."""

    index: int
    config: StageConfig
    mdm: MDMConfig
    start: int  # global step at which the stage starts
    end: int  # ... and ends (its plateau may end it sooner)
    model: NestedUNet
    ema_model: NestedUNet
    wrapped: torch.nn.Module  # the model under DDP / FSDP
    forward: torch.nn.Module  # `wrapped`, compiled when optim.compile
    ema: EMA
    optimizer: torch.optim.Optimizer
    base_lr: float
    warmup: int
    lr_schedule: str  # "constant" or "cosine"
    schedule: PyramidSchedule
    batch_size: int
    parameters: list[torch.nn.Parameter]
    window: LossWindow
    plateau: PlateauTracker | None = None
    held_out: list[dict] | None = None
    saved_at: int = -1
    previewed_at: int = -1
    nonfinite_in_a_row: int = 0
    lr: float = 0.0
    tick: float = field(default_factory=time.perf_counter)

    @property
    def level_names(self) -> list[str]:
        return [f"loss/{size}px" for size in self.mdm.model.sizes]


def open_stage(run: Run, stage_index: int) -> Stage:
    """The stage's model: the last stage's nested into new outer levels (or a given inner model), or the
    stage as the checkpoint being resumed left it; its EMA and optimizer."""
    config, device = run.config, run.device
    stage = config.stages[stage_index]
    bounds = run.bounds
    mdm = stage_mdm_config(config, stage_index)
    resuming = run.resumes(stage_index)
    if resuming:  # weights loaded below
        model, ema_model = _network(mdm, config.lora), _network(mdm, config.lora)
    else:
        model, ema_model = initial_models(config, stage_index, run.previous)
        if config.lora is not None:  # B = 0: the adapted model starts exactly where the given one is
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed * 1000 + stage_index)
                add_adapter(model, config.lora)
            ema_model = copy.deepcopy(model)
    if config.lora is not None:
        freeze_all_but_adapters(model)
    if stage.trainable == "temporal":
        from matryoshka.video import freeze_all_but_temporal

        if not freeze_all_but_temporal(model):
            raise ConfigError(f"stages[{stage_index}].trainable", "is temporal but the model has no temporal layers")
    if config.optim.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    memory_format = torch.channels_last if config.optim.channels_last else torch.preserve_format
    set_memory_format(model.to(device), memory_format)
    set_memory_format(ema_model.to(device), memory_format)
    wrapped = distributed.wrap(model, config.distributed, run.runtime)
    # The compiled module shares `wrapped`'s weights; clipping, the optimizer and checkpoints use `wrapped`.
    forward = torch.compile(wrapped) if config.optim.compile else wrapped
    if run.sharded:
        distributed.shard(ema_model)
    ema = EMA(ema_model, config.ema.decay, config.ema.warmup)
    base_lr = stage.lr if stage.lr is not None else config.optim.lr
    warmup = stage.warmup_steps if stage.warmup_steps is not None else config.optim.warmup_steps
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # all of them, or a LoRA run's adapters
    optimizer = make_optimizer(trainable, config.optim, base_lr, device, run.sharded)
    if resuming:
        distributed.load_full_state_dict(wrapped, read_tensors(run.start, "model"))
        distributed.load_full_state_dict(ema_model, read_tensors(run.start, "ema"))
        optimizer_state = join_optimizer_state(read_tensors(run.start, "optimizer"), run.saved["optimizer"])
        distributed.load_optimizer_state(wrapped, optimizer, optimizer_state)
        ema.num_updates = run.saved["ema_updates"]
        run.start = None
    schedule = PyramidSchedule.from_config(mdm.diffusion, mdm.model.scales).to(device)
    run.monitor.message(
        f"stage {stage_index + 1}/{len(config.stages)}: levels {mdm.model.sizes} px, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"steps {bounds[stage_index]}..{bounds[stage_index + 1]}"
    )
    wrapped.train()
    result = Stage(
        stage_index, stage, mdm, bounds[stage_index], bounds[stage_index + 1], model, ema_model, wrapped, forward, ema,
        optimizer, base_lr, warmup, stage.lr_schedule or config.optim.schedule, schedule,
        stage.batch_size or config.data.batch_size,
        trainable,  # once per stage: walking the module tree costs time every step
        LossWindow(mdm.model.num_levels, device),
    )
    if stage.end_on_plateau is not None:
        result.plateau = PlateauTracker.from_dict(stage.end_on_plateau, run.saved.get("plateau") if resuming else None)
        final = config.mdm.model
        result.held_out = held_out_items(
            config.data, final.image_size, final.in_channels, final.num_frames, config.seed,
            stage.end_on_plateau.batch_size,
        )
    return result


def optimizer_step(run: Run, stage: Stage) -> bool:
    """One optimizer step: the micro-batches' multi-resolution loss and gradients, clipping, and the update
    and EMA update if the loss and gradients are finite on every rank. Returns whether they were."""
    config, device, runtime = run.config, run.device, run.runtime
    final = config.mdm.model
    stage.lr = learning_rate(
        run.step - stage.start, stage.end - stage.start, stage.base_lr, stage.warmup, stage.lr_schedule,
        config.optim.min_lr_ratio,
    )
    for group in stage.optimizer.param_groups:
        group["lr"] = stage.lr
    local_batch = stage.batch_size // runtime.world_size
    step_loss = torch.zeros((), device=device)  # only to test it for NaN/inf
    for micro in range(config.optim.grad_accum):
        try:
            batch = run.stream.next(stage.batch_size)
        except DataFaultError:  # from a DataLoader worker, its message wrapped in the worker's traceback
            run.faults.check()  # the counts are shared: the same verdict, with the plain message
            raise
        if run.preview_prompts is None:
            run.preview_prompts = batch["caption"][: max(1, config.logging.sample_count)]
        first = run.samples_seen + runtime.rank * local_batch
        images = batch["image"]
        if stage.config.frames_as_images and images.ndim == 5:
            images = one_frame_each(images, first)
        draws = draw(
            list(range(first, first + local_batch)), stage.mdm.model.level_shapes(images=images.ndim == 4),
            stage.schedule.num_train_steps, config.data.cond_dropout if run.conditioner.conditional else 0.0,
            config.seed, device,
        )
        conditioning = run.conditioner(batch["label"], batch["caption"], draws.drop)
        with distributed.gradient_sync(stage.wrapped, micro == config.optim.grad_accum - 1):
            with torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32,
                                enabled=run.autocast_dtype is not None):
                loss = diffusion_loss(
                    stage.forward, images.to(device, non_blocking=True), final.scales, draws.t, draws.noise,
                    conditioning, stage.schedule, stage.mdm.diffusion, config.optim.channels_last,
                    time_scales=final.time_scales if images.ndim == 5 else None,
                )
            scaled = loss.mean() / config.optim.grad_accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        step_loss += loss.mean().detach().float()
        run.samples_seen += stage.batch_size
        stage.window.add(loss)
    if run.scaler is not None:
        run.scaler.unscale_(stage.optimizer)  # clip and test the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(stage.parameters, config.optim.grad_clip or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # A NaN/inf loss or gradient on any rank skips the step whole (weights, optimizer state and EMA untouched).
    # A NaN loss can come with finite gradients (a NaN term that does not depend on the weights), so both
    # are tested; summed, in one sync (and one all-reduce under torchrun so that every rank decides alike).
    checks = torch.stack([grad_norm.float(), step_loss])
    grad_ok, loss_ok = torch.isfinite(distributed.mean_over_ranks(runtime, checks)).tolist()
    finite = grad_ok and loss_ok
    if finite:
        if run.scaler is not None:
            run.scaler.step(stage.optimizer)
        else:
            stage.optimizer.step()
        stage.nonfinite_in_a_row = 0
    else:  # bf16/fp16 overflow, a bad sample: skip the update, keep going (up to a limit)
        stage.window.skipped += 1
        # fp16 gradients that overflow at a finite loss are the loss scale's to fix (lowered just below);
        # only a non-finite loss counts towards the limit then.
        if run.scaler is None or not loss_ok:
            stage.nonfinite_in_a_row += 1
    if run.scaler is not None:
        run.scaler.update(new_scale=None if finite else run.scaler.get_scale() * run.scaler.get_backoff_factor())
    stage.optimizer.zero_grad(set_to_none=True)
    if finite:
        stage.ema.update(stage.model)
    run.step += 1
    if stage.nonfinite_in_a_row >= config.optim.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"stopped at step {run.step}: the loss or its gradients were NaN/inf in {stage.nonfinite_in_a_row} steps "
            f"in a row (steps {run.step - stage.nonfinite_in_a_row + 1}..{run.step}, optim.max_nonfinite_steps="
            f"{config.optim.max_nonfinite_steps}); none of them was applied, so the last checkpoint ("
            f"{run.result.checkpoint or 'none yet'}) holds clean weights. Check the data, lower the learning rate, "
            "or train in fp32."
        )
    if finite:  # summed on the device: reading it now would wait for the optimizer step
        stage.window.grad_norm += grad_norm.detach().float()
    stage.window.steps += 1
    return finite


def after_step(run: Run, stage: Stage) -> bool:
    """Logs, the plateau test, previews and checkpoints due at this step; True when the stage ends here."""
    config, step = run.config, run.step
    ends_here = False
    if step % config.logging.every == 0 or step in (stage.end, run.last_step):
        elapsed = time.perf_counter() - stage.tick
        stage.tick = time.perf_counter()
        images_per_step = stage.batch_size * config.optim.grad_accum
        scalars = stage.window.summary(run.runtime, stage.level_names, elapsed, images_per_step)
        scalars["lr"] = stage.lr
        scalars.update(fault_scalars(run.faults))
        run.faults.check()
        run.monitor.scalars(step, scalars, {"stage": stage.index, "epoch": run.stream.position.epoch})
        run.monitor.advance(step, {"loss": f"{scalars['loss']:.4f}", "stage": str(stage.index + 1)})
        run.result.losses = scalars
        stage.window = LossWindow(stage.mdm.model.num_levels, run.device)
    else:
        run.monitor.advance(step)
    if stage.plateau is not None and stage.plateau.due(step - stage.start):
        final = config.mdm.model
        value = held_out_loss(
            stage.ema_model, stage.held_out, stage.mdm, final.scales, stage.schedule, run.conditioner, config.seed,
            run.device, time_scales=final.time_scales if final.num_frames else None,
        )
        run.monitor.scalars(step, {"held_out_loss": value}, {"stage": stage.index})
        if stage.plateau.update(step - stage.start, value):
            run.ended[stage.index] = step - stage.start
            run.monitor.message(
                f"stage {stage.index + 1} ends at step {step}: its held-out loss ({value:.5f}) has not improved on "
                f"{stage.plateau.best:.5f} for {stage.plateau.stale} measurements"
            )
            ends_here = True
    if ends_here:
        return True
    if config.logging.sample_every and step % config.logging.sample_every == 0:
        write_preview(run, stage)
    if config.checkpoint.every and step % config.checkpoint.every == 0:
        save_stage_checkpoint(run, stage)
    return False


def close_stage(run: Run, stage: Stage) -> None:
    """The end of a stage (or of the run): checkpoint, export DIR/model, preview, and keep its weights for
    the next stage to nest."""
    run.result.step, run.result.stage = run.step, stage.index
    run.result.model, run.result.ema_model = stage.model, stage.ema_model
    if stage.saved_at != run.step:
        save_stage_checkpoint(run, stage)
    run.result.model_dir = export_model(
        run.out_dir, stage.index, run.step, stage.ema_model, stage.mdm, run.runtime, run.config.lora
    )
    if stage.previewed_at != run.step:
        write_preview(run, stage)
    run.previous = (
        distributed.full_state_dict(stage.wrapped), distributed.full_state_dict(stage.ema_model), stage.config.levels
    )


def save_stage_checkpoint(run: Run, stage: Stage) -> None:
    extra = {**progress_state(run.ended, stage.plateau), "precision": run.precision}
    if run.scaler is not None:
        extra["grad_scaler"] = run.scaler.state_dict()
    run.result.checkpoint = save_checkpoint(
        run.checkpoints, run.step, stage.index, run.samples_seen, stage.wrapped, stage.ema, stage.optimizer,
        run.stream, run.config, run.runtime, extra,
    )
    stage.saved_at = run.step


# ------------------------------------------------------------------------------------------------
# The loss of one micro-batch
def diffusion_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: list[int],
    t: torch.Tensor,
    noise: list[torch.Tensor],
    conditioning: dict[str, torch.Tensor],
    schedule: PyramidSchedule,
    diffusion: DiffusionConfig,
    channels_last: bool = False,
    time_scales: list[int] | None = None,
) -> LossOutput:
    """Per-sample multi-resolution loss of a batch of clean top-level images (B, C, S, S), or of clips
    (B, C, T, S, S) with the final model's `time_scales` (the frames of every level, see ModelConfig).

    scales: the *final* model's level scales (the pyramid is always built from the full-size image,
    then cut to the model's innermost levels); t (B,) and noise (one (B, ...) tensor per model level)
    come from `noise.draw`. Mixed-resolution batches: level r is noised and predicted only for the
    first rows_per_level[r] rows (the loss accounts for the rest).
    """
    num_levels = schedule.num_levels
    clean = pyr.build_pyramid(images, scales, time_scales)[-num_levels:]
    clean = [x / s for x, s in zip(clean, schedule.signal_scales, strict=True)]
    rows = rows_per_level(images.shape[0], diffusion.mixed_ratio, num_levels)
    gammas = schedule.at(t + 1, dtype=clean[0].dtype)
    noisy = [
        pyr.add_noise(x[:n], eps[:n], g[:n]) for x, eps, g, n in zip(clean, noise, gammas, rows, strict=True)
    ]
    inputs = [pyr.model_input(x, g[:n], diffusion.prediction) for x, g, n in zip(noisy, gammas, rows, strict=True)]
    if channels_last:
        inputs = [with_memory_format(x, torch.channels_last) for x in inputs]
    predictions = model(inputs, t, **conditioning)
    return multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, diffusion)


def one_frame_each(clips: torch.Tensor, first_sample: int) -> torch.Tensor:
    """Clips (B, C, T, H, W) -> frames (B, C, H, W): sample n of the run (global index) gets frame n mod T,
    so every frame position is trained on, the same way on any number of processes and after a resume."""
    frames = (torch.arange(clips.shape[0]) + first_sample) % clips.shape[2]
    return clips[torch.arange(clips.shape[0]), :, frames]


class LossWindow:
    """Sums of the losses since the last log, kept on the device (no sync per step)."""

    def __init__(self, num_levels: int, device: torch.device) -> None:
        self.sums = torch.zeros(num_levels + 1, device=device)
        self.micro_steps = 0
        self.steps = 0
        self.grad_norm = torch.zeros((), device=device)
        self.skipped = 0

    def add(self, loss: LossOutput) -> None:
        values = [loss.total.mean()] + [level.mean() for level in loss.per_level]
        self.sums += torch.stack(values).detach().float()
        self.micro_steps += 1

    def summary(self, runtime: distributed.Runtime, names: list[str], seconds: float, images_per_step: int):
        means = distributed.mean_over_ranks(runtime, self.sums / max(1, self.micro_steps)).tolist()
        scalars = {"loss": means[0], **dict(zip(names, means[1:], strict=True))}
        scalars["grad_norm"] = float(self.grad_norm) / max(1, self.steps - self.skipped)  # over the applied steps
        scalars["images_per_s"] = images_per_step * self.steps / max(seconds, 1e-9)
        if self.skipped:
            scalars["skipped_steps"] = float(self.skipped)
        return scalars


def fault_scalars(faults: FaultCounter) -> dict[str, float]:
    report = faults.report()
    if not report["attempted"]:
        return {}
    scalars = {"data/failed": float(report["failed"]), "data/failure_ratio": float(report["failure_ratio"])}
    scalars.update({f"data/{kind}": float(n) for kind, n in report["failures"].items()})
    return scalars


def fault_summary(faults: FaultCounter) -> str:
    """One line for the end of a run: how many samples were skipped, by kind (this process's loader)."""
    report = faults.report()
    kinds = ", ".join(f"{kind}={n}" for kind, n in sorted(report["failures"].items()))
    notes = ", ".join(f"{kind}={n}" for kind, n in sorted(report["notes"].items()))
    return (
        f"data: {report['failed']} of {report['attempted']} samples were bad and skipped"
        + (f" ({kinds})" if kinds else "")
        + (f"; kept with notes: {notes}" if notes else "")
    )


# ------------------------------------------------------------------------------------------------
# Checkpoints, exports, previews
def progress_state(ended: dict[int, int], plateau: PlateauTracker | None) -> dict[str, Any]:
    """What a checkpoint records of automatic stage ends: the stages that ended early, and the running
    plateau decision of the current stage."""
    return {"stage_ends": {str(k): v for k, v in ended.items()}, "plateau": plateau.to_dict() if plateau else None}


def saved_stage_ends(state: dict[str, Any]) -> dict[int, int]:
    """The stage ends a checkpoint's state.json recorded (`progress_state`): stage index -> steps it ran."""
    return {int(k): int(v) for k, v in (state.get("stage_ends") or {}).items()}


def save_checkpoint(
    root: Path, step: int, stage_index: int, samples_seen: int, model: torch.nn.Module, ema: EMA,
    optimizer: torch.optim.Optimizer, stream: BatchStream, config: TrainConfig, runtime: distributed.Runtime,
    progress: dict[str, Any] | None = None,
) -> Path:
    """Gather everything on rank 0 (collective), which writes the checkpoint atomically."""
    weights = distributed.full_state_dict(model)
    ema_weights = distributed.full_state_dict(ema.module)
    optimizer_tensors, optimizer_meta = split_optimizer_state(distributed.full_optimizer_state(model, optimizer))
    positions = distributed.gather_objects(runtime, stream.position.to_dict())
    rng_states = distributed.gather_objects(runtime, capture_rng_state())
    path = root / f"step-{step:07d}"
    if runtime.is_main:
        state = {
            "stage": stage_index,
            "stage_levels": config.stages[stage_index].levels,
            "samples_seen": samples_seen,
            "ema_updates": ema.num_updates,
            "world_size": runtime.world_size,
            "data": positions,
            "rng": rng_states,
            "optimizer": optimizer_meta,
            "config": to_dict(config),
            **(progress or {}),
        }
        path = write_checkpoint(
            root, step, {"model": weights, "ema": ema_weights, "optimizer": optimizer_tensors}, state,
            config.checkpoint.keep_last,
        )
    distributed.barrier(runtime)
    return path


def export_model(
    out_dir: Path, stage_index: int, step: int, ema_model: torch.nn.Module, mdm: MDMConfig,
    runtime: distributed.Runtime, lora_config: LoRAConfig | None = None,
) -> Path:
    """DIR/model (and DIR/stages/stage-N): the EMA weights as a model directory for `matryoshka generate`.
    A LoRA run's model has its adapter fused in, and the adapter alone goes to DIR/lora."""
    weights = distributed.full_state_dict(ema_model) if distributed.is_sharded(ema_model) else None
    target = out_dir / "model"
    if runtime.is_main:
        plain = ema_model
        if weights is not None:
            plain = _network(mdm, lora_config)
            plain.load_state_dict(weights)
        card = (
            f"# Matryoshka diffusion model\n\nTrained with `matryoshka train`: stage {stage_index + 1}, "
            f"global step {step}, levels {mdm.model.sizes} px (EMA weights).\n"
        )
        try:
            if lora_config is not None:
                save_adapter(plain, out_dir / "lora", lora_config)
                merged = NestedUNet(mdm.model)
                merged.load_state_dict(merged_state_dict(plain))
                plain = merged
                card += "\nLoRA fine-tuning: the adapter (fused here) is in the run's lora/ directory.\n"
            for directory in (out_dir / "stages" / f"stage-{stage_index + 1}", target):
                save_model_dir(directory, plain, mdm, card)
        except OSError as error:
            raise RunWriteError(
                error.errno, f"could not write the model export in {out_dir} (step {step}): "
                f"{error.strerror or error}; the checkpoint of step {step} is intact: fix the cause (e.g. free "
                "some space), then continue with --resume, which exports the model again",
            ) from error
    distributed.barrier(runtime)
    return target


def _network(mdm: MDMConfig, lora_config: LoRAConfig | None) -> NestedUNet:
    """A stage's network as the trainer holds it: with its LoRA adapter in a LoRA run (weights loaded after)."""
    with torch.random.fork_rng(devices=[]):  # leave the global generators alone (they drive dropout)
        torch.manual_seed(0)
        model = NestedUNet(mdm.model)
        if lora_config is not None:
            add_adapter(model, lora_config)
    return model


def export_weights(
    out_dir: Path, stage_index: int, step: int, ema_weights: dict[str, torch.Tensor], mdm: MDMConfig,
    runtime: distributed.Runtime, lora_config: LoRAConfig | None = None,
) -> Path:
    """`export_model` from a checkpoint's full EMA weights (the network is built on rank 0 only)."""
    ema_model = torch.nn.Module()  # other ranks only wait at the barrier
    if runtime.is_main:
        ema_model = _network(mdm, lora_config)
        ema_model.load_state_dict(ema_weights)
    return export_model(out_dir, stage_index, step, ema_model, mdm, runtime, lora_config)


def write_preview(run: Run, stage: Stage) -> None:
    """DIR/samples/step-XXXXXXX.png (+ .gif for video) from the EMA model (every rank takes part when it is
    sharded): one row per sample, labelled with its prompt or class, also logged to TensorBoard."""
    config, runtime, step = run.config, run.runtime, run.step
    stage.previewed_at = step
    count = config.logging.sample_count
    if count == 0 or not (runtime.is_main or run.sharded):
        return
    conditional, unconditional = run.conditioner.for_samples(count, run.preview_prompts)
    device = runtime.device
    with torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32, enabled=run.autocast_dtype is not None):
        levels = sample_pyramid(
            stage.ema_model, stage.mdm.diffusion, stage.schedule, conditional, unconditional, count,
            config.logging.sample_steps, config.logging.sample_guidance, config.seed, device,
        )
    if runtime.is_main:
        grid = pyramid_grid(levels)
        labels = preview_labels(stage.mdm, count, run.preview_prompts)
        if labels is not None:
            grid = label_rows(grid, labels, scale=2)
        save_grid(grid, run.out_dir / "samples" / f"step-{step:07d}.png")
        run.monitor.image("samples", grid, step)
        if levels[0].ndim == 5:  # video: the top level also as an animation
            from matryoshka.video import save_video, tile_videos

            path = run.out_dir / "samples" / f"step-{step:07d}.gif"
            save_video(tile_videos(levels[0].float().cpu()), path, upscale=2)


# ------------------------------------------------------------------------------------------------
# Small helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_rank(saved: dict[str, Any], key: str, runtime: distributed.Runtime) -> Any:
    """This rank's entry of a per-rank list in state.json; None if the world size changed."""
    values = saved.get(key) or []
    if len(values) == runtime.world_size:
        return values[runtime.rank]
    if key == "data" and values:  # map-style positions are global: any rank's is right
        return values[0]
    return None


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """Dotted paths where two plain config trees (to_dict output) differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for key in keys for d in _differences(old.get(key), new.get(key), f"{path}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [path]


def check_resumable(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with a different model or stage layout."""
    old = saved.get("config", {})
    try:
        # Through the dataclass, so that a field added to the library since the checkpoint was written
        # takes its default instead of counting as a difference.
        old_mdm = to_dict(from_dict(MDMConfig, old.get("mdm")))
    except ConfigError as error:
        message = f"the checkpoint being resumed has a config this version cannot read ({error})"
        raise ConfigError("mdm", message) from None
    changed = _differences(old_mdm, to_dict(config.mdm), "mdm")
    if changed:
        raise ConfigError(
            "mdm", f"differs from the config of the checkpoint being resumed at {', '.join(changed[:5])}; "
            "use a new --out"
        )
    layout = [(s["levels"], s["steps"]) for s in old.get("stages", [])]
    if layout != [(s.levels, s.steps) for s in config.stages]:
        raise ConfigError(
            "stages", f"levels/steps differ from the checkpoint being resumed ({layout}); use a new --out"
        )


__all__ = ["NonFiniteLossError", "TrainResult", "diffusion_loss", "train"]
