"""Stopping a command under test from outside, as torchrun, Slurm and launch.py do."""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def sigterm_when(proc: subprocess.Popen, ready: Callable[[], bool], wait_s: float = 120.0) -> tuple[str, str]:
    """Wait until `ready()` (or the process ends, or `wait_s` passes), send SIGTERM, and return the
    process's (stdout, stderr). A process still running after that is killed."""
    try:
        deadline = time.time() + wait_s
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
