"""Options shared by ``kanoclip detect``, ``eval`` and ``train``: model, device, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kanoclip.config import BACKBONE_ENV, INT8_ENGINES, PRECISIONS
from kanoclip.errors import InputError


def add_data_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    """The repeatable ``--data KIND=PATH``."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="KIND=PATH",
        help=f"dataset to {purpose} (repeatable; a bare PATH has its kind detected)",
    )


def add_model_options(parser: argparse.ArgumentParser, *, checkpoint: bool = True) -> None:
    """``--checkpoint`` (unless training), ``--backbone``, ``--kb`` and ``--device``."""
    loaded = "the checkpoint's, else " if checkpoint else ""
    if checkpoint:
        parser.add_argument(
            "--checkpoint",
            metavar="C",
            help="trained checkpoint folder or hub repo id (default: none, the training-free model)",
        )
    parser.add_argument(
        "--backbone",
        metavar="B",
        help=f"CLIP backbone: hub id or local folder (default: ${BACKBONE_ENV}, else {loaded}ViT-L/14@336px)",
    )
    parser.add_argument("--kb", metavar="FILE", help=f"knowledge-base JSON (default: {loaded}the built-in one)")
    if checkpoint:
        parser.add_argument(
            "--references",
            metavar="DIR",
            help=(
                "saved normal references (kanoclip references build): their map is fused with the model's, "
                "their thresholds used"
            ),
        )
    per_process = "" if checkpoint else "; under torchrun each process takes its own GPU"
    parser.add_argument(
        "--device",
        default="auto",
        metavar="D",
        help=f"cpu, cuda, cuda:1, ... (default: auto = cuda when available{per_process})",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help=(
            "the backbone's precision (int8: the CPU only); maps and scores are always fp32 "
            "(default: auto = bf16 where the GPU or CPU has native bf16, fp16 on other GPUs, fp32 on other CPUs)"
        ),
    )
    parser.add_argument(
        "--int8-engine",
        default="auto",
        choices=INT8_ENGINES,
        help=(
            "what runs --precision int8 (default: auto = onnxruntime on an x86 CPU without VNNI when the [onnx] "
            "extra is installed, torch elsewhere); onnxruntime builds its graph once and keeps it on disk"
        ),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override a config value by its dotted path, e.g. training_free.stage_weights=0,0,0,1 "
            "(repeatable; after --config)"
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE.json", help="config overrides: a JSON object of dotted keys or sections"
    )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` file's overrides, then each ``--set`` on top (values still text)."""
    from kanoclip.config import flatten_overrides, parse_assignment

    overrides: dict[str, Any] = {}
    if args.config:
        try:
            overrides.update(
                flatten_overrides(read_json_file(args.config, "--config"), where=f"--config {args.config}")
            )
        except ValueError as exc:
            raise InputError(str(exc)) from None
    for text in args.set:
        try:
            key, value = parse_assignment(text)
        except ValueError as exc:
            raise InputError(f"--set: {exc}") from None
        overrides[key] = value
    return overrides


def read_json_file(path: str, flag: str) -> Any:
    """A JSON file named by ``flag``, or one line saying why it cannot be read."""
    try:
        return json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{flag} {path}: not valid JSON ({exc})") from None


def load_model(args: argparse.Namespace):
    """The model the options describe (errors are one-line :class:`KAnoCLIPError`)."""
    from transformers.utils import logging as hf_logging

    from kanoclip.detector import KAnoCLIP

    hf_logging.disable_progress_bar()  # the command shows its own progress; no per-shard bars
    # from_pretrained applies the precedence: --backbone, $KANOCLIP_BACKBONE, the checkpoint's
    return KAnoCLIP.from_pretrained(
        args.checkpoint,
        backbone=args.backbone,
        device=args.device,
        kb=args.kb,
        precision=args.precision,
        int8_engine=args.int8_engine,
        overrides=config_overrides(args),
        references=args.references,
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def progress_bar(total: int, desc: str, *, disable: bool = False):
    """A tqdm bar on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=disable, dynamic_ncols=True)
