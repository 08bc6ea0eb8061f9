"""The KAnoCLIP Gradio app (``python app.py``); :func:`build_app` builds it."""

from demo.app import build_app
from demo.state import AppConfig

__all__ = ["AppConfig", "build_app"]
