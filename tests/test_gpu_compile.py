"""Every Triton kernel compiles for real NVIDIA GPUs (Hopper and Ampere), on this CPU-only machine.

The interpreter tests check what the kernels compute, but not that Triton's compiler accepts them: some code
runs in the interpreter and is rejected on CUDA (a non-constexpr global, for one, once reached the GPU that
way). Here a subprocess installs a fake driver that reports a GPU target and turns every launch into a
compile-only warm-up; the launchers then run on CPU tensors, so each kernel is compiled, down to a cubin
with the ptxas that ships with Triton, with exactly the arguments and constexprs the launchers pass: forward
and backward, d_k = d_v and d_k = 2 d_v, 16- and 32-bit inputs, varlen, states, the segment split, every
autotune config of the decode kernel, the norms and the cross-entropy rows.

For sm_90 it also reads what each compiled attention kernel needs: its shared memory must fit an H100/H200
(fp32 at TNL-1B's LRPE heads, d_k = 256, once needed 442368 bytes) for every head-size pair, dtype and mode
the launchers see, and its PTX must use TF32 tensor-core products exactly when torch's matmul precision
allows TF32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TARGETS = (90, 80)  # H100, A100
HOPPER_SHARED_MEMORY = 232448  # bytes a block may use on an H100/H200, also what the launchers assume off CUDA
# (d_k, d_v) pairs whose every launch config is compiled and measured: TNL's heads and LRPE's doubled keys
HEAD_DIMS = ((64, 64), (128, 128), (256, 128), (128, 64), (256, 256))


def _run_worker(capability: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, str(capability)], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, f"compiling for sm_{capability} failed:\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("capability", TARGETS)
def test_every_kernel_compiles_for_the_gpu(capability):
    report = _run_worker(capability)
    compiled = report["variants"]
    # kernel name -> distinct (constexprs, options) variants compiled to a cubin
    assert set(compiled) == {"_lightning_attn_sweep_kernel", "_lightning_attn_bwd_kernel",
                             "_lightning_attn_step_kernel", "_lightning_attn_step_fused_kernel",
                             "_srms_norm_fwd_kernel", "_srms_norm_bwd_kernel", "_cross_entropy_rows_kernel",
                             "_gemv_kernel"}, compiled
    assert compiled["_lightning_attn_step_kernel"] >= 4, "not every autotune config of the decode kernel compiled"
    # 4 autotune configs x (LRPE with d_k = 2 d_v and silu; d_k = d_v and sigmoid), bf16 and fp32 inputs
    assert compiled["_lightning_attn_step_fused_kernel"] >= 8, compiled
    assert compiled["_lightning_attn_sweep_kernel"] >= 10 and compiled["_lightning_attn_bwd_kernel"] >= 4, compiled
    # the GEMV's three tile shapes (2048-row, wide, gated), a K that its slices do not divide, and the residual
    assert compiled["_gemv_kernel"] >= 5, compiled
    if capability != 90:
        return
    launches = report["attention_launches"]
    # Every launch config picked for HEAD_DIMS x {fp32 (IEEE and TF32), bf16, fp16} x {forward, backward, split,
    # varlen} fits the H100/H200 and needs no more than the launcher's estimate (what it plans with elsewhere).
    too_big = [x for x in launches if x["shared"] > min(HOPPER_SHARED_MEMORY, x["estimate"])]
    assert not too_big, too_big
    modes = {(x["dtype"], x["precision"], x["mode"]) for x in launches}
    for dtype, precision in (("float32", "ieee"), ("float32", "tf32"), ("bfloat16", None), ("float16", "tf32x3")):
        for mode in ("fwd", "bwd", "split", "varlen"):
            assert (dtype, precision, mode) in modes, (dtype, precision, mode)
    assert {tuple(x["head_dims"]) for x in launches} >= set(HEAD_DIMS)
    # fp32 dots follow torch: TF32 tensor-core products (mma/wgmma ...tf32) only under "high"/"medium".
    # fp16 is computed in fp32 with three TF32 products per product (tf32x3: fp32's range and accuracy); bf16 keeps
    # bf16 dots.
    for launch in launches:
        if launch["dtype"] == "float32":
            assert launch["tf32_in_ptx"] == (launch["precision"] == "tf32"), launch
        else:
            assert launch["tf32_in_ptx"] == (launch["dtype"] == "float16"), launch


# ---- the worker: compile-only launches on CPU tensors -------------------------------------------------------------

_ATTENTION_KERNELS = ("_lightning_attn_sweep_kernel", "_lightning_attn_bwd_kernel")


def _install_compile_only_driver(capability: int) -> tuple[dict[str, set], list[dict], dict]:
    """A fake active driver reporting `sm_<capability>`; every kernel launch compiles (through ptxas) and returns.

    Returns (kernel name -> compiled variants, a record of every attention launch, the context the caller sets
    for the records: "mode", "head_dims"). Attention launches whose resources (tiles, warps, stages, dtype, dot
    precision, outputs) were already compiled take that compile's numbers instead of compiling again."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from transnormer_hf.kernels.triton_lightning_attn import _shared_memory_estimate, _tile_itemsize

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    driver.set_active(CompileOnlyDriver())
    variants: dict[str, set] = {}
    launches: list[dict] = []
    context: dict = {"mode": None, "head_dims": None, "compile_all": True}
    resources: dict[tuple, dict] = {}
    compile_kernel = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        resource = None
        if name in _ATTENTION_KERNELS:
            dtype = str(args[0].dtype).removeprefix("torch.")
            resource = (name, dtype, kwargs["INPUT_PRECISION"], kwargs["BLOCK_A"], kwargs["BLOCK_C"],
                        kwargs["num_warps"], kwargs["num_stages"], kwargs.get("STORE_OUT", True))
        if resource not in resources or context["compile_all"]:
            kernel = compile_kernel(self, *args, grid=grid, warmup=True, **kwargs)
            if not kernel.asm.get("cubin"):
                raise RuntimeError(f"{name}: no cubin")
            variants.setdefault(name, set()).add(repr(sorted(kwargs.items())))
            if resource is not None:
                resources[resource] = {"shared": kernel.metadata.shared, "tf32_in_ptx": ".tf32" in kernel.asm["ptx"]}
        if resource is not None and context["mode"] is not None:
            _, dtype, precision, block_a, block_c, num_warps, num_stages, store_out = resource
            launches.append({
                "kernel": name, "dtype": dtype, "precision": precision, "mode": context["mode"],
                "head_dims": context["head_dims"], "block_a": block_a, "block_c": block_c, "num_warps": num_warps,
                "num_stages": num_stages, "store_out": store_out, **resources[resource],
                "estimate": _shared_memory_estimate(block_a, block_c, num_stages,
                                                    _tile_itemsize(getattr(torch, dtype))),
            })

    def every_config(self, *args, **kwargs):  # autotuned kernels: compile each config instead of timing them
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = compile_only
    Autotuner.run = every_config
    return variants, launches, context


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
    precision = attention.fp32_dot_precision()
    out, _ = attention._lightning_attn_fwd(q, k, v, rates, 1.0, state(), states, cu_seqlens, dtype, precision)
    attention._lightning_attn_bwd(q, k, v, rates, 1.0, state(), cu_seqlens, torch.randn_like(out), state(), precision)


def _every_attention_launch_config(context: dict) -> None:
    """Forward and backward through the public Triton op (which reads torch's matmul precision) for every HEAD_DIMS
    pair, dtype and mode: fixed length, varlen with states, and long enough for the segment split."""
    from transnormer_hf.kernels import triton_lightning_attn as attention

    context["compile_all"] = False
    settings = [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"),
                (torch.float16, "highest")]
    modes = {"fwd": (200, False), "varlen": (200, True), "split": (40000, False)}
    for (dtype, matmul_precision), (key_dim, value_dim), (mode, (length, varlen)) in (
            (s, d, m) for s in settings for d in HEAD_DIMS for m in modes.items()):
        torch.set_float32_matmul_precision(matmul_precision)
        context["head_dims"] = [key_dim, value_dim]
        q, k = (torch.randn(1, length, 2, key_dim, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(1, length, 2, value_dim, dtype=dtype, requires_grad=True)
        cu_seqlens = torch.tensor([0, 70, length], dtype=torch.int32) if varlen else None
        state = torch.randn(2, 2, key_dim, value_dim, requires_grad=True) if varlen else None
        context["mode"] = mode
        out, _ = attention.lightning_attn(q, k, v, torch.rand(2), initial_state=state, cu_seqlens=cu_seqlens,
                                          output_final_state=varlen)
        context["mode"] = "bwd" if mode == "fwd" else mode
        out.backward(torch.randn_like(out))
    torch.set_float32_matmul_precision("highest")
    context["mode"] = None


def _compile_everything(capability: int) -> dict:
    variants, launches, context = _install_compile_only_driver(capability)
    from transnormer_hf.kernels import triton_cross_entropy, triton_decode, triton_gemv, triton_srms_norm

    shapes = [(torch.bfloat16, 2, 300, 4, 128, 128), (torch.bfloat16, 2, 300, 4, 256, 128),
              (torch.float16, 1, 200, 2, 64, 64), (torch.float32, 1, 200, 2, 128, 64)]
    for shape in shapes:
        for varlen_and_states in (False, True):  # the constexprs that change most code, at half the compile time
            _compile_attention(*shape, varlen=varlen_and_states, states=varlen_and_states)
    # Long enough for the segment split (pass 1 without outputs, pass 2 from carried states; off CUDA the
    # launchers plan for an H100's 264 programs).
    _compile_attention(torch.bfloat16, 1, 40000, 2, 128, 128, varlen=False, states=True)
    _compile_attention(torch.bfloat16, 1, 40000, 2, 256, 128, varlen=True, states=True)
    if capability == 90:
        _every_attention_launch_config(context)

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
    for dtype in (torch.bfloat16, torch.float16):  # TNL-1B's decode shapes: qkvu, out, SGLU gate; an uneven K
        for (n, k), gated in (((8192, 2048), False), ((2048, 2048), False), ((5632, 2048), True), ((300, 200), False)):
            weight = torch.randn(n, k, dtype=dtype)
            triton_gemv.gemv(torch.randn(3, k, dtype=dtype), weight, weight if gated else None)
        triton_gemv.gemv(torch.randn(3, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype),  # out_proj + skip
                         residual=torch.randn(3, 2048, dtype=dtype))
    return {"variants": {name: len(found) for name, found in variants.items()}, "attention_launches": launches}


if __name__ == "__main__":
    print(json.dumps(_compile_everything(int(sys.argv[1]))))
