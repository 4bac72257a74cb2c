"""What every Triton launcher needs to know about the GPU it launches on.

Triton launches on torch's current device and stream, which need not be the device of the tensors: a model moved
to cuda:1, or spread over GPUs by `device_map="auto"` (accelerate moves the inputs, not the current device). A
launch from cuda:0 on cuda:1's memory is an illegal address, or, with peer access, a slow remote read. So each
launcher runs inside `on_device(tensor)`; and launch configurations are sized from the device's shared memory.
"""

from __future__ import annotations

import contextlib
import functools

import torch

SHARED_MEMORY_OFF_CUDA = 232448  # an H100/H200's opt-in maximum per block: the interpreter and the sm_90 compile test


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (the opt-in maximum per block)."""
    if device.type != "cuda":
        return SHARED_MEMORY_OFF_CUDA
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which Triton launches on `tensor`'s GPU; nothing to do (and no cost) when it is already current
    or the tensor is not on CUDA (the interpreter)."""
    device = tensor.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
