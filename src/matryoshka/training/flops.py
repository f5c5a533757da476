"""Training compute, counted: the FLOPs of one optimiser step of a stage (forward + backward of the
trainer's loss at the stage's batch size), by torch's FlopCounterMode on a freshly built model.

What a budget in FLOPs means in the study harness and the video-inflation comparison: equal FLOPs, not
equal seconds, so that runs sharing a machine still compare fairly.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from matryoshka.diffusion import PyramidSchedule
from matryoshka.models import NestedUNet
from matryoshka.training.config import TrainConfig
from matryoshka.training.loop import diffusion_loss
from matryoshka.training.stages import stage_mdm_config


def training_step_flops(config: TrainConfig, stage_index: int) -> float:
    """FLOPs of one optimiser step of stage `stage_index` of `config`.

    Video models train on clips (B, C, T, S, S), or on single frames in a `frames_as_images` stage; a
    `trainable: temporal` stage computes no weight gradients for the frozen layers, so its backward pass
    costs less. Text models get random token states (16 tokens): the frozen text encoder is not counted
    (its outputs are cached during training)."""
    stage = config.stages[stage_index]
    mdm = stage_mdm_config(config, stage_index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = NestedUNet(mdm.model)
    if stage.trainable == "temporal":
        from matryoshka.video import freeze_all_but_temporal

        freeze_all_but_temporal(model)
    schedule = PyramidSchedule.from_config(mdm.diffusion, mdm.model.scales)
    batch = (stage.batch_size or config.data.batch_size) * config.optim.grad_accum
    final = config.mdm.model
    clips = final.num_frames > 0 and not stage.frames_as_images
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, *final.level_shapes(images=not clips)[0], generator=generator) * 2 - 1
    t = torch.randint(0, schedule.num_train_steps, (batch,), generator=generator)
    noise = [torch.randn(batch, *shape, generator=generator) for shape in mdm.model.level_shapes(images=not clips)]
    conditioning: dict[str, torch.Tensor] = {}
    if final.num_classes:
        conditioning["labels"] = torch.randint(0, final.num_classes, (batch,), generator=generator)
    if final.text_dim:
        conditioning["text_states"] = torch.randn(batch, 16, final.text_dim, generator=generator)
        conditioning["text_mask"] = torch.ones(batch, 16, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        loss = diffusion_loss(model, images, final.scales, t, noise, conditioning, schedule, mdm.diffusion,
                              time_scales=final.time_scales if clips else None)
        loss.total.mean().backward()
    return float(counter.get_total_flops())

