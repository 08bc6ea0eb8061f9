"""ONNX export for deployment: one graph per model and class list, run with onnxruntime.

:func:`export_onnx` writes ONE ONNX graph of a loaded :class:`~kanoclip.KAnoCLIP` and a JSON
sidecar beside it (``model.onnx`` -> ``model.onnx.json``, :func:`sidecar_path`):

* inputs: ``pixel_values`` ``(B, 3, S, S)`` float32, normalised with the backbone's mean and std,
  and ``class_index`` ``(B,)`` int64, each image's position in the sidecar's class list;
* outputs: ``anomaly_map`` ``(B, S, S)`` (eq. 10) and ``score`` ``(B,)`` (eq. 12, halved);
  the batch axis is dynamic.

What the paper computes from text is baked in: each listed class's [normal, abnormal] state text
features (the learned prompts in trained mode, the training-free ensemble with the knowledge
base's descriptions otherwise), as the service computes them for inference. The graph gathers
each image's row of every per-class table by ``class_index`` and hands the rows to
:meth:`KAnoCLIPModel.forward` as keyword arguments (:class:`ExportGraph`), so another per-class
tensor is one more entry of :func:`class_tables`, not a new graph. Normal references (the
detector's own, or ``references=``) are baked in too: every listed class's memory bank in one
table per stage whose rows are tagged with their class (:class:`ReferenceTables`), fused as the
service fuses them, with each class's calibrated threshold in the sidecar. Everything runs in fp32 (the export ignores a
reduced-precision backbone setting); G_σ's σ is the config's.

:class:`OnnxDetector` runs an export with onnxruntime and returns the same
:class:`~kanoclip.detection.Detection` as :meth:`KAnoCLIP.detect`, decoded, resized and
upsampled as the torch path does. onnxruntime and onnx are the optional extra
``pip install kanoclip[onnx]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kanoclip.detection import Detection, class_per_image, upsample_maps
from kanoclip.errors import CheckpointError, InputError, KAnoCLIPError, first_line
from kanoclip.images import ImageInput, describe, load_image, preprocess
from kanoclip.knowledge.classes import canonical_name, normalize

if TYPE_CHECKING:
    from kanoclip.detector import KAnoCLIP
    from kanoclip.modeling.model import KAnoCLIPModel
    from kanoclip.references import References, ReferenceSet

FORMAT = "kanoclip-onnx"
FORMAT_VERSION = 1
IMAGE_INPUT = "pixel_values"
CLASS_INPUT = "class_index"
OUTPUTS = ("anomaly_map", "score")
EXTRA = "pip install 'kanoclip[onnx]'"
HOW = "kanoclip.onnx.export_onnx or `kanoclip export`"  # how to make an export, for messages
# protobuf caps one file at 2 GiB: larger graphs keep their weights in ``<name>.onnx.data``
SINGLE_FILE_BYTES = 1_800_000_000


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of an export: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def require(module: str) -> Any:
    """Import onnx / onnxruntime, or one line naming the extra that provides them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KAnoCLIPError(f"ONNX support needs {module}, which is not installed; install it with {EXTRA}") from None


class ExportGraph(nn.Module):
    """The exported computation: normalised images and class indices in, maps and scores out.

    Args:
        model: the pure model (its mode decides the recipe, as in the service).
        tables: per-class tensors ``{forward argument: (K, ...)}``, row k for class k (baked in
            as buffers); each image's rows are passed to ``model(visual, **rows)``.
        references: the listed classes' normal references (:class:`ReferenceTables`), fused into
            their images' maps and scores as :meth:`KAnoCLIP.detect` does; None: none.
    """

    def __init__(
        self, model: KAnoCLIPModel, tables: Mapping[str, torch.Tensor], references: ReferenceTables | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.table_names = tuple(tables)
        for name, table in tables.items():
            self.register_buffer(name, table.detach().float().clone())
        self.references = references

    def forward(self, pixel_values: torch.Tensor, class_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.encode_image(pixel_values, precision="fp32")  # an export is fp32: no autocast traced
        rows = {name: getattr(self, name)[class_index] for name in self.table_names}
        out = self.model(visual, **rows)
        if self.references is None:
            return out.anomaly_map, out.score
        return self.references(self.model, visual, class_index, out.anomaly_map, out.score)


class ReferenceTables(nn.Module):
    """Every exported class's memory bank, one ``(K, N, C)`` table per stage read, padded to the largest.

    Each image gathers its own class's bank (row ``class_index``) and is matched against those rows
    only, the padding excluded (:func:`kanoclip.references.reference_maps` with per-image banks):
    its cost does not grow with the other classes' references. The images of a class without
    references keep the model's map and score. Stages the model does not read (weight 0) hold no table.
    """

    def __init__(self, sets: Sequence[ReferenceSet | None], weight: float, chunk: int, sigma: float) -> None:
        super().__init__()
        held = [r for r in sets if r is not None and r.count]
        self.read = [j for j, stage in enumerate(held[0].bank) if stage is not None]
        rows = max(r.bank[self.read[0]].shape[0] for r in held)  # type: ignore[union-attr]
        self.n_stages = len(held[0].bank)
        device = held[0].bank[self.read[0]].device  # every table sits beside the banks (a CUDA model's too)
        for j in self.read:
            width = held[0].bank[j].shape[1]  # type: ignore[union-attr]
            padded = [  # each class's rows, zero-padded to ``rows`` (masked by ``padding`` below)
                F.pad(r.bank[j].float(), (0, 0, 0, rows - r.bank[j].shape[0]))  # type: ignore[union-attr]
                if r is not None and r.count
                else torch.zeros(rows, width, device=device)
                for r in sets
            ]
            self.register_buffer(f"bank{j}", torch.stack(padded))  # (K, rows, C)
        counts = [r.bank[self.read[0]].shape[0] if r is not None and r.count else 0 for r in sets]  # type: ignore[union-attr]
        counted = torch.tensor(counts, device=device)
        self.register_buffer("padding", torch.arange(rows, device=device)[None, :] >= counted[:, None])  # (K, N)
        self.register_buffer("has_references", counted > 0)
        self.weight, self.chunk, self.sigma = weight, chunk, sigma

    def forward(
        self,
        model: KAnoCLIPModel,
        visual: Any,
        class_index: torch.Tensor,
        anomaly_map: torch.Tensor,
        score: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from kanoclip.references import fuse, reference_maps

        exclude = self.padding[class_index]  # (B, N): the padding of each image's own bank
        bank = [getattr(self, f"bank{j}")[class_index] if j in self.read else None for j in range(self.n_stages)]
        ref = reference_maps(
            visual.stages, bank, model.stage_weight_values(), visual.grid, model.image_size, self.sigma,
            chunk=self.chunk, exclude=exclude,
        )  # fmt: skip
        has = self.has_references[class_index]
        fused_map = torch.where(has[:, None, None], fuse(anomaly_map, ref, self.weight), anomaly_map)
        fused_score = torch.where(has, fuse(score, ref.flatten(1).amax(dim=1), self.weight), score)
        return fused_map, fused_score


def _exported_bytes(graph: ExportGraph) -> int:
    """The weights the graph holds: the vision tower and the learned parts (the text tower is left out)."""
    model = graph.model
    parts = [model.clip.vision_model, model.clip.visual_projection, model.bicmci, model.adapter]
    tensors = [t for part in parts for t in part.parameters()] + list(graph.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: dict[str, dict[int, Any]],
    *,
    opset: int | None = None,
    weight_bytes: int | None = None,
) -> Any:
    """``torch.onnx.export`` as kanoclip's graphs need it (the export here and the int8 engine's).

    The default (torch.export) exporter, non-strict, so CLIP-VV's forward hooks run as Python while
    the graph is recorded and what they capture is traced like any tensor. Weights go to
    ``<path>.data`` when they would pass protobuf's 2 GiB cap.

    Args:
        module: what to export, in eval mode.
        example: example inputs, positionally.
        path: the ``.onnx`` file to write.
        input_names, output_names: the graph's names for them.
        dynamic_shapes: per input name, its dynamic axes (``{0: torch.export.Dim("batch")}``).
        opset: the ONNX opset (None: the exporter's default).
        weight_bytes: the size of the weights the graph holds (None: the module's parameters and buffers).

    Returns:
        The exporter's ``ONNXProgram``.
    """
    if weight_bytes is None:
        weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    # onnxscript's optimiser logs a warning per attention block that it leaves a Split as it is
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        return torch.onnx.export(
            module, example, str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=weight_bytes > SINGLE_FILE_BYTES,
            verbose=False,
        )  # fmt: skip
    finally:
        folding_log.setLevel(level)


def class_tables(detector: KAnoCLIP, classes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The per-class tensors an export bakes in, keyed by :meth:`KAnoCLIPModel.forward`'s argument.

    Now only ``text``: each class's ``(2, C)`` [normal, abnormal] state features, the service's
    own (its per-class cache), stacked to ``(K, 2, C)``.
    """
    with torch.no_grad():
        return {"text": torch.stack([detector._class_text(name).state.float() for name in classes])}


def export_onnx(
    detector: KAnoCLIP,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    references: References | None = None,
) -> Path:
    """Write an ONNX graph of ``detector`` for ``classes`` and its JSON sidecar.

    Args:
        detector: a loaded model (either mode); it is exported in eval mode and fp32.
        classes: the classes to bake in (at least one); each goes through
            :meth:`KAnoCLIP.canonical_class`, duplicates after that are dropped.
        path: the ``.onnx`` file to write (its folder is created); the sidecar goes beside it.
        opset: the ONNX opset (None: the exporter's default).
        references: normal references to bake in (default the detector's own store): each listed
            class that has some gets its memory bank, and its calibrated threshold in the sidecar.

    Returns:
        The path of the graph.

    Raises:
        InputError: no classes, an empty class name, or an int8 model (its quantised layers do not
            export; load the model with ``precision="fp32"``).
    """
    if detector.precision == "int8":
        raise InputError(
            "an int8 model cannot be exported: an export is fp32; load the model with precision='fp32' to export it",
            argument="precision",
        )
    require("onnx")
    require("onnxscript")  # the exporter translates through it
    if isinstance(classes, str):
        classes = [classes]
    if not classes:
        raise InputError("classes is empty; name at least one class to export, e.g. classes=['bottle']")
    resolved = dict(detector.canonical_class(name) for name in classes)  # canonical -> known, in order
    names = list(resolved)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if detector.training:
        detector.eval()
    model = detector.model
    store = detector.reference_store if references is None else references
    # up to date for this model; the leave-one-out thresholds are computed in fp32 from the very bank
    # the graph holds, as the graph computes (the sidecar's thresholds)
    sets = [detector.references(name, store=store) for name in names]
    config = detector.config
    reference_tables = (
        ReferenceTables(sets, config.references.weight, config.references.chunk, config.scoring.sigma)
        if any(r is not None and r.count for r in sets)
        else None
    )
    graph = ExportGraph(model, class_tables(detector, names), reference_tables).eval()
    size = detector.image_size
    example = (
        torch.randn(2, 3, size, size, device=detector.device),
        torch.zeros(2, dtype=torch.int64, device=detector.device),
    )
    batch = torch.export.Dim("batch")
    program = export_graph(
        graph, example, path, [IMAGE_INPUT, CLASS_INPUT], list(OUTPUTS),
        {"pixel_values": {0: batch}, "class_index": {0: batch}}, opset=opset, weight_bytes=_exported_bytes(graph),
    )  # fmt: skip
    threshold = detector.config.scoring.threshold
    sidecar = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classes": names,
        "known_classes": [resolved[name] for name in names],
        "threshold": {
            name: r.threshold if r is not None and r.calibrated else threshold for name, r in zip(names, sets)
        },
        "references": {name: r.count if r is not None else 0 for name, r in zip(names, sets)},
        "calibration": {
            name: r.describe(threshold) if r is not None else "default (not calibrated)" for name, r in zip(names, sets)
        },
        "reference_precision": store.identity["precision"],  # the backbone's when the references were encoded
        "image_size": size,
        "image_mean": list(detector.image_mean),
        "image_std": list(detector.image_std),
        "mode": detector.mode,
        "backbone": detector.backbone_name,
        "checkpoint": detector.checkpoint_name,
        "sigma": detector.config.scoring.sigma,
        "opset": int(program.model.opset_imports[""]),
        "tables": {name: list(getattr(graph, name).shape) for name in graph.table_names},
        "inputs": [IMAGE_INPUT, CLASS_INPUT],
        "outputs": list(OUTPUTS),
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an export, checked to be a kanoclip export of a version this code reads.

    Raises:
        CheckpointError: the graph or its sidecar is missing, or the sidecar is not a kanoclip export's.
    """
    path = Path(path).expanduser()
    side = sidecar_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file; export one with {HOW}")
    if not side.is_file():
        raise CheckpointError(
            f"{path}: not a kanoclip export (its sidecar {side.name} is missing); export it with {HOW}"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{side}: not a kanoclip export sidecar ({exc}); export the model again with {HOW}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{side}: not a kanoclip export sidecar (no format {FORMAT!r}); export the model again with {HOW}"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{side}: export format version {meta.get('version')!r}, this kanoclip reads version {FORMAT_VERSION}; "
            "export the model again with this version"
        )
    return meta


class OnnxDetector:
    """An export of :func:`export_onnx` run with onnxruntime: images in, :class:`Detection` results out.

    Images are decoded, resized and normalised as :meth:`KAnoCLIP.detect` does, and each map is
    upsampled to its image's size the same way. The export holds no prompts' texts, so a result's
    ``guidance`` is empty, and only the final map is exported: ``normal_map``, ``abnormal_map``
    and ``stage_maps`` are not available. ``score``, ``threshold``, ``anomaly_map``,
    ``class_name``, ``known_class`` and ``mode`` are set.

    Args:
        path: the ``.onnx`` file (its sidecar ``<path>.json`` beside it).
        providers: onnxruntime execution providers (default: the CPU).
        session_options: ``onnxruntime.SessionOptions`` (threads, say; default: onnxruntime's).

    Raises:
        CheckpointError: ``path`` is not a kanoclip export (a missing or foreign sidecar, a file
            onnxruntime cannot load, a graph without the export's inputs).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, providers: Sequence[str] | None = None, session_options: Any = None
    ) -> None:
        ort = require("onnxruntime")
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self.path = Path(path).expanduser()
        self.meta = read_sidecar(self.path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile) as exc:
            raise CheckpointError(
                f"{self.path}: onnxruntime cannot load it as an ONNX graph ({first_line(exc)}); "
                f"export it again with {HOW}"
            ) from None
        names = [i.name for i in self.session.get_inputs()]
        if names != self.meta["inputs"] or [o.name for o in self.session.get_outputs()] != list(OUTPUTS):
            raise CheckpointError(
                f"{self.path}: its inputs {names} are not those of the sidecar's export; export it again with {HOW}"
            )
        self.classes: list[str] = list(self.meta["classes"])
        self.mode: str = self.meta["mode"]
        self.image_size = int(self.meta["image_size"])
        self._index = {normalize(name): i for i, name in enumerate(self.classes)}

    def class_index(self, class_name: str) -> int:
        """The position of ``class_name`` among the exported classes (case, ``_``, ``-`` and spaces ignored).

        Raises:
            InputError: the class was not exported.
        """
        if not isinstance(class_name, str) or not class_name.strip():
            raise InputError("class name is empty; type what the image shows, e.g. 'bottle'")
        index = self._index.get(normalize(class_name))
        if index is None:  # an alias the knowledge base's resolver accepts ("metal nut" -> metal_nut)
            index = self._index.get(normalize(canonical_name(class_name) or ""))
        if index is None:
            raise InputError(
                f"class {class_name!r} is not in this export; it holds {', '.join(self.classes)} "
                "(export again with the class added to run it)"
            )
        return index

    def detect(self, image: ImageInput, class_name: str, *, threshold: float | None = None) -> Detection:
        """Detect anomalies in one image of an exported class (see :meth:`detect_batch`)."""
        return self.detect_batch([image], [class_name], threshold=threshold)[0]

    def detect_batch(
        self, images: Sequence[ImageInput], class_names: Sequence[str] | str, *, threshold: float | None = None
    ) -> list[Detection]:
        """Detect anomalies in several images; ``class_names`` is one exported class or one per image.

        Args:
            images: paths, bytes, PIL images or arrays (:mod:`kanoclip.images`).
            class_names: one name for all, or one per image.
            threshold: the score at or above which an image is anomalous (None: each class's
                threshold from the sidecar).

        Returns:
            One :class:`Detection` per image, in order.
        """
        class_names = class_per_image(images, class_names)
        if not images:
            return []
        indices = [self.class_index(name) for name in class_names]
        pil_images = [load_image(image) for image in images]
        pixels = preprocess(
            pil_images, self.image_size, tuple(self.meta["image_mean"]), tuple(self.meta["image_std"])
        ).numpy()
        maps, scores = self.session.run(
            list(OUTPUTS), {IMAGE_INPUT: pixels, CLASS_INPUT: np.asarray(indices, dtype=np.int64)}
        )
        results = []
        for i, (pil, k) in enumerate(zip(pil_images, indices)):
            name = self.classes[k]
            results.append(
                Detection(
                    score=float(np.clip(scores[i], 0.0, 1.0)),
                    threshold=float(self.meta["threshold"][name] if threshold is None else threshold),
                    anomaly_map=upsample_maps(maps[i : i + 1], (pil.height, pil.width))[0],
                    class_name=name,
                    known_class=bool(self.meta["known_classes"][k]),
                    mode=self.mode,  # type: ignore[arg-type]
                    image=describe(images[i]),
                    reference_count=int(
                        self.meta["references"][name]
                    ),  # fused in the graph; its own map is not exported
                )
            )
        return results
