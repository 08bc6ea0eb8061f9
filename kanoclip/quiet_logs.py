"""Drop two import-time warnings of torchao (the int8 precision's quantiser) meant for its authors.

transformers imports torchao whenever it is installed, so every command would print them:
torchao's CUDA-only kernel libraries (mxfp8, CUTLASS for sm90a) failing to load on a CPU-only
torch, where only its CPU kernels run anyway, and torch's pytree deprecation of the way torchao
registers its enums. :func:`install` runs when ``kanoclip`` is imported, before anything imports
torch; a logger's filters see only the records logged on that logger, so each one is named.
"""

from __future__ import annotations

import logging


def _torchao_cuda_library(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return message.startswith("Failed to load") and ("_C_mxfp8" in message or "_C_cutlass" in message)


def _torchao_enum_registration(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return str(record.msg).startswith("%s is an Enum subclass") and any(
        str(getattr(arg, "__module__", "")).startswith("torchao") for arg in args
    )


def install() -> None:
    """Add the two filters (once per process: ``kanoclip`` is imported once)."""
    logging.getLogger("torchao").addFilter(lambda record: not _torchao_cuda_library(record))
    logging.getLogger("torch.utils._pytree").addFilter(lambda record: not _torchao_enum_registration(record))
