"""The runnable examples under examples/ run as the README shows them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gate_your_own_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "gate_your_own_model.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("trained: sparsity ") and "compact output (4, 50, 64)" in line
    for label in ("compaction", "attention", "ffn", "scatter"):
        assert f"{label} " in line  # the profile split the compact call by localgp's labels
    assert (tmp_path / "trace.json").stat().st_size > 0
