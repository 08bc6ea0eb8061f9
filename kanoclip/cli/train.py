"""``kanoclip train``: learn the prompts, Bi-CMCI and Conv-Adapter (see ``docs/training.md``).

Shows a tqdm bar per epoch with the running loss terms; writes the checkpoint, the
resumable training state, ``history.json`` and ``loss_curve.png`` into ``--out`` after
each epoch. Several processes: ``torchrun --nproc_per_node N -m kanoclip train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kanoclip.cli.options import add_data_option, add_model_options, config_overrides, positive_int

OPTIMIZERS = ("adamw", "adam")  # kanoclip.training.trainer.OPTIMIZERS, without importing torch for --help
# TrainConfig fields whose flag is not "--" + the field with dashes.
_FLAGS = {"feature_cache": "--no-feature-cache"}


def flag(option: str, value: object = None) -> str:
    """A :class:`TrainConfig` option as ``kanoclip train`` spells it: ``--seed``, ``--on-bad-sample skip``."""
    name = _FLAGS.get(option, "--" + option.replace("_", "-"))
    if value is None or value is True:
        return name
    if isinstance(value, (list, tuple)):
        return " ".join(f"{name} {v}" for v in value)
    return f"{name} {value}"


def betas(text: str) -> tuple[float, float]:
    """``--betas B1,B2``: two numbers in [0, 1)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected two numbers in [0, 1) separated by a comma, e.g. 0.5,0.999; got {text!r}"
        )
    return values  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the prompts, Bi-CMCI and Conv-Adapter on labelled data (e.g. MVTec-AD's test split)",
        description=(
            "Train KAnoCLIP's learnable parts with the joint loss (paper eq. 13) on one or more datasets, "
            "the CLIP backbone frozen. A checkpoint and a resumable state are written after every epoch."
        ),
    )
    add_data_option(parser, "train on, e.g. mvtec=/data/mvtec_ad")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write, e.g. checkpoints/mvtec")
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs (default 10)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per step and process (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw",
        help="adamw (default) or adam (AnomalyCLIP trains with adam and --betas 0.5,0.999)",
    )  # fmt: skip
    parser.add_argument(
        "--betas",
        type=betas,
        default=(0.9, 0.999),
        metavar="B1,B2",
        help="the optimizer's betas, each in [0, 1) (default 0.9,0.999)",
    )
    parser.add_argument(
        "--image-size", type=positive_int, help="model input size (default: the backbone's, 336 for ViT-L/14@336px)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed: initialisation and each epoch's order (default 0)"
    )
    add_model_options(parser, checkpoint=False)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    parser.add_argument(
        "--no-feature-cache", dest="feature_cache", action="store_false", help="encode the images again at every epoch"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms on a GPU (slower; see docs/training.md, Determinism)",
    )
    parser.add_argument(
        "--on-bad-sample",
        choices=("stop", "skip"),
        default="stop",
        help="an unreadable image or mask: stop with an error naming it (default), or skip it (it is listed)",
    )
    parser.add_argument(
        "--max-samples", type=positive_int, metavar="N", help="train on N evenly spaced samples only (quick runs)"
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO", help="upload the final checkpoint to this Hugging Face repo id"
    )
    parser.set_defaults(func=run)


class _Bars:
    """Turns :class:`TrainProgress` reports into tqdm bars (one per phase / epoch) on stderr."""

    def __init__(self) -> None:
        self.bar = None
        self.key: tuple[int, str] | None = None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.steps == 0:
            tqdm.write(p.message, file=sys.stderr)
            return
        key = (p.epoch, p.message if p.epoch == 0 else "")
        if key != self.key:
            self.close()
            desc = f"epoch {p.epoch}/{p.epochs}" if p.epoch else p.message
            self.bar = tqdm(total=p.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
            self.key = key
        self.bar.n = p.step
        if p.losses:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in p.losses.items()}, refresh=False)
        self.bar.refresh()
        if p.message and p.epoch:
            self.close()
            tqdm.write(p.message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None


def run(args: argparse.Namespace) -> int:
    from kanoclip.config import KAnoCLIPConfig, with_overrides
    from kanoclip.errors import InputError
    from kanoclip.training import TrainConfig, train
    from kanoclip.training.trainer import WordedError

    overrides = config_overrides(args)
    try:
        model = with_overrides(KAnoCLIPConfig(), overrides) if overrides else None
    except ValueError as exc:
        raise InputError(f"--set/--config: {exc}") from None
    config = TrainConfig(
        data=list(args.data),
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
        kb=args.kb,
        backbone=args.backbone,
        device=args.device,
        resume=args.resume,
        feature_cache=args.feature_cache,
        on_bad_sample=args.on_bad_sample,
        max_samples=args.max_samples,
        push_to_hub=args.push_to_hub,
        optimizer=args.optimizer,
        betas=args.betas,
        model=model,
        precision=args.precision,
        int8_engine=args.int8_engine,
        deterministic=args.deterministic,
    )
    bars = _Bars()
    try:
        result = train(config, progress=bars)
    except WordedError as exc:  # the library names its arguments; here they are flags
        raise exc.reworded(flag) from None
    finally:
        bars.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"checkpoint: {result.checkpoint}")
    if result.history:
        last = result.history[-1]
        print(f"epoch {int(last['epoch'])} loss: " + ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k != "epoch"))
    print(f"loss curve: {result.loss_curve}")
    for path, reason in result.skipped:
        print(f"skipped: {path}: {reason}")
    return 0
