"""``kanoclip kb``: build, show and list knowledge bases.

``kb build`` asks an OpenAI-compatible server for the paper's LLM (and optionally
VQA) descriptions and extends ``--out``; ``kb show`` prints one class's
descriptions under their true source (LLM, VQA, built-in or hand-written, generic
fallback); ``kb list`` prints how many descriptions of each source each class has.
Without ``--kb``, ``show`` and ``list`` read the built-in (hand-written) knowledge base.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kanoclip.errors import InputError
from kanoclip.knowledge import KNOWLEDGE_SOURCES, SOURCE_LABELS, STORED_SOURCES, KnowledgeBase, generate
from kanoclip.knowledge import classes as catalog


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``kb`` command and its ``build``, ``show`` and ``list`` subcommands."""
    kb = subparsers.add_parser(
        "kb",
        help="build, show and list knowledge bases (anomaly descriptions: LLM, VQA or hand-written)",
        description="Build, show and list KnPL knowledge bases: anomaly descriptions per class.",
    )
    sub = kb.add_subparsers(dest="kb_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser(
        "build",
        help="generate descriptions with an OpenAI-compatible LLM/VQA server",
        description=(
            "Ask an LLM for N descriptions per class with the paper's template, and a VQA model for M "
            "descriptions per image found under --images. --out is extended, never overwritten; "
            "a rerun only asks for what it still lacks. With one --classes value every image belongs "
            "to it; with several, an image belongs to the first folder on its path that names one of them."
        ),
    )
    build.add_argument("--classes", required=True, help="comma-separated class names, e.g. bottle,screw")
    build.add_argument(
        "--images", metavar="DIR", help="folder searched recursively for images to describe with the VQA model"
    )
    build.add_argument("--llm-url", required=True, help="base URL of the LLM server, e.g. https://api.openai.com/v1")
    build.add_argument("--llm-model", required=True, help="LLM model name, e.g. gpt-4o-mini or llama3.1")
    build.add_argument("--vqa-url", help="base URL of the VQA server (default: --llm-url)")
    build.add_argument("--vqa-model", help="VQA model name, e.g. gpt-4o-mini or llama3.2-vision")
    build.add_argument("--n", type=int, default=5, help="LLM descriptions per class (default 5)")
    build.add_argument("--m", type=int, default=1, help="VQA descriptions per image (default 1)")
    build.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY, may be unset for local servers)",
    )
    build.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default 120)")
    build.add_argument("--retries", type=int, default=3, help="retries after a failed request (default 3)")
    build.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    build.add_argument("--out", required=True, help="knowledge-base JSON file to create or extend")
    build.set_defaults(func=run_build)

    show = sub.add_parser("show", help="print the descriptions of one class")
    show.add_argument("class_name", metavar="CLASS", help="class name (aliases accepted, e.g. 'metal nut')")
    listing = sub.add_parser("list", help="print every class with its description counts")
    for parser, handler in ((show, run_show), (listing, run_list)):
        parser.add_argument("--kb", metavar="FILE", help="knowledge-base file (default: the built-in one)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(func=handler)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


def run_show(args: argparse.Namespace) -> int:
    """``kb show CLASS``: the class's descriptions grouped by their source."""
    kb = KnowledgeBase.load_or_builtin(args.kb)
    if not args.class_name.strip():
        raise InputError("class name is empty; pass a class such as 'bottle'")
    known = kb.is_known(args.class_name)
    name = kb.resolve(args.class_name) or args.class_name
    descriptions = kb.descriptions(args.class_name)
    suggestions = [] if known else kb.suggest(args.class_name)
    near = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
    if args.json:
        by_source: dict[str, list[Any]] = {source: [] for source in KNOWLEDGE_SOURCES}
        for d in descriptions:
            by_source[d.source].append(
                {"image": d.image_name or d.image, "text": d.text} if d.source == "vqa" else d.text
            )
        _print_json({"class": name, **by_source, "suggestions": suggestions})
        if not known:
            print(
                f"note: class {args.class_name!r} is not in the knowledge base{near}; "
                "these are the generic fallback descriptions",
                file=sys.stderr,
            )
        return 0
    if not known:
        print(f"{args.class_name}: not in the knowledge base{near}; the generic fallback descriptions are used:")
    else:
        datasets = ", ".join(catalog.datasets_of(name))
        print(f"{name}" + (f" ({datasets})" if datasets else ""))
    for source in KNOWLEDGE_SOURCES:
        group = [d for d in descriptions if d.source == source]
        if group:
            print(f"{SOURCE_LABELS[source]} descriptions ({len(group)}):")
        for i, d in enumerate(group, 1):
            print(f"  [{d.image_name or d.image}] {d.text}" if source == "vqa" else f"  {i}. {d.text}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``kb list``: per class, how many descriptions of each stored source it has, and its dataset."""
    counts = KnowledgeBase.load_or_builtin(args.kb).counts()
    if args.json:
        _print_json({"classes": counts})
        return 0
    width = max((len(name) for name in counts), default=5)
    widths = {s: max(4, len(s)) for s in STORED_SOURCES}
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>{widths[s]}}" for s in STORED_SOURCES) + "  dataset")
    for name, c in counts.items():
        columns = "  ".join(f"{c[s]:>{widths[s]}}" for s in STORED_SOURCES)
        print(f"{name:<{width}}  {columns}  {', '.join(catalog.datasets_of(name))}")
    return 0


def _parse_classes(text: str) -> list[str]:
    names = list(dict.fromkeys(catalog.class_key(part) for part in text.split(",") if part.strip()))
    if not names:
        raise InputError("--classes is empty; pass comma-separated class names, e.g. --classes bottle,screw")
    return names


def run_build(args: argparse.Namespace) -> int:
    """``kb build``."""
    from tqdm import tqdm

    classes = _parse_classes(args.classes)
    if args.images and not args.vqa_model:
        raise InputError("--images needs a VQA model; pass --vqa-model (and --vqa-url if it is another server)")
    api_key = generate.api_key_from_env(args.api_key_env)
    options = {"api_key": api_key, "timeout": args.timeout, "retries": args.retries}
    pairs: list = []
    skipped: list = []
    if args.images:
        pairs, skipped = generate.assign_classes(args.images, classes)
        if not pairs:
            raise InputError(
                f"no image under {args.images} belongs to --classes {','.join(classes)}; check --images and --classes"
            )
    llm = generate.ChatClient(args.llm_url, args.llm_model, **options)
    vqa = generate.ChatClient(args.vqa_url or args.llm_url, args.vqa_model, **options) if args.images else None
    bar: tqdm | None = None

    def progress(event: generate.Progress) -> None:
        nonlocal bar
        if event.kind == "start":
            bar = tqdm(total=event.total, desc="kb build", unit="task", file=sys.stderr, disable=event.total == 0)
            return
        assert bar is not None
        bar.set_postfix_str(event.class_name if event.image_name is None else f"{event.class_name}/{event.image_name}")
        bar.update(1)

    try:
        report = generate.build(
            args.out,
            classes,
            llm=llm,
            vqa=vqa,
            images=pairs,
            n=args.n,
            m=args.m,
            concurrency=args.concurrency,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
        llm.close()
        if vqa is not None:
            vqa.close()
    print(
        f"{report.path}: added {report.llm_added} LLM and {report.vqa_added} VQA descriptions "
        f"({report.cached} classes/images already complete)"
    )
    if skipped:
        print(f"skipped {len(skipped)} images under no folder named after one of --classes", file=sys.stderr)
    for line in report.short:
        print(f"warning: fewer descriptions than asked for {line}; rerun to ask again", file=sys.stderr)
    return 0
