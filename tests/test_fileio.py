"""Atomic writes: a failed or interrupted write leaves the old file whole and no temporary file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kanoclip.fileio import atomic_write_bytes, atomic_write_json


def test_write_then_replace(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2, "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "é": "ü"}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_rename_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_sigkill_during_a_large_write_never_leaves_a_partial_file(tmp_path):
    """Kill a process that keeps rewriting a file; the file is always one whole version."""
    path = tmp_path / "data.bin"
    script = textwrap.dedent(
        f"""
        import sys
        from kanoclip.fileio import atomic_write_bytes
        i = 0
        while True:
            i += 1
            atomic_write_bytes({str(path)!r}, bytes([i % 256]) * 8_000_000)
            if i == 1:
                print("first", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"first"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    data = path.read_bytes()
    assert len(data) == 8_000_000 and data == data[:1] * len(data)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_file_has_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "atomic.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as handle:  # what a normal open() gives, for comparison
            handle.write(b"x")
    finally:
        os.umask(old)
    mode = (tmp_path / "atomic.bin").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert mode == {0o022: 0o644, 0o077: 0o600, 0o002: 0o664}[umask]  # 0666 & ~umask, by hand
