"""The ``kanoclip`` command's error rendering: the library's messages, with the command's flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from kanoclip.cli import main

IMAGE = Path(__file__).resolve().parents[1] / "demo" / "examples" / "headct_004.png"


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--backbone", "./no-such-clip", "check the path given as --backbone"),
        ("--checkpoint", "./checkpoints/no-such-run", "check the path given as --checkpoint"),
    ],
)
def test_errors_name_the_commands_flags(flag, value, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["detect", str(IMAGE), "--class", "head", flag, value, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kanoclip detect: error:")
    assert expected in err[0] and "no such folder" in err[0] and value in err[0]
    assert "backbone=" not in err[0] and "checkpoint=" not in err[0]  # the API's spelling is not shown here
