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


def test_gpu_memory_budget_fits_the_gpu_that_runs_the_suite(monkeypatch):
    """Regression: the budget was the H200's fixed 128 GiB, so on an H100 (79.2 GiB) the workers' tests together
    asked for more memory than the card has and 131 of 180 ran out of it. It now follows the device and the workers."""
    import torch

    from tests.gpu import gpu_suite

    class H100:
        total_memory = 85_045_870_592  # 79.2 GiB, as torch reports an H100 80GB HBM3

    monkeypatch.delenv("TNL_GPU_SUITE_MEMORY_GIB", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "8")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    gpu_suite.memory_budget_gib.cache_clear()
    try:
        budget = gpu_suite.memory_budget_gib()
        assert budget + 8 * gpu_suite.CONTEXT_GIB <= H100.total_memory / 2**30, budget
        assert budget > 48, budget  # the largest test's share (test_gpu_model's 48 GiB) still fits
        monkeypatch.setenv("TNL_GPU_SUITE_MEMORY_GIB", "20")
        gpu_suite.memory_budget_gib.cache_clear()
        assert gpu_suite.memory_budget_gib() == 20
    finally:
        gpu_suite.memory_budget_gib.cache_clear()
