"""Teach the embedded text-to-image model a new word, with LoRA and with full fine-tuning.

The word is "zorp", a made-up name for the Sneaker class. The fine-tuning data is an image folder of
Fashion-MNIST training images (padded to 32 px, as the model was trained) with sidecar captions: half are
sneakers captioned with the 16 caption templates around "a zorp" / "zorps", half are the other nine classes
with their ordinary captions (so the old words are rehearsed). Both runs start from the embedded model
(stages.0.init_from) and take the same steps; `matryoshka train` runs them, each in its own process, so
its wall time and peak memory are its own.

Measured before and after, with the fidelity classifier (`matryoshka.evaluation.run`, FID included):
- the new word: prompts naming "a zorp" -> how often the classifier sees a sneaker;
- the old classes: one ordinary caption per class -> class accuracy (should stay where it was).

    python benchmarks/lora_new_word.py --out runs/lora-new-word          # ~15 CPU minutes
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from matryoshka.data import CLASS_NAMES, FashionMNIST, caption_for_label
from matryoshka.data.captions import TEMPLATES
from matryoshka.evaluation import write_json_report
from matryoshka.evaluation.run import EvalSettings, Evaluator
from matryoshka.pipeline import BUNDLED_DIR, MatryoshkaPipeline
from matryoshka.typed_config import dump_yaml

ROOT = Path(__file__).resolve().parent.parent
WORD, PLURAL, SNEAKER = "a zorp", "zorps", 7


def zorp_caption(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    return template.format(a=WORD, n=PLURAL)


def write_folder(directory: Path, per_half: int, seed: int) -> Path:
    """per_half sneakers captioned with the new word, per_half images of the other classes, ordinary captions."""
    data = FashionMNIST("train", image_size=32, channels=1, fit="pad")
    labels = np.asarray(data.labels)
    rng = np.random.default_rng(seed)
    captions = random.Random(seed)
    sneakers = rng.choice(np.where(labels == SNEAKER)[0], per_half, replace=False)
    others = rng.choice(np.where(labels != SNEAKER)[0], per_half, replace=False)
    directory.mkdir(parents=True, exist_ok=True)
    for kind, indices in (("zorp", sneakers), ("old", others)):
        for i in indices:
            image = ((data.image_tensor(int(i))[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(directory / f"{kind}-{i}.png")
            text = zorp_caption(captions) if kind == "zorp" else caption_for_label(int(labels[i]), captions)
            (directory / f"{kind}-{i}.txt").write_text(text)
    return directory


def train_config(folder: Path, steps: int, lora: bool, out: Path) -> Path:
    base = BUNDLED_DIR / "fashion-t2i"
    mdm = (base / "config.yaml").read_text()
    import yaml

    config = {
        "mdm": yaml.safe_load(mdm),
        "data": {"dataset": "folder", "path": str(folder), "batch_size": 32, "cond_dropout": 0.1,
                 "embedding_cache": str(ROOT / "runs" / "embedding-cache" / "minilm")},
        "optim": {"lr": 1e-3 if lora else 2e-4, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
        "stages": [{"levels": 2, "steps": steps, "init_from": str(base)}],
        "ema": {"decay": 0.99}, "checkpoint": {"every": 0},
        "logging": {"every": 50, "sample_count": 8, "sample_prompts": [f"a photo of {WORD}", "a coat"],
                    "tensorboard": False, "progress": False},
        "seed": 0,
    }
    if lora:
        config["lora"] = {"rank": 4, "alpha": 4}
    path = out / f"{'lora' if lora else 'full'}.yaml"
    path.write_text(dump_yaml(config))
    return path


def run_training(config: Path, out: Path, threads: int) -> dict:
    """`matryoshka train` in a child process under /usr/bin/time: its wall time, CPU time (user + system;
    less sensitive than wall time to other jobs on the machine) and peak resident memory."""
    report = out.with_suffix(".time")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(report), sys.executable, "-m", "matryoshka.cli", "train",
               str(config), "--out", str(out), "--threads", str(threads), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    wall, user, system, peak_kb = report.read_text().split()[-4:]
    return {"wall_s": float(wall), "cpu_s": float(user) + float(system), "peak_rss_mb": int(peak_kb) / 1024}


def fidelity(pipe, evaluator_settings: dict, prompts: list[str], labels: list[int]) -> dict:
    settings = EvalSettings(prompts=prompts, prompt_labels=labels, **evaluator_settings)
    report = Evaluator(settings, progress=False).evaluate(pipe)
    return {"accuracy": report["conditioning"]["accuracy"], "per_class": report["conditioning"]["per_class"],
            "fid": report["fid"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lora-new-word")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=1000, help="images in the folder (half new word)")
    parser.add_argument("--num-samples", type=int, default=200, help="samples per measurement")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = write_folder(args.out / "folder", args.images // 2, seed=0)
    rng = random.Random(1)
    new_word = [zorp_caption(rng) for _ in range(20)]
    old = [caption_for_label(c, rng) for c in range(10) for _ in range(2)]
    old_labels = [c for c in range(10) for _ in range(2)]
    evaluation = {"num_samples": args.num_samples, "steps": 50, "guidance": 3.0, "num_reference": 2000,
                  "kid_subsets": 10, "kid_subset_size": 100, "batch_size": 100}
    results: dict = {"word": WORD, "steps": args.steps, "images": args.images, "machine": "see BENCHMARKS.md"}
    embedded = MatryoshkaPipeline.from_pretrained("fashion-t2i")
    results["before"] = {"new_word": fidelity(embedded, evaluation, new_word, [SNEAKER] * len(new_word)),
                         "old_classes": fidelity(embedded, evaluation, old, old_labels)}
    print("before:", json.dumps({k: v["accuracy"] for k, v in results["before"].items()}), flush=True)
    for kind in ("lora", "full"):
        run = args.out / kind
        if not (run / "model" / "config.yaml").is_file():
            results[kind] = {"training": run_training(train_config(folder, args.steps, kind == "lora", args.out), run,
                                                      args.threads)}
        else:
            results[kind] = {"training": json.loads((args.out / "results.json").read_text())[kind]["training"]}
        pipe = MatryoshkaPipeline.from_pretrained("fashion-t2i")
        if kind == "lora":
            pipe.load_lora_weights(run / "lora")
            results[kind]["adapter_bytes"] = (run / "lora" / "adapter.safetensors").stat().st_size
        else:
            pipe = MatryoshkaPipeline.from_pretrained(run / "model")
        results[kind]["new_word"] = fidelity(pipe, evaluation, new_word, [SNEAKER] * len(new_word))
        results[kind]["old_classes"] = fidelity(pipe, evaluation, old, old_labels)
        print(kind, json.dumps({k: v["accuracy"] for k, v in results[kind].items() if isinstance(v, dict)
                                and "accuracy" in v}), results[kind]["training"], flush=True)
        write_json_report(results, args.out / "results.json")
    results["model_bytes"] = (BUNDLED_DIR / "fashion-t2i" / "model.safetensors").stat().st_size
    write_json_report(results, args.out / "results.json")
    lines = ["| model | 'a zorp' -> Sneaker | old classes (10 x 2 prompts) | FID (old prompts) | train CPU s "
             "| train wall s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in ("before", "lora", "full"):
        r = results[kind]
        training = r.get("training", {})
        lines.append(f"| {kind} | {r['new_word']['accuracy']:.1%} | {r['old_classes']['accuracy']:.1%} | "
                     f"{r['old_classes']['fid']:.1f} | {training.get('cpu_s', 0):.0f} | "
                     f"{training.get('wall_s', 0):.0f} | {training.get('peak_rss_mb', 0):.0f} |")
    print("\n".join(lines))
    print(f"classes: {', '.join(CLASS_NAMES)}")


if __name__ == "__main__":
    main()
