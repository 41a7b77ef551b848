"""Launching a worker script on two CPU processes with Composer's launcher, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

COMPOSER = Path(sys.executable).with_name('composer')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def composer_launch(
    worker: Path,
    *args: str,
    world: int = 2,
    env: Optional[dict[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: int = 500,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``composer -n WORLD WORKER ARGS`` with one thread per process; asserts success unless ``check=False``."""
    environment = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    cmd = [str(COMPOSER), '-n', str(world), '--master_port', str(free_port()), str(worker), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
