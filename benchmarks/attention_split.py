"""The segment split of the Lightning Attention kernel against the same kernel unsplit, on one GPU in one run.

For each case: forward and forward+backward milliseconds (bf16, mean of 20 calls after one warm-up) with the
split forbidden and with the default policy, and the largest relative difference between the two runs over o,
the final state, dq, dk, dv and the initial state's gradient (initial and final states on).
Cases: TNL-1B attention at 32K (B=1, H=16) and B=2 at 16K, grid A's B=4 H=32 32K (its grid is full: no split),
and two varlen batches like kernel_anchors.md's skewed10 and random25.

    python benchmarks/attention_split.py
"""

from __future__ import annotations

import time

import torch

import transnormer_hf.kernels.triton_lightning_attn as kernel
from transnormer_hf.kernels import lightning_attn

CASES = {  # name: (batch, heads, sequence length or varlen lengths, head dim)
    "tnl1b_32k": (1, 16, 32768, 128),
    "tnl1b_16k_B2": (2, 16, 16384, 128),
    "A_B4_32k": (4, 32, 32768, 128),
    "skewed10": (1, 32, [16384] + [1820] * 9, 128),
    "random25_like": (1, 32, [5864, 3817, 3752] + [900] * 21, 128),
}
NEVER = 1 << 40  # a minimum segment length no sequence reaches: the split is never taken


def mean_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("attention_split.py times the Triton kernel and needs a CUDA device")
    for name, (batch, heads, lengths, dim) in CASES.items():
        cu_seqlens = None
        if isinstance(lengths, list):
            cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
            tokens, sequences = sum(lengths), len(lengths)
        else:
            tokens, sequences = lengths, batch
        generator = torch.Generator(device="cuda").manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, device="cuda", generator=generator)

        q, k = (torch.nn.functional.silu(randn(batch, tokens, heads, dim)).bfloat16().requires_grad_() for _ in range(2))
        v = randn(batch, tokens, heads, dim).bfloat16().requires_grad_()
        initial_state = randn(sequences, heads, dim, dim).requires_grad_()
        rates = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], device="cuda")
        do, d_final = randn(batch, tokens, heads, dim).bfloat16(), randn(sequences, heads, dim, dim)
        results, timings = {}, {}
        for mode, min_segment in (("unsplit", NEVER), ("split", kernel._MIN_SEGMENT)):
            saved, kernel._MIN_SEGMENT = kernel._MIN_SEGMENT, min_segment
            o, final = lightning_attn(q, k, v, rates, initial_state=initial_state, output_final_state=True,
                                      cu_seqlens=cu_seqlens, backend="triton")
            grads = torch.autograd.grad([o, final], [q, k, v, initial_state], [do, d_final])
            results[mode] = (o, final, *grads)

            def forward():
                return lightning_attn(q, k, v, rates, cu_seqlens=cu_seqlens, backend="triton")[0]

            timings[mode] = (mean_ms(forward), mean_ms(lambda: forward().backward(do)))
            kernel._MIN_SEGMENT = saved
        difference = max(((split.float() - unsplit.float()).norm() / unsplit.float().norm()).item()
                         for split, unsplit in zip(results["split"], results["unsplit"]))
        print(f"{name} max rel split-vs-unsplit {difference:.2e} | unsplit fwd {timings['unsplit'][0]:.3f} "
              f"f+b {timings['unsplit'][1]:.3f} ms | split fwd {timings['split'][0]:.3f} f+b {timings['split'][1]:.3f} ms",
              flush=True)


if __name__ == "__main__":
    main()
