"""Every Triton kernel compiles for real NVIDIA GPUs (Hopper and Ampere), on this CPU-only machine.

The interpreter tests check what the kernels compute, but not that Triton's compiler accepts them: some code
runs in the interpreter and is rejected on CUDA (a non-constexpr global, for one, once reached the GPU that
way). Here a subprocess installs a fake driver that reports a GPU target and turns every launch into a
compile-only warm-up; the launchers then run on CPU tensors, so each kernel is compiled, down to a cubin
with the ptxas that ships with Triton, with exactly the arguments and constexprs the launchers pass: forward
and backward, d_k = d_v and d_k = 2 d_v, 16- and 32-bit inputs, varlen, states, the segment split, every
autotune config of the decode kernel, the norms and the cross-entropy rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TARGETS = (90, 80)  # H100, A100


@pytest.mark.parametrize("capability", TARGETS)
def test_every_kernel_compiles_for_the_gpu(capability):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, str(capability)], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, f"compiling for sm_{capability} failed:\n{result.stderr[-6000:]}"
    compiled = json.loads(result.stdout.splitlines()[-1])
    # kernel name -> distinct (constexprs, options) variants compiled to a cubin
    assert set(compiled) == {"_lightning_attn_sweep_kernel", "_lightning_attn_bwd_kernel",
                             "_lightning_attn_step_kernel", "_lightning_attn_step_fused_kernel",
                             "_srms_norm_fwd_kernel", "_srms_norm_bwd_kernel", "_cross_entropy_rows_kernel"}, compiled
    assert compiled["_lightning_attn_step_kernel"] >= 4, "not every autotune config of the decode kernel compiled"
    # 4 autotune configs x (LRPE with d_k = 2 d_v and silu; d_k = d_v and sigmoid), bf16 and fp32 inputs
    assert compiled["_lightning_attn_step_fused_kernel"] >= 8, compiled
    assert compiled["_lightning_attn_sweep_kernel"] >= 10 and compiled["_lightning_attn_bwd_kernel"] >= 4, compiled


# ---- the worker: compile-only launches on CPU tensors -------------------------------------------------------------

def _install_compile_only_driver(capability: int) -> dict[str, set]:
    """A fake active driver reporting `sm_<capability>`; every kernel launch compiles (through ptxas) and returns."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    driver.set_active(CompileOnlyDriver())
    variants: dict[str, set] = {}
    compile_kernel = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = compile_kernel(self, *args, grid=grid, warmup=True, **kwargs)
        if not kernel.asm.get("cubin"):
            raise RuntimeError(f"{self.fn.__name__}: no cubin")
        variants.setdefault(self.fn.__name__, set()).add(repr(sorted(kwargs.items())))

    def every_config(self, *args, **kwargs):  # autotuned kernels: compile each config instead of timing them
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = compile_only
    Autotuner.run = every_config
    return variants


def _compile_attention(dtype, batch, length, heads, key_dim, value_dim, *, varlen, states):
    from transnormer_hf.kernels import triton_lightning_attn as attention

    q, k = (torch.randn(batch, length, heads, key_dim, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, dtype=dtype)
    rates = torch.rand(heads)
    cu_seqlens = None
    num_seqs = batch
    if varlen:
        q, k, v = (x[:1] for x in (q, k, v))
        cu_seqlens, num_seqs = torch.tensor([0, length // 3, length], dtype=torch.int32), 2
    state = (lambda: torch.randn(num_seqs, heads, key_dim, value_dim)) if states else (lambda: None)
    out, _ = attention._lightning_attn_fwd(q, k, v, rates, 1.0, state(), states, cu_seqlens)
    attention._lightning_attn_bwd(q, k, v, rates, 1.0, state(), cu_seqlens, torch.randn_like(out), state())


def _compile_everything(capability: int) -> dict[str, int]:
    variants = _install_compile_only_driver(capability)
    from transnormer_hf.kernels import triton_cross_entropy, triton_decode, triton_srms_norm

    shapes = [(torch.bfloat16, 2, 300, 4, 128, 128), (torch.bfloat16, 2, 300, 4, 256, 128),
              (torch.float16, 1, 200, 2, 64, 64), (torch.float32, 1, 200, 2, 128, 64)]
    for shape in shapes:
        for varlen_and_states in (False, True):  # the constexprs that change most code, at half the compile time
            _compile_attention(*shape, varlen=varlen_and_states, states=varlen_and_states)
    # Long enough for the segment split (pass 1 without outputs, pass 2 from carried states; off CUDA the
    # launchers plan for an H100's 264 programs).
    _compile_attention(torch.bfloat16, 1, 40000, 2, 128, 128, varlen=False, states=True)
    _compile_attention(torch.bfloat16, 1, 40000, 2, 256, 128, varlen=True, states=True)

    for dtype in (torch.bfloat16, torch.float32):
        q, k = torch.randn(2, 1, 4, 128, dtype=dtype), torch.randn(2, 1, 4, 128, dtype=dtype)
        triton_decode._lightning_attn_step(q, k, torch.randn(2, 1, 4, 64, dtype=dtype), torch.rand(4),
                                           torch.randn(2, 4, 128, 64), 1.0)
        for lrpe, activation in ((True, "silu"), (False, "sigmoid")):  # H = 3, d_k = 2 d_v with LRPE; d_k = d_v
            q, k, v = (torch.randn(2, 1, 3, 64, dtype=dtype) for _ in range(3))
            theta, position = (torch.rand(3, 1, 64), torch.tensor([5])) if lrpe else (None, None)
            triton_decode._lightning_attn_step_fused(q, k, v, torch.rand(3), torch.randn(2, 3, 128 if lrpe else 64, 64),
                                                     theta, position, activation, 1.0)
        x, gate = torch.randn(6, 2048, dtype=dtype), torch.randn(6, 2048, dtype=dtype)
        for with_gate in (None, gate):
            y, rstd = triton_srms_norm._srms_norm_fwd(x, with_gate, 1e-6)
            triton_srms_norm._srms_norm_bwd(torch.randn_like(y), x, with_gate, rstd)
        for want_grad in (False, True):
            triton_cross_entropy._cross_entropy_rows_(torch.randn(5, 1000, dtype=dtype), torch.tensor([1, 2, -100, 4, 5]),
                                                      -100, want_grad)
    return {name: len(found) for name, found in variants.items()}


if __name__ == "__main__":
    print(json.dumps(_compile_everything(int(sys.argv[1]))))
