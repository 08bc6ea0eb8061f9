"""``precision="int8"`` on onnxruntime: CLIP-VV's vision tower as a dynamically quantised ONNX graph.

Why a second engine: on an AVX2-only CPU (no VNNI) torch's dynamic int8 kernels ran ViT-L/14@336's
vision tower at 0.54x its fp32 time and onnxruntime's MLAS int8 kernels at 0.36x
(``docs/performance.md`` §9), which is what takes ``detect`` under half the bare fp32 forward
there. Which engine ``int8`` uses is :func:`kanoclip.precision.resolve_int8_engine`'s rule.

What runs where (:class:`OnnxInt8Tower`):

* **in the graph** -- :meth:`CLIPVV.tokens <kanoclip.modeling.vv_attention.CLIPVV.tokens>`, exported
  with ``torch.onnx.export`` for one set of V-V path lengths, image token and input size (the batch
  axis is dynamic): the patch embedding, ``pre_layrnorm``, every block of the original path and the
  V-V path's blocks. It outputs each path's CLS token and stage tokens, so the V-V capture happens
  inside the graph as it does in torch.
* **int8 in it** -- every ``MatMul`` with a constant weight: the blocks' q/k/v/out projections and
  MLP and the V-V path's ``out_proj``. Weights int8 per output channel, activations quantised per
  tensor at run time (``onnxruntime.quantization.quantize_dynamic``, no calibration): the recipe of
  torch's ``int8`` (:func:`kanoclip.precision.int8_vision_copy`) and the fastest measured on that CPU.
  The patch embedding (a convolution), the layer norms, the softmax and the products between
  activations (``Q·Kᵀ``, ``V·Vᵀ``) stay fp32: quantising those too (``MatMulConstBOnly`` off) ran
  ViT-L's tower slower on the AVX2 CPU, not faster (``docs/performance.md`` §9).
* **in torch, fp32** -- ``post_layernorm``, the visual projection and everything after them. So a
  :class:`~kanoclip.detection.Detection` keeps guidance, stage maps, references and thresholds,
  exactly as with the torch engine.

Exporting and quantising ViT-L takes minutes, so each graph is built once and kept on disk in
``$KANOCLIP_CACHE_DIR/int8-onnx`` (default ``~/.cache/kanoclip/int8-onnx``), named by a digest of
what it depends on (:meth:`OnnxInt8Tower.settings`: the vision tower's weights, the CLIP-VV settings,
the input size, torch's and onnxruntime's versions, the recipe); a change of any of them builds a new
one. At most ``KANOCLIP_INT8_GRAPHS`` graphs (default 4; ViT-L's is 0.3 GB) stay there, the least
recently used removed first, and at most ``max_sessions`` are loaded in memory. The model loads its
own graph when it is loaded (:meth:`OnnxInt8Tower.prepare`), so the first detection is not the one
that waits.

Needs the ``[onnx]`` extra (``pip install 'kanoclip[onnx]'``: onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPModel

from kanoclip.cache import LRUCache
from kanoclip.errors import KAnoCLIPError
from kanoclip.modeling.vv_attention import CLIPVV, PathTokens
from kanoclip.onnx import export_graph, require

logger = logging.getLogger("kanoclip")

ENGINE = "onnxruntime"
GRAPH_FORMAT = 2  # bumped when what the graph computes changes
CACHE_ENV = "KANOCLIP_CACHE_DIR"
GRAPHS_ENV = "KANOCLIP_INT8_GRAPHS"
RECIPE = (
    "quant_pre_process, then quantize_dynamic: MatMul with constant weights, int8 weights per channel, "
    "activations per tensor"
)
INPUT = "pixel_values"


def graph_cache_dir() -> Path:
    """Where int8 graphs are kept: ``$KANOCLIP_CACHE_DIR/int8-onnx``, else ``~/.cache/kanoclip/int8-onnx``.

    Returns:
        The folder (not created here).
    """
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "kanoclip")
    return Path(root).expanduser() / "int8-onnx"


def graphs_to_keep() -> int:
    """``KANOCLIP_INT8_GRAPHS`` (default 4): how many int8 graphs the cache folder keeps.

    Raises:
        KAnoCLIPError: the variable is not a whole number of at least 1.
    """
    text = os.environ.get(GRAPHS_ENV, "").strip() or "4"
    if not text.isdigit() or int(text) < 1:
        raise KAnoCLIPError(f"{GRAPHS_ENV} must be a whole number of at least 1, got {text!r}; e.g. {GRAPHS_ENV}=4")
    return int(text)


class _TokensGraph(nn.Module):
    """What is exported: :meth:`CLIPVV.tokens` for fixed path lengths, its outputs flattened.

    Outputs, per path in ``lengths`` order: ``cls`` (B, width), then each stage's (B, L, width).
    """

    def __init__(self, visual: CLIPVV, lengths: Sequence[int], image_token: str) -> None:
        super().__init__()
        self.vision_model = visual.vision_model  # registered, so the exporter finds its weights
        self.visual = visual
        self.lengths = list(lengths)
        self.image_token = image_token

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        paths = self.visual.tokens(pixel_values, self.lengths, self.image_token)
        return tuple(t for n in self.lengths for t in (paths[n].cls, *paths[n].stages))


class OnnxInt8Tower:
    """Runs CLIP-VV's tower (:meth:`CLIPVV.tokens`) on onnxruntime with int8 weights.

    One per loaded backbone (the backbone cache holds it), shared by every model and thread on it:
    onnxruntime sessions may be run by many threads at once, the sessions are an :class:`LRUCache`
    (each graph built or loaded once, however many threads ask), and the weights' digest is
    computed under a lock.

    Args:
        clip: the fp32 backbone whose vision tower is exported (it stays fp32 in torch).
        max_sessions: graphs held in memory at once (one per path lengths, image token and size).
        threads: onnxruntime's intra-op threads (None: torch's thread count, as the torch engines use).

    Raises:
        KAnoCLIPError: onnxruntime, onnx or onnxscript is not installed (one line naming the extra).
    """

    name = ENGINE

    def __init__(self, clip: CLIPModel, *, max_sessions: int = 2, threads: int | None = None) -> None:
        self._ort = require("onnxruntime")
        require("onnx")
        require("onnxscript")  # the exporter translates through it
        self.clip = clip
        self.threads = threads or torch.get_num_threads()
        self._sessions: LRUCache[str, Any] = LRUCache(max_sessions)
        self._digest_lock = threading.Lock()
        self._digest: tuple[tuple, str] | None = None  # (what the digest was taken of, the digest)

    # ------------------------------------------------------------------ what a graph depends on
    def weights_digest(self) -> str:
        """sha256 of the vision tower's weights, recomputed when a weight tensor is replaced or changed in place.

        Read on every call (the graph is looked up by it), so whether anything changed is judged from
        each tensor's storage and version counter, and the bytes are hashed only when it did.
        """
        vision = self.clip.vision_model
        stamp = tuple((t.data_ptr(), t._version, t.dtype, t.shape) for t in (*vision.parameters(), *vision.buffers()))
        with self._digest_lock:
            if self._digest is None or self._digest[0] != stamp:
                digest = hashlib.sha256()
                for name, t in sorted(vision.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
                self._digest = (stamp, digest.hexdigest())
            return self._digest[1]

    def settings(
        self, visual: CLIPVV, image_size: int, replaced: Sequence[int | None], image_token: str
    ) -> dict[str, Any]:
        """Everything one graph depends on (its file is named by their digest).

        Args:
            visual: the CLIP-VV view whose tower is exported.
            image_size: the input size S.
            replaced: the V-V path lengths (None: the config's).
            image_token: ``"original"`` or ``"vv"``.

        Returns:
            A JSON-friendly dict (also written beside the graph, for whoever looks at the cache).
        """
        return {
            "format": GRAPH_FORMAT,
            "weights_sha256": self.weights_digest(),
            "lengths": self._lengths(visual, replaced),
            "stage_layers": list(visual.stage_layers),
            "vv_enabled": visual.vv_enabled,
            "image_token": image_token,
            "position_interpolation": visual.position_interpolation,
            "image_size": int(image_size),
            "torch": torch.__version__,
            "onnxruntime": self._ort.__version__,
            "recipe": RECIPE,
        }

    @staticmethod
    def _lengths(visual: CLIPVV, replaced: Sequence[int | None]) -> list[int]:
        """The distinct V-V path lengths of ``replaced``, resolved and sorted."""
        return sorted({visual.depth - visual.first_layer(n) + 1 for n in replaced})

    # ------------------------------------------------------------------ running
    def tokens(
        self, visual: CLIPVV, pixel_values: torch.Tensor, replaced: Sequence[int | None], image_token: str
    ) -> dict[int | None, PathTokens]:
        """:meth:`CLIPVV.tokens` on onnxruntime (the graph built or loaded on first use).

        Args:
            visual: the CLIP-VV view (its settings pick the graph).
            pixel_values: (B, 3, S, S), normalised.
            replaced: the V-V path lengths wanted (None: the config's).
            image_token: ``"original"`` or ``"vv"``.

        Returns:
            ``{length: PathTokens}`` as :meth:`CLIPVV.tokens`, fp32 on the CPU.
        """
        size = int(pixel_values.shape[-1])
        session = self._session(visual, size, replaced, image_token)
        lengths = self._lengths(visual, replaced)
        outputs = session.run(None, {INPUT: pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()})
        per_path = 1 + len(visual.stage_layers)
        paths = {}
        for i, n in enumerate(lengths):
            cls, *stages = (torch.from_numpy(a) for a in outputs[i * per_path : (i + 1) * per_path])
            paths[n] = PathTokens(cls=cls, stages=stages)
        return {n: paths[visual.depth - visual.first_layer(n) + 1] for n in replaced}

    def prepare(self, visual: CLIPVV, image_size: int, replaced: Sequence[int | None], image_token: str) -> Path:
        """Build (or find on disk) and load the graph of these settings now, rather than on first use.

        Args:
            visual, image_size, replaced, image_token: as for :meth:`settings`.

        Returns:
            The graph's file.
        """
        self._session(visual, image_size, replaced, image_token)
        return self._path(self.settings(visual, image_size, replaced, image_token))

    def _path(self, settings: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        return graph_cache_dir() / f"{key}.onnx"

    def _session(self, visual: CLIPVV, image_size: int, replaced: Sequence[int | None], image_token: str) -> Any:
        settings = self.settings(visual, image_size, replaced, image_token)
        path = self._path(settings)

        def load() -> Any:
            for attempt in range(2):
                if not path.is_file():
                    self._build(visual, settings, path)
                try:
                    os.utime(path)  # most recently used: the last the folder's bound removes
                    graph = path.read_bytes()  # read whole: another process's bound may remove the file next
                    break
                except FileNotFoundError:  # removed meanwhile by another process's bound: build it again
                    if attempt:
                        raise
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            return self._ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])

        return self._sessions.get_or_compute(path.name, load)

    def _build(self, visual: CLIPVV, settings: dict[str, Any], path: Path) -> None:
        """Export the tower in fp32, quantise it, and move it into the cache folder (atomically)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        lengths, size = settings["lengths"], settings["image_size"]
        logger.warning(
            "int8 on onnxruntime: building the vision tower's int8 graph (input %d px, V-V paths %s); "
            "once per backbone and settings, kept in %s (for ViT-L this takes minutes)",
            size, lengths, path.parent,
        )  # fmt: skip
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        graph = _TokensGraph(visual, lengths, settings["image_token"]).eval()
        names = [f"{kind}_{n}" for n in lengths for kind in ("cls", *(f"stage{j}" for j in visual.stage_layers))]
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            int8 = Path(tmp) / path.name
            example = torch.randn(2, 3, size, size)
            with torch.inference_mode(False), torch.no_grad():
                export_graph(graph, (example,), fp32, [INPUT], names, {INPUT: {0: torch.export.Dim("batch")}})
            # onnxruntime's recommended pre-processing folds constants the exporter left, such as the
            # transposed weight an out_proj shares with its V-V path: quantised only once it is a constant
            folded = Path(tmp) / "folded.onnx"
            quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
            quantize_dynamic(
                folded, int8, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )  # fmt: skip
            path.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            os.replace(int8, path)  # whole or absent: another process may be reading the folder
        self._bound(path)
        logger.warning("int8 on onnxruntime: graph built in %.0f s: %s", time.perf_counter() - start, path)

    @staticmethod
    def _bound(kept: Path) -> None:
        """Remove the least recently used graphs beyond :func:`graphs_to_keep` (never ``kept``)."""

        def last_used(graph: Path) -> float:
            try:
                return graph.stat().st_mtime
            except FileNotFoundError:  # removed meanwhile by another process
                return 0.0

        graphs = sorted(kept.parent.glob("*.onnx"), key=last_used, reverse=True)
        for old in [p for p in graphs if p != kept][graphs_to_keep() - 1 :]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
