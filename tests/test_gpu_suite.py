"""The GPU suite's own machinery, on CPU: started on a CUDA machine, `pytest -m gpu tests/gpu` runs in xdist workers
that apply the suite's kernel-variant groups. A stand-in plugin makes the controller (only) see a CUDA GPU; the
workers see none, so every test skips there, after collection, which is what is checked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAND_IN = '''
import os

import torch

if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller believes in a GPU; the workers see none and skip
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_name = lambda *args: "stand-in GPU"


def pytest_collection_finish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        ids = [item.nodeid for item in session.items]
        with open(os.path.join(os.environ["TNL_TEST_OUT"], worker), "w") as handle:
            handle.write(repr((session.config.getvalue("loadgroup"), ids)))
'''


def test_gpu_suite_workers_apply_the_kernel_variant_groups(tmp_path):
    """Regression: the workers parse the command line again, so the controller's switch to loadgroup never reached
    them, and the tests of one kernel variant were spread over the workers (each compiling it: the H200 run took
    570 s). Checked: each worker runs with loadgroup on (whether xdist can then add the group to the ids depends on
    the pytest version: pytest-dev/pytest-xdist#1386)."""
    (tmp_path / "stand_in_cuda.py").write_text(STAND_IN)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTEST_ADDOPTS", "TNL_GPU_SUITE_DEVICE", "PYTEST_XDIST_WORKER")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]), TNL_TEST_OUT=str(tmp_path),
               TNL_GPU_SUITE_WORKERS="2")
    command = [sys.executable, "-m", "pytest", "-p", "stand_in_cuda", "-p", "no:cacheprovider", "-m", "gpu", "-q",
               "tests/gpu/test_gpu_kernels.py", "-k", "test_attention_forward_backward_states and N1-"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = {path.name: ast.literal_eval(path.read_text()) for path in tmp_path.glob("gw*")}
    assert sorted(reports) == ["gw0", "gw1"], run.stdout[-3000:]
    for worker, (loadgroup, ids) in reports.items():
        assert loadgroup is True, f"{worker} collected with loadgroup={loadgroup!r}"
        assert any("N1-" in nodeid for nodeid in ids), ids
