"""Which s3proxy a run measures: a copy of its source taken once, and the commit it came from."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.options import REPO


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def snapshot_s3proxy(rev: str | None, dest: Path) -> dict[str, Any]:
    """Copy the s3proxy package to measure into ``dest`` and say which code it is.

    Every s3proxy cell imports it from there, so the whole run measures one version of the
    code even while someone edits the working tree.
    """
    dest.mkdir(parents=True, exist_ok=True)
    head = _git("rev-parse", "--short", "HEAD")
    if rev is not None:
        commit = _git("rev-parse", "--short", f"{rev}^{{commit}}")
        if not commit:
            raise SystemExit(f"--s3proxy-rev {rev}: not a git revision")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "s3proxy"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return {"rev": rev, "commit": commit, "uncommitted_changes": False}
    shutil.copytree(
        REPO / "s3proxy", dest / "s3proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    dirty = bool(_git("status", "--porcelain", "--", "s3proxy"))
    return {"rev": "worktree", "commit": head, "uncommitted_changes": dirty}
