"""Fake CUDA on a CPU-only torch: tensors on a ``"cuda"`` device that hold no data.

:class:`torch._subclasses.fake_tensor.FakeTensorMode` creates tensors on a fake ``"cuda"``
device and raises ``FakeTensorDeviceMismatchError`` on any op that mixes devices, which is what
the tests need to find a tensor left on the CPU. A CPU-only build still refuses a few Python
entry points before they reach the fake mode (they ask for a CUDA device guard): ``Tensor.to``
towards CUDA and indexing a CUDA tensor. :func:`fake_cuda` routes those through the ATen ops
that do the same work, keeping devices (and autograd) as a GPU would; and since a fake tensor has
no values, reading one on the host (``float``, ``bool``, ``.item()``, ``.tolist()``, a sync on a
GPU) is recorded in :attr:`FakeCuda.syncs` and answered with a placeholder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.__bool__: True,
    torch.Tensor.__float__: 0.0,
    torch.Tensor.__int__: 0,
    torch.Tensor.__index__: 0,
    torch.Tensor.item: 0,
}


def _on_cuda(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


def _index(tensor: torch.Tensor, index: object) -> torch.Tensor:
    """``tensor[index]`` through ATen ops: ints, slices, None, Ellipsis and integer index tensors
    (several index tensors must be adjacent, as this project's code writes them)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
        raise NotImplementedError("boolean-mask indexing has a data-dependent shape: not available on fake CUDA")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at : at + 1] = [slice(None)] * (tensor.dim() - used)
    out, dim, advanced, first = tensor, 0, [], None
    for item in items:
        if item is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(item, int):
            out = out.select(dim, item)
        elif isinstance(item, slice):
            start, stop, step = item.start or 0, item.stop, item.step or 1
            out = torch.ops.aten.slice.Tensor(out, dim, start, stop, step)
            dim += 1
        else:  # an index tensor: a CUDA tensor takes CUDA or CPU indices, a CPU tensor CPU ones only
            if item.device.type == "cuda" and tensor.device.type != "cuda":
                raise RuntimeError(f"indices are on {item.device}, the indexed tensor on {tensor.device}")
            first = dim if first is None else first
            advanced.append(item.to(tensor.device) if item.device != tensor.device else item)
            dim += 1
    if advanced:
        out = torch.ops.aten.index.Tensor(out, [None] * first + advanced)
    return out


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # noqa: ANN001, ANN202
    """Scaled dot-product attention by its definition (the fused kernel's entry asks for a device guard)."""
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if is_causal:
        length = query.shape[-2], key.shape[-2]
        scores = scores.masked_fill(torch.ones(length, dtype=torch.bool, device=query.device).triu(1), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1) @ value


def _grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):  # noqa: A002, ANN001, ANN202
    """``F.grid_sample``'s output, by shape: (N, C) of ``input``, (H, W) of ``grid``, on their device.

    Its Python entry asks for a device guard and fake tensors run its decomposition, which indexes
    (another device guard); a fake tensor holds no values, so the shape and device are all there is.
    """
    if input.device != grid.device:
        raise RuntimeError(f"grid_sample: input on {input.device}, grid on {grid.device}")
    return input.new_empty(input.shape[0], input.shape[1], grid.shape[1], grid.shape[2])


class FakeCuda(TorchFunctionMode):
    """The Python entry points a CPU-only torch refuses for CUDA tensors, done with ATen ops."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []  # host reads of device values, by method name

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            source = args[0]
            if device is not None and device.type == "cuda":
                moved = (
                    source if source.device.type == "cuda" else torch.ops.aten._to_copy.default(source, device=device)
                )
                return (
                    moved
                    if dtype is None or dtype == moved.dtype
                    else torch.ops.aten._to_copy.default(moved, dtype=dtype)
                )
        elif func is torch.Tensor.cuda:
            return (
                args[0] if _on_cuda(args[0]) else torch.ops.aten._to_copy.default(args[0], device=torch.device("cuda"))
            )
        elif func is torch.Tensor.__getitem__ and _on_cuda(args[0]):
            return _index(args[0], args[1])
        elif func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and _on_cuda(args[1]):
            raise RuntimeError(f"indices are on {args[1].device}, the indexed tensor on {args[0].device}")
        elif func is torch.Tensor.new_tensor and _on_cuda(args[0]):
            return torch.tensor(args[1], dtype=kwargs.get("dtype", args[0].dtype), device=args[0].device)
        elif func is torch.nn.functional.grid_sample and _on_cuda(args[0]):
            return _grid_sample(*args, **kwargs)
        elif func is torch.Tensor.contiguous and _on_cuda(args[0]):
            return (
                args[0]
                if args[0].is_contiguous()
                else torch.ops.aten.clone.default(args[0], memory_format=torch.contiguous_format)
            )
        elif func is torch.nn.functional.scaled_dot_product_attention and _on_cuda(args[0]):
            return _attention(*args, **kwargs)
        elif func in _READS and _on_cuda(args[0]):
            self.syncs.append(func.__name__)
            return _READS[func]
        elif func is torch.Tensor.tolist and _on_cuda(args[0]):
            self.syncs.append("tolist")
            return torch.zeros(args[0].shape).tolist()
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[tuple[FakeTensorMode, FakeCuda]]:
    """Inside: ``torch.device("cuda")`` works; real tensors met by an op become fake CPU tensors.

    The device answers capability queries as a compute capability 9.0 GPU (an H100) would, so
    ``precision="auto"`` resolves there as on a real one (bf16).
    """
    with (
        FakeTensorMode(allow_non_fake_inputs=True) as mode,
        FakeCuda() as calls,
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield mode, calls


def to_fake_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every parameter and buffer replaced by a fake CUDA one (call inside :func:`fake_cuda`).

    ``Module.to`` cannot swap a real parameter for a fake one; tied parameters stay tied. The
    parameters do not require gradients: autograd's accumulation on a CUDA leaf needs the device
    guard a CPU-only torch lacks (it aborts the process), so fake CUDA runs forwards only.
    """
    moved: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    fake = torch.ops.aten._to_copy.default(tensor.detach(), device=torch.device("cuda"))
                    is_param = isinstance(tensor, torch.nn.Parameter)
                    moved[id(tensor)] = torch.nn.Parameter(fake, requires_grad=False) if is_param else fake
                table[name] = moved[id(tensor)]
    return module
