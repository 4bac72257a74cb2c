"""The GPU suite: `pytest -m gpu tests/gpu` on one CUDA GPU. Every test here is marked `gpu` and skipped without CUDA.

tests/conftest.py sets TRITON_INTERPRET=0 (the kernels compile) when this folder is all a session collects, on a
machine with an NVIDIA driver; in any other session on a GPU these tests skip, since the kernels are interpreted. The header names the date, GPU, driver and versions, so a saved log says what it ran on.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from .gpu_suite import DEVICE, DRY

HERE = Path(__file__).resolve().parent


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
def _release_gpu_memory():
    """Returns cached GPU memory after each test, so that one test's tensors cannot make a later one run out. (Seeds:
    tests/conftest.py seeds every device before each test; the device is gpu_suite.DEVICE.)"""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's outcome, time and (on failure) traceback as soon as it ends: a run stopped by a time limit on a
    lent GPU keeps them (pytest prints its failure section only at the end)."""
    if report.when != "call" and not report.failed:
        return
    terminal = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if terminal is None:
        return
    terminal.write_line(f"\n{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s)")
    if report.failed:
        terminal.write_line(report.longreprtext[-4000:])


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
