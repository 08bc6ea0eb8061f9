"""Training with 2 processes (torchrun, DDP through Accelerate, gloo on CPU) writes the usual checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from kanoclip import KAnoCLIP
from kanoclip.checkpoint import CONFIG_NAME, KB_NAME, WEIGHTS_NAME, read_checkpoint
from kanoclip.training import train
from kanoclip.training.state import STATE_DIR, STATE_JSON

from test_training import REPO, SIZE, cli_env, make_small_mvtec, quick_config


def test_two_processes_write_the_single_process_checkpoint_format(tiny_backbone, bottle_dir, tmp_path):
    data = make_small_mvtec(tmp_path / "data", bottle_dir, n_good=4, n_bad=4)
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "kanoclip", "train", "--data", f"mvtec={data}", "--out", str(out), "--epochs", "2",
        "--batch-size", "2", "--image-size", str(SIZE), "--backbone", str(tiny_backbone), "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(command, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint: ") == 1  # only the main process reports

    single = tmp_path / "single"
    train(quick_config(data, single, tiny_backbone, epochs=2, batch_size=2))
    for name in (CONFIG_NAME, WEIGHTS_NAME, KB_NAME, "history.json", "loss_curve.png", f"{STATE_DIR}/{STATE_JSON}"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    ddp_weights, single_weights = load_file(out / WEIGHTS_NAME), load_file(single / WEIGHTS_NAME)
    assert {k: (v.shape, v.dtype) for k, v in ddp_weights.items()} == {
        k: (v.shape, v.dtype) for k, v in single_weights.items()
    }
    ddp_config, single_config = (json.loads((f / CONFIG_NAME).read_text()) for f in (out, single))
    assert ddp_config["model"] == single_config["model"]
    assert set(ddp_config["metadata"]) == set(single_config["metadata"])
    assert ddp_config["metadata"]["processes"] == 2 and single_config["metadata"]["processes"] == 1
    assert read_checkpoint(out).metadata["epochs"] == 2
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert KAnoCLIP.from_pretrained(out, device="cpu").trained
