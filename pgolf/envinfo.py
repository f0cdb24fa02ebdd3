"""Provenance of a run: library, CUDA and GPU versions, code version, data and tokenizer hashes."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

import pgolf
from pgolf.fileio import sha256_file

_PACKAGES = ("numpy", "sentencepiece", "zstandard", "brotli", "triton", "flash-attn", "flash_attn_3")


def git_commit() -> dict[str, Any]:
    root = Path(pgolf.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(data_dir: str | Path | None = None, tokenizer: str | Path | None = None,
                device: torch.device | None = None, attention_backend: str | None = None) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "pgolf": pgolf.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    env: dict[str, Any] = {"versions": versions, "host": socket.gethostname(), "platform": platform.platform(),
                           "git": git_commit(), "attention_backend": attention_backend}
    if device is not None and device.type == "cuda":
        env["cuda"] = {"version": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    else:
        env["cuda"] = None
    if data_dir is not None:
        manifest = Path(data_dir) / "manifest.json"
        env["data"] = {"path": str(data_dir),
                       "manifest_sha256": sha256_file(manifest) if manifest.exists() else None}
        if manifest.exists():
            m = json.loads(manifest.read_text())
            env["data"]["shards"] = m.get("shards") or m.get("files")
    if tokenizer is not None and Path(tokenizer).exists():
        env["tokenizer"] = {"path": str(tokenizer), "sha256": sha256_file(tokenizer)}
    return env
