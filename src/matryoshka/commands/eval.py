"""`matryoshka eval --model DIR`: sample a model and score it (FID, KID, precision/recall, conditioning
fidelity). Writes report.json, samples.png and per_class_accuracy.png into --out.

    matryoshka eval --model runs/fashion/model --num-samples 1000 --steps 20 --out eval/fashion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matryoshka.evaluation.run import FASHION_MNIST, EvalSettings
    from matryoshka.pipeline import available_samplers

    defaults = EvalSettings()
    parser.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                        help="a model directory (config.yaml + model.safetensors), a bundled name or a hub id")
    parser.add_argument(
        "--reference", default=FASHION_MNIST, metavar="fashion_mnist|FOLDER|STATS.npz",
        help="real images to compare with: the Fashion-MNIST test split (default), a folder of images, or an .npz "
        "of reference statistics (mu and sigma of the 2048-d Inception pool features, as other FID tools write "
        "them; FID only)",
    )
    parser.add_argument(
        "--prompts", type=Path, metavar="FILE",
        help="prompts for a text-to-image model, one per line (cycled over the samples), or a TSV "
        "'prompt<TAB>class' whose class (an index or a class name) the fidelity classifier checks. Without it a "
        "text model is prompted with Fashion-MNIST captions, which only makes sense against fashion_mnist",
    )
    parser.add_argument("--clip-model", metavar="NAME_OR_DIR", default=None,
                        help="CLIP score with this transformers CLIP (a hub id such as openai/clip-vit-base-patch32, "
                        "or a local directory)")
    parser.add_argument("--num-reference", type=int, default=None, metavar="M",
                        help=f"reference images used (default {defaults.num_reference}; video models: real clips, "
                        "default 256)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples, metavar="N",
                        help=f"samples generated and scored (default {defaults.num_samples})")
    parser.add_argument("--steps", type=int, default=defaults.steps, metavar="K",
                        help=f"sampler steps (default {defaults.steps})")
    parser.add_argument("--guidance", default=str(defaults.guidance), metavar="W",
                        help=f"guidance scale, or one per level highest first: 2 or 2,1 (default {defaults.guidance})")
    parser.add_argument("--sampler", default=defaults.sampler, choices=available_samplers(),
                        help=f"sampler (default {defaults.sampler})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default {defaults.seed})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="B",
                        help=f"images per forward pass (default {defaults.batch_size})")
    classifier = parser.add_mutually_exclusive_group()
    classifier.add_argument(
        "--classifier", type=Path, metavar="DIR",
        help="a saved classifier for conditioning fidelity (default: one trained on Fashion-MNIST, cached)",
    )
    classifier.add_argument("--no-classifier", action="store_true", help="skip conditioning fidelity")
    parser.add_argument("--classifier-epochs", type=int, default=defaults.classifier_epochs,
                        help=f"epochs of a classifier trained on the fly (default {defaults.classifier_epochs})")
    parser.add_argument("--motion-classifier-steps", type=int, default=300,
                        help="video models: training steps of the motion classifier trained on the fly (default 300)")
    parser.add_argument("--kid-subsets", type=int, default=defaults.kid_subsets,
                        help=f"KID subsets (default {defaults.kid_subsets})")
    parser.add_argument("--kid-subset-size", type=int, default=defaults.kid_subset_size,
                        help=f"KID subset size, capped by the smaller set (default {defaults.kid_subset_size})")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="reference statistics and classifiers (default $MATRYOSHKA_CACHE/eval or "
                        "~/.cache/matryoshka/eval)")
    parser.add_argument("--text-encoder", metavar="SPEC", help="override a text model's encoder (e.g. t5:/dir)")
    parser.add_argument("--device", default=defaults.device, help=f"torch device (default {defaults.device})")
    parser.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "fp16", "auto"],
                        help="the network's precision while sampling (see `matryoshka generate --help`; compare "
                        f"FIDs at equal precision). Default {defaults.precision}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, required=True, help="output directory (report.json, PNG plots)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report in --out (without it a --out holding report.json is refused)")


def parse_guidance(text: str) -> float | list[float]:
    """"2" -> 2.0; "2,1" -> [2.0, 1.0] (one per level, highest first)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--guidance must be a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def read_prompts(path: Path, class_names: list[str] | None = None) -> tuple[list[str], list[int] | None]:
    """(prompts, classes or None) from a prompts file: one prompt per line, or 'prompt<TAB>class' lines."""
    from matryoshka.commands.common import UsageError
    from matryoshka.data import CLASS_NAMES

    if not path.is_file():
        raise UsageError(f"--prompts {path} does not exist")
    lines = [line.rstrip("\n\r") for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise UsageError(f"--prompts {path} holds no prompts")
    if not any("\t" in line for line in lines):
        return [line.strip() for line in lines], None
    names = [name.lower() for name in (class_names or list(CLASS_NAMES))]
    prompts, classes = [], []
    for number, line in enumerate(lines, start=1):
        prompt, _, label = line.partition("\t")
        label = label.strip()
        if number == 1 and label.lower() == "class":
            continue  # a header
        if label.isdigit():
            classes.append(int(label))
        elif label.lower() in names:
            classes.append(names.index(label.lower()))
        else:
            raise UsageError(f"--prompts {path} line {number}: class {label!r} is neither an index nor one of {names}")
        prompts.append(prompt.strip())
    return prompts, classes


def run(args: argparse.Namespace) -> int:
    from matryoshka.commands.common import check_device, refuse_existing_file
    from matryoshka.evaluation import InceptionUnavailableError
    from matryoshka.evaluation.run import EvalSettings, Evaluator
    from matryoshka.pipeline import MatryoshkaPipeline
    from matryoshka.typed_config import ConfigError

    check_device(args.device)
    refuse_existing_file(args.out / "report.json", "--out", args.overwrite)
    prompts, prompt_labels = read_prompts(args.prompts) if args.prompts is not None else (None, None)
    try:
        from matryoshka.commands.generate import resolve_model_dir

        directory = resolve_model_dir(args.model)
        pipe = MatryoshkaPipeline.from_pretrained(directory, device=args.device, text_encoder=args.text_encoder)
        if pipe.is_video:
            return run_video(args, pipe)
        settings = EvalSettings(
            num_samples=args.num_samples, steps=args.steps, guidance=parse_guidance(args.guidance),
            sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, reference=args.reference,
            num_reference=args.num_reference or EvalSettings().num_reference, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            classifier_epochs=args.classifier_epochs, device=args.device, prompts=prompts,
            prompt_labels=prompt_labels, clip_model=args.clip_model, precision=args.precision,
        )
        settings.validate()
        evaluator = Evaluator(
            settings, cache_dir=args.cache_dir, classifier_dir=args.classifier, skip_classifier=args.no_classifier,
            progress=not args.quiet,
        )
        report = evaluator.evaluate(pipe, args.out, model_name=str(args.model))
    except (ValueError, TypeError, FileNotFoundError, ConfigError, InceptionUnavailableError) as error:
        print(f"matryoshka eval: error: {error}", file=sys.stderr)
        return 2

    if args.quiet:
        return 0
    accuracy = report["conditioning"]["accuracy"]
    kid_mean, kid_std = report["kid"]["mean"], report["kid"]["std"]
    parts = [f"{report['num_samples']} samples, {settings.steps} {settings.sampler} steps: FID {report['fid']:.2f}"]
    if kid_mean is not None:
        parts.append(f"KID {kid_mean:.4f} ± {kid_std:.4f}  precision {report['precision']:.3f}  "
                     f"recall {report['recall']:.3f}")
    if accuracy is not None:
        parts.append(f"conditioning accuracy {accuracy:.1%}")
    if report.get("clip_score"):
        parts.append(f"CLIP score {report['clip_score']['mean']:.2f}")
    print("  ".join(parts) + f"\nreport: {args.out / 'report.json'}")
    return 0


def run_video(args: argparse.Namespace, pipe) -> int:
    """The video evaluation (matryoshka.evaluation.video): frame FID/KID, motion accuracy, consistency."""
    from matryoshka.evaluation.video import VideoEvalSettings, VideoEvaluator

    guidance = parse_guidance(args.guidance)
    settings = VideoEvalSettings(
        num_clips=args.num_samples, steps=args.steps, guidance=guidance if isinstance(guidance, float) else None,
        sampler=args.sampler, seed=args.seed, batch_size=min(args.batch_size, 16),
        num_reference_clips=args.num_reference or 256, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, classifier_steps=args.motion_classifier_steps, device=args.device,
        precision=args.precision,
    )
    report = VideoEvaluator(settings, args.cache_dir, progress=not args.quiet,
                            classifier_dir=args.classifier).evaluate(pipe, args.out, model_name=str(args.model))
    if not args.quiet:
        motion, consistency = report["motion"], report["consistency"]
        print(
            f"{report['num_clips']} clips: frame FID {report['frame_fid']:.2f} (as many real clips: "
            f"{report['real_floor']['frame_fid']:.2f})  motion "
            f"{motion['direction_accuracy']:.0%} as asked ({motion['axis_accuracy']:.0%} on the axis; real "
            f"{motion['real']['direction_accuracy']:.0%}, still {motion['still_copies']['direction_accuracy']:.0%}, "
            f"chance 25%)  frame consistency {consistency['samples']:.3f} (real {consistency['real']:.3f})"
            f"\nreport: {args.out / 'report.json'}"
        )
    return 0
