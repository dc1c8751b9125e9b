"""Multi-process data-parallel training: torchrun on CPU forms one gloo group of two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIT_ARGS = ["fit", "--data", "digits", "--backbone", "small_cnn", "--strategy", "finetune",
            "--epochs", "2", "--lr", "0.003", "--batch-size", "32", "--seed", "0",
            "--no-augment", "--early-stopping", "0"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TRANSFERKIT_CACHE": str(tmp_path / "cache"), "TRANSFERKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    return env


def _read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_processes_share_weights_and_split_data(tmp_path):
    env = _env(tmp_path)
    env["TRANSFERKIT_TRACE_DIR"] = str(tmp_path / "trace")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "transferkit", *FIT_ARGS, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rank0 = _read_trace(tmp_path / "trace" / "rank0.jsonl")
    rank1 = _read_trace(tmp_path / "trace" / "rank1.jsonl")
    assert len(rank0) == len(rank1) > 0
    for a, b in zip(rank0, rank1):
        assert a["step"] == b["step"]
        assert a["params"] == b["params"], f"weights differ between processes after step {a['step']}"
        assert not set(a["index"]) & set(b["index"]), "both processes saw the same examples in one step"
    seen_epoch0 = {i for row in rank0 + rank1 if row["epoch"] == 0 for i in row["index"]}
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(seen_epoch0) == metrics["dataset_sizes"]["train"]  # the shards together cover the data
    assert len(rank0) == -(-metrics["dataset_sizes"]["train"] // 64) * 2  # two epochs of half-size shards

    # the single-process run with the same settings evaluates alike
    single = subprocess.run([sys.executable, "-m", "transferkit", *FIT_ARGS, "--out", str(tmp_path / "single"),
                             "--batch-size", "64"], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8 and single_metrics["accuracy"] > 0.8
    assert abs(metrics["accuracy"] - single_metrics["accuracy"]) < 0.05
