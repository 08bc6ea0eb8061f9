"""``kanoclip references``: build a class's normal references once, use them with ``--references``.

``kanoclip references build --class bottle GOOD_DIR --out refs/`` encodes the good images with the
model the other options describe (the references only fit a model of the same backbone, input size
and mode) and saves them with their leave-one-out threshold; ``kanoclip references show refs/`` lists
what a folder holds. Run ``build`` again with ``--out`` the same folder to add another class.
"""

from __future__ import annotations

import argparse
import json

from kanoclip.cli.options import add_model_options, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "references", help="build and list k-shot normal references (used with --references)",
        description="Normal reference images per class: a memory bank that detect, eval and the app fuse with "
        "the model's map.",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="references_command", metavar="ACTION", required=True)
    build = commands.add_parser(
        "build", help="encode good images of one class and save them", description=__doc__.splitlines()[0]
    )
    build.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="normal (good) images of the class, files and/or folders"
    )
    build.add_argument(
        "--class", dest="class_name", required=True, metavar="NAME", help="what the images show, e.g. bottle"
    )
    build.add_argument(
        "--out", required=True, metavar="DIR", help="folder to save the references in (others' classes there are kept)"
    )
    add_model_options(build)
    build.set_defaults(func=run_build)
    show = commands.add_parser("show", help="list the classes, counts and thresholds a references folder holds")
    show.add_argument("folder", metavar="DIR")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)


def run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kanoclip.cli.detect import find_images
    from kanoclip.references import TENSORS_NAME

    out = Path(args.out).expanduser()
    if args.references is None and (out / TENSORS_NAME).is_file():
        args.references = str(out)  # add to what the folder holds
    model = load_model(args)
    paths = [path for path, _ in find_images(args.inputs)]
    refs = model.add_references(args.class_name, [str(p) for p in paths])
    model.save_references(out)
    default = model.config.scoring.threshold
    print(f"{refs.class_name}: {refs.count} references saved to {out}; {refs.describe(default)}")
    return 0


def run_show(args: argparse.Namespace) -> int:

    from kanoclip.references import read_index

    index = read_index(args.folder)  # the one in the tensors file: what loading reads
    rows = [
        {
            "class": c["class"],
            "count": len(c["image_names"]),
            "threshold": c["threshold"],
            "calibration": c["calibration"],
            "scored_by": c["scored_by"],  # the model the threshold was computed for; recomputed for another
        }
        for c in index["classes"]
    ]
    if args.json:
        print(json.dumps({"identity": index["identity"], "classes": rows}, indent=2))
        return 0
    print("built for: " + ", ".join(f"{k}={v}" for k, v in index["identity"].items()))
    for row in rows:
        threshold = "default" if row["threshold"] is None else f"{row['threshold']:.3f} ({row['calibration']})"
        print(f"{row['class']}: {row['count']} references, threshold {threshold}, computed for {row['scored_by']}")
    return 0
