"""KAnoCLIP web app: ``python app.py`` locally; also the entry point of a Hugging Face Space.

    python app.py                                   # training-free, ViT-L/14@336px, http://127.0.0.1:7860
    python app.py --checkpoint checkpoints/mvtec    # start on a trained checkpoint
    python app.py --backbone ./my-clip --port 8080  # a local CLIP folder, another port
    python app.py --references refs/                # saved normal references, shared by every visitor

Every flag has an environment variable (flags win): ``KANOCLIP_BACKBONE``,
``KANOCLIP_CHECKPOINT``, ``KANOCLIP_KB``, ``KANOCLIP_REFERENCES``, ``KANOCLIP_DATA_ROOT``, ``KANOCLIP_PRECISION``,
``KANOCLIP_HOST``, ``KANOCLIP_PORT``. On a Space (``SPACE_ID`` is set) the host and port are Gradio's defaults
(the platform's ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``). See docs/app.md.

The app is **public** (visitors and owners, see docs/app.md "Hosting publicly") on a Space, when
it listens beyond loopback, with ``--share``, or with ``--public`` / ``KANOCLIP_PUBLIC=1``;
``--private`` keeps everyone an owner (e.g. behind your own login).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from kanoclip.config import INT8_ENGINES, PRECISIONS  # light: no torch

    on_space = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="KAnoCLIP web app (Gradio).")
    parser.add_argument(
        "--backbone",
        help="CLIP hub id or local folder (env KANOCLIP_BACKBONE; default openai/clip-vit-large-patch14-336)",
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint folder or hub id to start on (env KANOCLIP_CHECKPOINT; default training-free)"
    )
    parser.add_argument("--kb", help="knowledge-base JSON file (env KANOCLIP_KB; default the built-in one)")
    parser.add_argument(
        "--references",
        help=(
            "folder of saved normal references (KAnoCLIP.save_references); they serve every visitor whose session "
            "has none of that class (env KANOCLIP_REFERENCES; default none)"
        ),
    )
    parser.add_argument(
        "--data-root", help="folder the Train tab may read datasets from (env KANOCLIP_DATA_ROOT; default ./data)"
    )
    parser.add_argument(
        "--checkpoints-dir",
        help="where trained checkpoints go and are listed (env KANOCLIP_CHECKPOINTS_DIR; default ./checkpoints)",
    )
    parser.add_argument("--kb-dir", help="folder the Knowledge tab may save to (env KANOCLIP_KB_DIR; default ./kb)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (env KANOCLIP_DEVICE; default auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=(
            "the backbone's precision; maps and scores are fp32 (env KANOCLIP_PRECISION; default auto: bf16 where the "
            "GPU or CPU has native bf16, fp16 on other GPUs, fp32 on other CPUs; int8, CPU only: the vision tower's "
            "linear layers quantised, for a machine with no GPU)"
        ),
    )
    parser.add_argument(
        "--int8-engine",
        choices=INT8_ENGINES,
        help=(
            "what runs --precision int8 (env KANOCLIP_INT8_ENGINE; default auto: onnxruntime on an x86 CPU without "
            "VNNI when installed, torch elsewhere)"
        ),
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("KANOCLIP_HOST") or (None if on_space else "127.0.0.1"),
        help=(
            "address to listen on (env KANOCLIP_HOST; default 127.0.0.1, Gradio's default on a Space); "
            "0.0.0.0 exposes it to the network"
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ["KANOCLIP_PORT"]) if os.environ.get("KANOCLIP_PORT") else None,
        help="port (env KANOCLIP_PORT; default 7860 or the next free one)",
    )
    parser.add_argument("--no-training", action="store_true", help="hide the Train tab (env KANOCLIP_TRAINING=off)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (makes it public)")
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument(
        "--public",
        action="store_true",
        help=(
            "treat the app as public: visitors' changes stay in their session; saving, training and unlisted models "
            "are the owner's (env KANOCLIP_PUBLIC=1; default: public on a Space or when listening beyond loopback)"
        ),
    )
    roles.add_argument("--private", action="store_true", help="treat everyone as the owner, whatever the address")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from demo import AppConfig, build_app
    from demo.access import AccessConfig, is_public_deployment
    from demo.app import CSS, UPLOAD_LIMIT
    from kanoclip.errors import KAnoCLIPError

    public = is_public_deployment(args.host, share=args.share, public=args.public, private=args.private)
    try:
        access = AccessConfig.from_env(public=public)
    except ValueError as exc:  # e.g. KANOCLIP_ENDPOINTS is not valid JSON: nothing safe to serve
        print(f"kanoclip app: error: {exc}", file=sys.stderr)
        return 2
    config = AppConfig.from_env(
        access=access,
        backbone=args.backbone,
        checkpoint=args.checkpoint,
        kb=args.kb,
        references=args.references,
        data_root=args.data_root,
        checkpoints_dir=args.checkpoints_dir,
        kb_dir=args.kb_dir,
        device=args.device,
        precision=args.precision,
        int8_engine=args.int8_engine,
        training=False if args.no_training else None,
    )
    try:
        app = build_app(config)
    except KAnoCLIPError as exc:  # e.g. an unreadable --kb file: nothing to serve
        print(f"kanoclip app: error: {exc}", file=sys.stderr)
        return 2
    app.launch(
        server_name=args.host, server_port=args.port, share=args.share or None, max_file_size=UPLOAD_LIMIT, css=CSS
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
