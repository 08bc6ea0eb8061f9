"""The filters that keep torchao's import-time warnings for its authors out of every command's output."""

from __future__ import annotations

import enum
import logging
import subprocess
import sys

import pytest

import kanoclip  # noqa: F401  (installs the filters)


def passes(logger: str, msg: str, *args: object) -> bool:
    record = logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, args, None)
    return logging.getLogger(logger).filter(record)


def test_only_torchaos_cuda_library_and_enum_warnings_are_dropped():
    class TorchaoEnum(enum.Enum):
        A = 1

    TorchaoEnum.__module__ = "torchao.quantization.kernel_preference"

    class OtherEnum(enum.Enum):
        A = 1

    enum_msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    assert not passes("torchao", "Failed to load /site/torchao/_C_mxfp8.cpython-310.so: Could not load this library")
    assert not passes("torchao", "Failed to load /site/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
    assert passes("torchao", "Failed to load /site/torchao/_C.abi3.so: undefined symbol")  # a CPU kernel library
    assert passes("torchao", "Skipping import of cpp extensions due to incompatible torch version.")
    assert not passes("torch.utils._pytree", enum_msg, TorchaoEnum)
    assert passes("torch.utils._pytree", enum_msg, OtherEnum)


def test_importing_the_detector_prints_nothing():
    pytest.importorskip("torchao")  # the warnings come from torchao's import, which transformers does
    result = subprocess.run(
        [sys.executable, "-c", "import kanoclip.detector"], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr == "" and result.stdout == ""
