"""The GPU suite: `pytest -m gpu tests/gpu` on one CUDA GPU. Every test here is marked `gpu` and skipped without CUDA.

tests/conftest.py sets TRITON_INTERPRET=0 (the kernels compile) when this folder is all a session collects, on a
machine with an NVIDIA driver; in any other session on a GPU these tests skip, since the kernels are interpreted. The
header names the date, GPU, driver and versions, so a saved log says what it ran on.

The suite's time goes to compiling kernels (fp32's IEEE products are unrolled into FMAs: about a minute per kernel
variant on the H200's host), not to the GPU, so on CUDA it runs in TNL_GPU_SUITE_WORKERS worker processes (6 unless
set; 0 or `-n 0` for one process). Tests that compile the same kernel variants share an `xdist_group`, so each
variant compiles on one worker while the others compile other ones; each test holds its share of a GPU memory budget
(gpu_suite.gpu_memory_share: its `gpu_memory(gib)` mark, from the peaks measured on the H200) across the workers, so
the GPU's memory is never oversubscribed. Each test's outcome line gives its peak GPU memory.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from .gpu_suite import DEFAULT_GIB, DEVICE, DRY, gpu_memory_share

HERE = Path(__file__).resolve().parent


WORKERS = int(os.environ.get("TNL_GPU_SUITE_WORKERS", "6"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads its options (called for initial conftests only)
def pytest_cmdline_main(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or DEVICE.type != "cuda" or not torch.cuda.is_available():
        return
    # The workers inherit the controller's environment: one folder of memory-budget locks per session.
    os.environ["TNL_GPU_SUITE_LOCKS"] = tempfile.mkdtemp(prefix="tnl-gpu-suite-")
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is None and not config.option.collectonly and WORKERS > 0:
        config.option.numprocesses = WORKERS
    if config.option.numprocesses and config.option.dist in ("no", "load"):
        config.option.dist = "loadgroup"
        # xdist's workers parse the command line (and PYTEST_ADDOPTS) again rather than receive the controller's
        # options; a worker that has not been told loadgroup leaves the xdist_group marks out of its test ids, and
        # the scheduler then spreads the tests of one kernel variant over the workers, each compiling it.
        os.environ["PYTEST_ADDOPTS"] = f"{os.environ.get('PYTEST_ADDOPTS', '')} --dist loadgroup".strip()


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a worker of a loadgroup run: a warning when xdist could not add the groups to the test ids."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    if any(item.get_closest_marker("xdist_group") and "@" not in item.nodeid for item in session.items):
        warnings.warn(pytest.PytestWarning(
            "the xdist_group marks were not applied (pytest-xdist 3.8 with pytest 9.2: pytest-dev/pytest-xdist#1386): "
            "the workers compile kernel variants more than once and the suite takes longer"))


def _in_suite(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().is_relative_to(HERE)


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="the GPU suite needs a CUDA device (TNL_GPU_SUITE_DEVICE=cpu: its dry run)")
    elif DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        skip = pytest.mark.skip(reason="the GPU suite runs the compiled kernels: run it on its own, "
                                       "`pytest -m gpu tests/gpu` (this session interprets them, TRITON_INTERPRET=1)")
    for item in items:
        if _in_suite(item):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"GPU suite: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, device {DEVICE}"
             + (" (dry run: tiny shapes)" if DRY else "")]
    if torch.cuda.is_available():
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
        lines.append(f"GPU: {torch.cuda.get_device_name()}, driver {driver}, CUDA {torch.version.cuda}")
    lines.append(f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
                 f"transformers {_version('transformers')}, accelerate {_version('accelerate')}, "
                 f"peft {_version('peft')}")
    return lines


@pytest.fixture(autouse=True)
def _gpu_memory(request: pytest.FixtureRequest):
    """The test's share of the GPU memory budget while it runs; leaving it returns the cached GPU memory, so that one
    test's tensors cannot make a later one run out. (Seeds: tests/conftest.py seeds every device before each test;
    the device is gpu_suite.DEVICE.)"""
    mark = request.node.get_closest_marker("gpu_memory")
    with gpu_memory_share(mark.args[0] if mark else DEFAULT_GIB) if not DRY else contextlib.nullcontext():
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    try:
        return (yield)
    finally:
        if torch.cuda.is_available():  # setup's and call's peak, read into this test's report
            item.user_properties.append(("peak_gpu_gib", torch.cuda.max_memory_reserved() / 2**30))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's outcome, time and (on failure) traceback as soon as it ends: a run stopped by a time limit on a
    lent GPU keeps them (pytest prints its failure section only at the end)."""
    if report.when != "call" and not report.failed:
        return
    terminal = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if terminal is None:
        return
    peak = dict(report.user_properties).get("peak_gpu_gib")
    memory = f", peak {peak:.1f} GiB" if peak is not None else ""
    terminal.write_line(f"\n{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s{memory})")
    if report.failed:
        terminal.write_line(report.longreprtext[-4000:])


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
