"""Running a test script as a normal user (uid 4242) when the tests run as root, so the user-namespace mode of
the sandbox is tested too: `setpriv` drops to the user inside a private mount namespace (`unshare`) where the
folders such a user could not enter on the way to the interpreter and the project are made traversable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox.isolation import python_paths

ROOT = Path(__file__).resolve().parents[1]
NORMAL_UID = 4242


def run_as_normal_user(script: str, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (Python source) as uid/gid 4242 with `stdin` and `args`; skips the test unless it runs as root
    with util-linux's setpriv and unshare."""
    if os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("needs root (to become a normal user with setpriv) and util-linux's unshare")
    workspace = tempfile.mkdtemp(prefix="normal-user-")
    os.chmod(workspace, 0o755)
    path = Path(workspace) / "normal_user.py"
    path.write_text(script)
    os.chmod(path, 0o644)
    expose = _expose_to_everyone([*python_paths(sys.executable), str(ROOT)], workspace)
    ids = f"--reuid={NORMAL_UID} --regid={NORMAL_UID} --clear-groups"
    run_as_user = " ".join([f"setpriv {ids} {sys.executable} {path}", *args])
    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT), "HOME": workspace}
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"{expose} && exec {run_as_user}"], input=stdin, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def _expose_to_everyone(paths: list[str], scratch: str) -> str:
    """Shell lines for a private mount namespace where folders a normal user cannot enter (such as /root, mode
    0700, which holds pyenv's interpreter) become a world-traversable tmpfs holding just the needed paths."""
    lines = []
    for blocker in sorted({a for p in paths for a in map(str, Path(p).parents) if os.stat(a).st_mode & 0o001 == 0}):
        stage = tempfile.mkdtemp(prefix="expose-", dir=scratch)
        lines.append(f"mount --bind {blocker} {stage} && mount -t tmpfs -o mode=755 tmpfs {blocker}")
        for top in sorted({Path(p).relative_to(blocker).parts[0] for p in paths if p.startswith(blocker + "/")}):
            lines.append(f"mkdir -p {blocker}/{top} && mount --bind {stage}/{top} {blocker}/{top}")
    return " && ".join(lines) or "true"
