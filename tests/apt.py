"""Debian packages the end-to-end tests need (Chromium, HAProxy, nginx), installed on demand.

Nothing is downloaded by a test tool of its own: the distribution's package, with apt-get,
when the machine lacks it. When it cannot be installed the test fails, it does not skip:
CI must prove what the package is there for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

APT_TIMEOUT = 600  # seconds for each of apt-get update and install, on a slow mirror


def ensure_package(binary: Path, package: str, *extra: str) -> Path:
    """``binary``, installing Debian's ``package`` with apt-get if it is missing."""
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None:
        pytest.fail(f"{binary} is missing and there is no apt-get to install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # wait for a parallel apt run, not fail
    for cmd in (
        ["apt-get", *lock, "update", "-qq"],
        ["apt-get", *lock, "install", "-y", "-qq", *extra, package],
    ):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"cannot install {package}: {' '.join(cmd)}: {exc}")
        if done.returncode != 0:
            pytest.fail(
                f"cannot install {package}: {' '.join(cmd)} exited {done.returncode}:\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )
    if not binary.exists():
        pytest.fail(f"apt-get installed {package} but {binary} is not there")
    return binary
