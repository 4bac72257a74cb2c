"""Run the GPU suite (`pytest -m gpu tests/gpu`) and save its output, with date, GPU, driver and versions, as a log.

The fixture checks this script used to run are tests/gpu/test_gpu_fixture.py now; the suite also covers the kernels
at the released shapes, the 1B-shaped model and `transnormer-hf train` (see the README's test section).

    python benchmarks/gpu_checks.py                      # -> benchmarks/results/gpu_suite_<gpu>.log, e.g. _h200
    python benchmarks/gpu_checks.py -- -k fixture        # extra arguments after -- go to pytest
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_log() -> Path:
    """benchmarks/results/gpu_suite_<model>.log, the model read from the GPU's name (NVIDIA H200 -> h200)."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name)
    return REPO / "benchmarks" / "results" / f"gpu_suite_{(match.group(1) if match else 'gpu').lower()}.log"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=None, help="where to write the output (default: see above)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    log = args.log or default_log()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-rA", "--durations=30",
               "-p", "no:cacheprovider", *args.pytest_args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write(f"$ {' '.join(['python', *command[1:]])}\n")
        # Unbuffered, so that a run stopped by a time limit still leaves every finished test's line in the log.
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            sys.stdout.write(line)
            out.write(line)
            out.flush()
    print(f"log written to {log}")
    return process.wait()


if __name__ == "__main__":
    sys.exit(main())
