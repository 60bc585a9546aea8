"""scripts/gpu_check.sh cannot rot: its CPU dry run runs here, and it imports nothing beyond the library."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"argparse", "math", "statistics", "sys", "tempfile", "time", "traceback", "dataclasses", "pathlib",
           "__future__", "torch", "pipelines"}


def test_gpu_check_imports_only_torch_and_the_library():
    """The library never imports sd_app or gradio (tests/test_layout.py); the script must not either."""
    tree = ast.parse((ROOT / "scripts" / "gpu_check.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= ALLOWED


def test_gpu_check_dry_run_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SECONDS": "900", "OMP_NUM_THREADS": "1"}
    args = ["--device", "cpu", "--tiny", "--steps", "2", "--size", "64", "--repeats", "1", "--no-compile"]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== -m gpu tests" in out and "== benchmark" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    table = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}
    assert set(table) == {"diffusers fp32", "diffusers fp16", "ours default (eager)"}
    for its, per_image, *_ in table.values():
        assert float(its) > 0 and float(per_image) > 0
    assert math.isinf(float(table["diffusers fp32"][4]))  # the reference against itself
    assert float(table["ours default (eager)"][4]) > 20  # the same picture in reduced precision
