"""``kanoclip export``: write a model and its classes as one ONNX graph for deployment.

``kanoclip export --class bottle [--class screw ...] --out model.onnx [--checkpoint C] [--references R]`` writes
``model.onnx`` and its sidecar ``model.onnx.json`` (:mod:`kanoclip.onnx`) and prints the two
paths. The listed classes' text features are baked into the graph; the graph is fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kanoclip.cli.options import add_model_options, load_model
from kanoclip.errors import InputError

FORMATS = ("onnx",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the model and its classes as one ONNX graph (run it with kanoclip.onnx.OnnxDetector)",
        description="Export the model for the listed classes as one ONNX graph plus a JSON sidecar.",
    )
    parser.add_argument(
        "--class", dest="classes", action="append", required=True, metavar="NAME",
        help="a class whose text features are baked in, e.g. bottle (repeatable)",
    )  # fmt: skip
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="the export format (default: onnx)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="the graph to write, e.g. model.onnx (the sidecar goes beside it)",
    )
    parser.add_argument("--opset", type=int, metavar="N", help="the ONNX opset (default: the exporter's)")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kanoclip.onnx import export_onnx, sidecar_path

    if args.precision not in ("auto", "fp32"):
        raise InputError(f"--precision {args.precision}: an export is always fp32; leave --precision out")
    path = export_onnx(load_model(args), args.classes, args.out, opset=args.opset)
    print(path)
    print(sidecar_path(path))
    return 0
