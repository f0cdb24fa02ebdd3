"""Multi-node training: two torchrun agents on this machine, joined by a c10d rendezvous, train as
one node does at the same global batch (gloo, fp32)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from pgolf.lab import launch

TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256", "train.val_batch_tokens=4096", "data.val_max_tokens=4096",
        "train.log_every=1", "train.iterations=10", "train.warmup_steps=0"]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_match_one_node(sp1024_data, tmp_path, monkeypatch):
    common = ["--preset", "cpu-smoke", "--data", str(sp1024_data), "--max-seconds", "0",
              *[a for s in TINY for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu"}
    one = subprocess.run([sys.executable, "-m", "pgolf.train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # The command a multi-node Slurm job runs on each node (pgolf.lab.launch builds it).
    for k, v in launch.multinode_env(2, f"localhost:{_free_port()}", "mn-test", tmp_path / "launches").items():
        monkeypatch.setenv(k, v)
    cmd = launch.torchrun_cmd([*common, "--out", str(tmp_path / "two")], nproc=1)
    assert cmd[3:11] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", os.environ["PGOLF_RDZV_ENDPOINT"],
                         "--rdzv-id", "mn-test"]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-2000:] for o in outs]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 10 and len(set(l1)) == 10  # ten real steps
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l2)) <= 1e-5
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    assert r2["world_size"] == 2 and r2["status"] == "finished"
    # the int8 artifact, scored on each node from rank 0's bytes (sent, not re-read from its disk)
    assert r2["model_bytes"] == r1["model_bytes"] and abs(r2["artifact_val_bpb"] / r1["artifact_val_bpb"] - 1) < 1e-5
    # exactly one agent's rank 0 printed the final JSON line
    finals = [o[0].strip().splitlines()[-1] for o in outs if o[0].strip()]
    assert len(finals) == 1 and json.loads(finals[0])["run_dir"] == str(tmp_path / "two")
