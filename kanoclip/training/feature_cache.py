"""Cache of the frozen CLIP-VV features of the training images.

The backbone is frozen and no augmentation changes an image, so ``model.encode_image`` of
a training image is the same at every epoch: it is computed once, before the first epoch,
and reused. Features are stored in **float16** (the model works on float32 copies):

* in memory while the cache holds less than ``memory_limit`` bytes — default 4 GiB, set with
  ``$KANOCLIP_FEATURE_CACHE_GB`` (``0`` keeps everything on disk);
* beyond that, on disk under ``OUT/feature_cache/`` as one safetensors file per chunk of
  images, read back one row at a time (the operating system's page cache does the rest).

One image costs ``(n_stages * L + 1) * C * 2`` bytes: 3.5 MB for ViT-L/14@336px
(4 stages x 576 patches x 768), so 4 GiB holds about 1 200 images — most of MVTec-AD's 1 725
test images; the rest spill to disk. The disk files are deleted when training ends (and
rebuilt by a resumed run: a run that was killed leaves them behind, they are then discarded).

With several processes (DDP) each process encodes its share of the chunks and writes them
to disk, so that every process can read every image's features.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from kanoclip.errors import InputError
from kanoclip.fileio import atomic_write_bytes
from kanoclip.modeling.vv_attention import VisualFeatures

MEMORY_ENV = "KANOCLIP_FEATURE_CACHE_GB"
DEFAULT_MEMORY_GB = 4.0
CACHE_DIR = "feature_cache"


def memory_limit_from_env() -> int:
    """The in-memory budget in bytes: ``$KANOCLIP_FEATURE_CACHE_GB`` or 4 GiB."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return int(DEFAULT_MEMORY_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise InputError(f"{MEMORY_ENV}={text!r} is not a number of GiB >= 0; e.g. {MEMORY_ENV}=4")
    return int(value * 2**30)


class FeatureCache:
    """Frozen features by sample index, in memory (float16) up to a budget, then on disk."""

    def __init__(self, folder: str | os.PathLike[str], memory_limit: int | None = None) -> None:
        self.folder = Path(folder)
        self.memory_limit = memory_limit_from_env() if memory_limit is None else int(memory_limit)
        self.grid: tuple[int, int] | None = None
        self._memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index -> (global (C,), stages (n, L, C))
        self._disk: dict[int, tuple[Path, int]] = {}  # index -> (chunk file, row)
        self.memory_bytes = 0

    def __contains__(self, index: int) -> bool:
        return index in self._memory or index in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def on_disk(self) -> int:
        """How many images' features are on disk."""
        return len(self._disk)

    def clear(self, *, delete_files: bool = True) -> None:
        """Forget everything and (unless another process still reads them) delete the disk files."""
        self._memory.clear()
        self._disk.clear()
        self.memory_bytes = 0
        if delete_files:
            shutil.rmtree(self.folder, ignore_errors=True)

    def put(self, indices: list[int], visual: VisualFeatures, *, to_disk: bool = False) -> None:
        """Store one chunk's features (``indices[i]`` is row ``i`` of ``visual``)."""
        self.grid = tuple(visual.grid)  # type: ignore[assignment]
        global_half = visual.global_feature.detach().to("cpu", torch.float16)
        stages_half = torch.stack([s.detach().to("cpu", torch.float16) for s in visual.stages], dim=1)  # (B, n, L, C)
        size = global_half.nbytes + stages_half.nbytes
        if to_disk or self.memory_bytes + size > self.memory_limit:
            self._write_chunk(indices, global_half, stages_half)
            return
        for row, index in enumerate(indices):
            self._memory[index] = (global_half[row].clone(), stages_half[row].clone())
        self.memory_bytes += size

    def _write_chunk(self, indices: list[int], global_half: torch.Tensor, stages_half: torch.Tensor) -> None:
        path = self.folder / f"chunk-{indices[0]:08d}.safetensors"
        tensors = {
            "index": torch.tensor(indices, dtype=torch.int64),
            "global": global_half.contiguous(),
            "stages": stages_half.contiguous(),
            "grid": torch.tensor(self.grid, dtype=torch.int64),
        }
        atomic_write_bytes(path, save_safetensors(tensors))
        self._index_chunk(path, indices)

    def _index_chunk(self, path: Path, indices: list[int]) -> None:
        for row, index in enumerate(indices):
            self._disk[index] = (path, row)

    def scan_disk(self) -> None:
        """Index every chunk file in the folder (those written by other processes too)."""
        for path in sorted(self.folder.glob("chunk-*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                indices = handle.get_tensor("index").tolist()
                self.grid = tuple(handle.get_tensor("grid").tolist())  # type: ignore[assignment]
            self._index_chunk(path, indices)

    def get(self, indices: list[int], device: torch.device | str = "cpu") -> VisualFeatures:
        """The float32 features of ``indices``, in that order, as a batch on ``device``."""
        rows = [self._row(index) for index in indices]
        global_feature = torch.stack([g for g, _ in rows]).to(device=device, dtype=torch.float32)
        stages = torch.stack([s for _, s in rows]).to(device=device, dtype=torch.float32)  # (B, n, L, C)
        assert self.grid is not None
        return VisualFeatures(global_feature=global_feature, stages=list(stages.unbind(dim=1)), grid=self.grid)

    def _row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._memory.get(index)
        if found is not None:
            return found
        path, row = self._disk[index]
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_slice("global")[row], handle.get_slice("stages")[row]
