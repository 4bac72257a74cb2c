"""What the GPU suite's tests share: the device, the released shapes, the lengths, the dtypes and the tolerance slack.

`TNL_GPU_SUITE_DEVICE=cpu` (with TRITON_INTERPRET=1) is the dry run: the same test bodies on CPU, at tiny shapes,
to check the tests themselves where there is no GPU. Nothing here needs CUDA to import.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from transnormer_hf.configuration_transnormer import PRESETS

DEVICE = torch.device(os.environ.get("TNL_GPU_SUITE_DEVICE", "cuda"))
DRY = DEVICE.type == "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (heads, head dim) of the released sizes; a layer with LRPE has d_k = 2 d_v (cos and sin halves).
if DRY:
    HEADS = {name: (2, 16) for name in PRESETS}
else:
    HEADS = {name: (fields["num_attention_heads"], fields["attention_hidden_size"] // fields["num_attention_heads"])
             for name, fields in PRESETS.items()}
# The lengths: one token, a partial chunk, and 2K, 8K and 64K tokens (the last takes the segment split).
LENGTHS = (1, 63, 130, 200, 300) if DRY else (1, 63, 2048, 8192, 65536)
LONGEST = LENGTHS[-1]

# The kernels round P and the state to the input dtype for their tensor-core products (as fla does, see the
# docstring of kernels/triton_lightning_attn.py), while the torch twin keeps them in fp32 and rounds only its output.
# Each such rounding adds about one unit roundoff of relative error, so a kernel's error may be 2x the twin's plus
# one unit roundoff of its dtype: 2^-8 (bf16), 2^-11 (fp16). fp32 products are exact IEEE products (TF32 would be
# ~1e-3 off), so only the summation order differs from the twin's: 2^-20 (8 fp32 units).
SLACK = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def representable(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 with fp16-subnormal magnitudes set to 0: exact in fp32, bf16 and fp16 alike, so one
    float64 truth serves the three dtypes."""
    x = x.bfloat16().float()
    return torch.where(x.abs() < 2.0**-14, torch.zeros_like(x), x)


def kernel_group(kind: str, dtype: torch.dtype, variant: str) -> pytest.MarkDecorator:
    """The xdist group of the tests that compile one variant of the attention kernels: a head shape (an LRPE layer's
    or a plain one's), a dtype and `variant` (see `length_variant`). They run on one worker, so the variant compiles
    once, while other workers compile other variants (see tests/gpu/conftest.py)."""
    return pytest.mark.xdist_group(f"attention-{kind}-{dtype_name(dtype)}-{variant}")


def length_variant(length: int) -> str:
    """Which compiled kernels a fixed-length call of `length` tokens runs: Triton specializes an integer argument
    equal to 1 or divisible by 16 (here the length), and the longest length is split into segments."""
    if length == LONGEST:
        return "split"
    if length == 1:
        return "one-token"
    return "aligned" if length % 16 == 0 else "unaligned"


# GPU memory is shared by the suite's workers as a budget of 4 GiB units (file locks): each test holds as many as its
# `gpu_memory(gib)` mark says (its measured peak, rounded up; DEFAULT_GIB unmarked) and waits until they are free.
UNIT_GIB = 4
DEFAULT_GIB = 8
CONTEXT_GIB = 2  # what each worker's CUDA context, allocator and Triton hold outside the tests' own tensors


@functools.cache
def memory_budget_gib() -> float:
    """The GiB the workers' tests share: TNL_GPU_SUITE_MEMORY_GIB, else this GPU's memory less CONTEXT_GIB per worker
    (128 of an H200's 139.8 with 6 workers, 67 of an H100's 79.2), so the budget fits whichever GPU runs the suite."""
    if "TNL_GPU_SUITE_MEMORY_GIB" in os.environ:
        return float(os.environ["TNL_GPU_SUITE_MEMORY_GIB"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return torch.cuda.get_device_properties(DEVICE).total_memory / 2**30 - CONTEXT_GIB * workers


def gpu_memory(gib: float) -> pytest.MarkDecorator:
    """The GPU memory (GiB, at most) a test needs."""
    return pytest.mark.gpu_memory(gib)


@contextlib.contextmanager
def gpu_memory_share(gib: float):
    """Holds enough of the budget's units for `gib` GiB across the session's workers (waits until they are free)."""
    folder = Path(os.environ.get("TNL_GPU_SUITE_LOCKS") or tempfile.gettempdir())
    total = max(1, int(memory_budget_gib() // UNIT_GIB))
    wanted = min(total, max(1, math.ceil(gib / UNIT_GIB)))
    while True:
        held = []
        for unit in range(total):
            handle = open(folder / f"gpu-memory-{unit}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append(handle)
            if len(held) == wanted:
                break
        if len(held) == wanted:
            break
        for handle in held:  # all or none, so two waiting tests cannot each hold half of what the other needs
            handle.close()
        time.sleep(0.2)
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the memory back before another test may count on it
        for handle in held:
            handle.close()
