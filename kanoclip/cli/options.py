"""Options shared by ``kanoclip detect``, ``eval`` and ``train``: model, device, progress bars."""

from __future__ import annotations

import argparse
import sys

from kanoclip.config import BACKBONE_ENV


def add_data_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    """The repeatable ``--data KIND=PATH``."""
    parser.add_argument(
        "--data", action="append", required=True, metavar="KIND=PATH",
        help=f"dataset to {purpose} (repeatable; a bare PATH has its kind detected)",
    )


def add_model_options(parser: argparse.ArgumentParser, *, checkpoint: bool = True) -> None:
    """``--checkpoint`` (unless training), ``--backbone``, ``--kb`` and ``--device``."""
    loaded = "the checkpoint's, else " if checkpoint else ""
    if checkpoint:
        parser.add_argument(
            "--checkpoint", metavar="C",
            help="trained checkpoint folder or hub repo id (default: none, the training-free model)",
        )
    parser.add_argument(
        "--backbone", metavar="B",
        help=f"CLIP backbone: hub id or local folder (default: ${BACKBONE_ENV}, else {loaded}ViT-L/14@336px)",
    )
    parser.add_argument("--kb", metavar="FILE", help=f"knowledge-base JSON (default: {loaded}the built-in one)")
    per_process = "" if checkpoint else "; under torchrun each process takes its own GPU"
    parser.add_argument(
        "--device", default="auto", metavar="D", help=f"cpu, cuda, cuda:1, ... (default: auto = cuda when available{per_process})"
    )


def load_model(args: argparse.Namespace):
    """The model the options describe (errors are one-line :class:`KAnoCLIPError`)."""
    from transformers.utils import logging as hf_logging

    from kanoclip.model import KAnoCLIP

    hf_logging.disable_progress_bar()  # the command shows its own progress; no per-shard bars
    # from_pretrained applies the precedence: --backbone, $KANOCLIP_BACKBONE, the checkpoint's
    return KAnoCLIP.from_pretrained(args.checkpoint, backbone=args.backbone, device=args.device, kb=args.kb)


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
