"""Every Triton launch runs on its tensors' GPU (kernels/triton_device.py), not on whichever device is current.

Triton launches on torch's current device: a model on cuda:1 (or spread over GPUs by device_map) would otherwise
launch from cuda:0 on cuda:1's memory. No CI machine has two GPUs, so this checks the guard's decision with a
stand-in tensor and that every launcher goes through it (the interpreter runs the launches).
"""

import contextlib

import pytest
import torch

from transnormer_hf.kernels import (
    gemv, lightning_attn, lightning_attn_step, lightning_attn_step_fused, linear_cross_entropy, srms_norm,
    triton_cross_entropy, triton_decode, triton_device, triton_gemv, triton_lightning_attn, triton_srms_norm,
)


class _OnDevice:
    """Stands in for a tensor: only `.device` is read."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)


def test_on_device_makes_the_tensors_gpu_current_only_when_it_is_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = triton_device.on_device(_OnDevice("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for same_or_none in ("cuda:0", "cpu"):
        assert isinstance(triton_device.on_device(_OnDevice(same_or_none)), contextlib.nullcontext)


@pytest.fixture
def guarded(monkeypatch):
    """The tensors each launcher asked `on_device` for, in order (the guard itself does nothing on CPU)."""
    seen = []

    def recorder(tensor):
        seen.append(tensor)
        return contextlib.nullcontext()

    for module in (triton_lightning_attn, triton_srms_norm, triton_decode, triton_gemv, triton_cross_entropy):
        monkeypatch.setattr(module, "on_device", recorder)
    return seen


def _launches(guarded, run) -> list[torch.Tensor]:
    """The tensors `run`'s launches asked the guard for (each must be a tensor whose device it can read)."""
    del guarded[:]
    run()
    assert all(isinstance(tensor, torch.Tensor) for tensor in guarded), guarded
    return list(guarded)


def test_every_launcher_launches_on_its_tensors_device(guarded):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 16, requires_grad=True) for _ in range(3))
    rates = torch.rand(2)
    attention = _launches(guarded, lambda: lightning_attn(q, k, v, rates, backend="triton")[0].sum().backward())
    assert len(attention) == 2  # the forward sweep, then the backward's one launch of its three sweeps
    x = torch.randn(3, 32, requires_grad=True)
    assert len(_launches(guarded, lambda: srms_norm(x, backend="triton").sum().backward())) == 2
    step_q, step_k, step_v = (torch.randn(2, 1, 2, 16) for _ in range(3))
    state = torch.zeros(2, 2, 16, 16)
    assert len(_launches(guarded, lambda: lightning_attn_step(step_q, step_k, step_v, rates, state,
                                                              backend="triton"))) == 1
    assert len(_launches(guarded, lambda: lightning_attn_step_fused(step_q, step_k, step_v, rates, state,
                                                                    activation="silu", backend="triton"))) == 1
    hidden, weight = torch.randn(6, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (6,))
    assert len(_launches(guarded, lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=4,
                                                               backend="triton"))) == 2  # two chunks
    rows = torch.randn(2, 16).bfloat16()
    assert len(_launches(guarded, lambda: gemv(rows, weight.bfloat16(), backend="triton"))) == 1
