"""``kanoclip eval``: zero-shot metrics per class and per dataset, laid out like the paper's tables.

Under ``accelerate launch`` (or ``torchrun``) each process evaluates its part of every class and
the main process computes the metrics from the gathered scores and maps
(:mod:`kanoclip.evaluation.evaluate`); it alone shows progress, prints and writes the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kanoclip.cli.options import (
    add_data_option,
    add_model_options,
    load_model,
    positive_int,
    progress_bar,
    read_json_file,
)

DESCRIPTION = (
    "Run the model over each dataset's test images and print, per class and as each dataset's mean, "
    "image AUROC, AP and F1-max, and pixel AUROC, AUPRO and F1-max where masks exist. "
    "Maps and masks are compared at the model's input size."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "evaluate on datasets: image AUROC/AP/F1-max and pixel AUROC/AUPRO/F1-max per class"
    parser = subparsers.add_parser("eval", help=summary, description=DESCRIPTION)
    add_data_option(parser, "evaluate, e.g. visa=/data/visa")
    add_model_options(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE")
    parser.add_argument("--report", metavar="FILE.md", help="also write the markdown report to FILE.md")
    parser.add_argument(
        "--report-dir",
        metavar="DIR",
        help="also write a report folder that opens offline: index.html with the tables and per-class figures "
        "(ROC and PR curves, score histogram, PRO curve, worst cases), report.md, metrics.json and scores.csv "
        "(one row per test image); see docs/evaluation.md",
    )
    parser.add_argument(
        "--worst",
        type=positive_int,
        metavar="K",
        help="with --report-dir: the worst-case gallery shows the K highest-scoring good and the K lowest-scoring "
        "anomalous images of each class (default 4)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    parser.add_argument(
        "--sweep",
        metavar="FILE.json",
        help="evaluate named config variants on one backbone pass per image: a JSON object "
        '{"variant": {"dotted.path": value, ...}, ...}; prints one row per variant and dataset',
    )
    parser.add_argument(
        "--shots",
        type=shot_list,
        metavar="K,K,...",
        help="the few-shot protocol: also evaluate with k normal references per class for each k (e.g. 1,2,4), "
        "drawn from the train split's good images, else from the test split's (left out); mean ± std over --seeds",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="draws of the references per k, with --shots (default 3)"
    )
    parser.set_defaults(func=run)


def shot_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; each a whole number >= 1."""
    try:
        shots = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, e.g. 1,2,4; got {text!r}")
    return shots


def run(args: argparse.Namespace) -> int:
    from kanoclip.data import parse_data_arg
    from kanoclip.distributed import Processes
    from kanoclip.errors import InputError
    from kanoclip.evaluation.evaluate import evaluate, format_report, format_sweep_report, sweep
    from kanoclip.evaluation.fewshot import few_shot, format_few_shot_report
    from kanoclip.evaluation.report import ReportConfig, ReportWriter
    from kanoclip.fileio import atomic_write_json, atomic_write_text

    datasets = [parse_data_arg(spec) for spec in args.data]
    variants = read_json_file(args.sweep, "--sweep") if args.sweep else None
    if variants is not None and not (isinstance(variants, dict) and variants):
        raise InputError(
            f'--sweep {args.sweep}: expected a non-empty JSON object {{"variant name": {{"dotted.path": value}}}}'
        )
    if variants is not None and args.shots:
        raise InputError("--sweep and --shots are separate evaluations; run them one at a time")
    if args.worst is not None and not args.report_dir:
        raise InputError("--worst sets the report folder's gallery; give --report-dir DIR too")
    if args.report_dir and Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        raise InputError(f"--report-dir {args.report_dir} is a file; name a folder (made if missing)")
    procs = Processes(args.device)
    if args.shots and procs.world > 1:
        raise InputError(
            "--shots runs in one process (each run adds its own references); start it without accelerate launch"
        )
    args.device = procs.model_device  # with several processes, each loads the model on its own device
    model = load_model(args)
    bar = progress_bar(0, "evaluating", disable=not procs.is_main)
    writer = None
    if args.report_dir and procs.is_main:
        writer = ReportWriter(args.report_dir, model, ReportConfig(worst=args.worst or ReportConfig.worst))
    observer = writer.observe if writer is not None else None

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        if args.shots:
            results = few_shot(
                model, datasets, args.shots, args.seeds, batch_size=args.batch_size, progress=progress,
                observer=observer,
            )  # fmt: skip
        elif variants is None:
            results = evaluate(
                model, datasets, batch_size=args.batch_size, progress=progress, processes=procs, observer=observer
            )
        else:
            results = sweep(
                model, datasets, variants, batch_size=args.batch_size, progress=progress, processes=procs,
                observer=observer,
            )  # fmt: skip
    finally:
        bar.close()
    if not procs.is_main:
        return 0
    if args.shots:
        report = format_few_shot_report(results, model)
    else:
        report = format_report(results, model) if variants is None else format_sweep_report(results, model)
    if args.json:
        atomic_write_json(args.json, results)
    if args.report:
        atomic_write_text(args.report, report)
    if writer is not None:
        index = writer.finish(results, report)
        print(f"kanoclip eval: report folder written: {index}", file=sys.stderr)
    print(report, end="")
    return 0
