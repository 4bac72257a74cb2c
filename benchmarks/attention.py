"""Lightning Attention on one GPU: this project's Triton kernel against the open anchors, in one run.

Times forward and forward+backward (median of `triton.testing.do_bench`) and measures the peak extra
memory of forward+backward for: ours (`transnormer_hf.kernels.lightning_attn`, backend "triton"),
fla `chunk_simple_gla` and `fused_chunk_simple_gla` (g_gamma=-rate, scale=1.0), the official
`lightning_attn_func` (lightning-attn 0.0.5) and torch SDPA causal softmax (backend stated), each in
its native layout, bf16, on the grids of shared/docs/kernel_anchors.md section 7, with HBM floors from this
GPU's measured device-to-device copy bandwidth (in the JSON). Also checks the
kernel (fp32 and bf16, states, varlen) and every anchor's accuracy against a float64 reference.

    python benchmarks/attention.py --grids A F --out benchmarks/results/attention_h100.json
    python benchmarks/attention.py --plot benchmarks/results/attention_h100.json   # CPU: writes the PNG
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import subprocess
import sys
import time

import torch

GRIDS = {
    "A": [(4, 32, n, 128, 128) for n in (512, 1024, 2048, 4096, 8192, 16384, 32768)],
    "B": [(b, h, n, dk, 128) for h in (8, 16, 32) for (b, n) in ((8, 2048), (2, 8192), (1, 32768)) for dk in (128, 256)],
    "C": [(1, h, n, 128, 128) for h in (8, 32) for n in (65536, 131072)],
}
# Grid F: about 32K packed tokens, H=32, D=128, in 8-25 sequences.
VARLEN = {
    "uniform8": [4096] * 8,
    "skewed10": [16384] + [1820] * 9,
    "random25": None,  # drawn below with a fixed seed
}


def tnl_decay_rates(heads: int, layer: int = 0, num_layers: int = 24) -> torch.Tensor:
    """TNL's rates slope_h * (1 - l/(L-1) + 1e-5), slope_h = 2^(-8(h+1)/H) (H a power of two here)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    return (slopes * (1 - layer / (num_layers - 1) + 1e-5)).float()


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "fla-core", "lightning-attn", "transnormer-hf"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- the implementations, each in its native layout ----

def _ours(q, k, v, rates, cu_seqlens=None):
    from transnormer_hf.kernels import lightning_attn
    return lightning_attn(q, k, v, rates, cu_seqlens=cu_seqlens, backend="triton")[0]


def _fla(name):
    def run(q, k, v, rates, cu_seqlens=None):
        import fla.ops.simple_gla as simple_gla
        return getattr(simple_gla, name)(q, k, v, g_gamma=-rates, scale=1.0, cu_seqlens=cu_seqlens)[0]
    return run


def _la2(q, k, v, rates, cu_seqlens=None):
    from lightning_attn.ops import lightning_attn_func
    return lightning_attn_func(q, k, v, rates.view(-1, 1, 1))


def _sdpa(q, k, v, rates, cu_seqlens=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {  # name -> (function, heads-first layout, varlen support)
    "ours": (_ours, False, True),
    "fla_chunk": (_fla("chunk_simple_gla"), False, True),
    "fla_fused_chunk": (_fla("fused_chunk_simple_gla"), False, True),
    "lightning_attn2": (_la2, True, False),
    "sdpa_causal": (_sdpa, True, False),
}


def _make(batch, heads, length, key_dim, value_dim, heads_first, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, length) if heads_first else (batch, length, heads)
    q = torch.nn.functional.silu(torch.randn(*shape, key_dim, device="cuda", generator=gen)).to(dtype)
    k = torch.nn.functional.silu(torch.randn(*shape, key_dim, device="cuda", generator=gen)).to(dtype)
    v = torch.randn(*shape, value_dim, device="cuda", generator=gen).to(dtype)
    return q, k, v


def time_impl(name, batch, heads, length, key_dim, value_dim, cu_seqlens=None, rep=60):
    from triton.testing import do_bench

    fn, heads_first, _ = IMPLS[name]
    if name == "sdpa_causal" and key_dim != value_dim:
        return None
    rates = tnl_decay_rates(heads).cuda()
    q, k, v = _make(batch, heads, length, key_dim, value_dim, heads_first)
    for x in (q, k, v):
        x.requires_grad_()
    do = torch.randn_like(v)
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v, rates, cu_seqlens), warmup=10, rep=rep, return_mode="median")

    def fwd_bwd():
        fn(q, k, v, rates, cu_seqlens).backward(do)

    fwd_bwd()  # warm up compile/autotune before the memory reading
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    both = do_bench(fwd_bwd, warmup=10, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "extra_peak_MiB": extra}


def copy_bandwidth(gib: float = 1.0) -> float:
    """This GPU's device-to-device copy bandwidth in bytes/s (bytes read + written), median of do_bench."""
    from triton.testing import do_bench

    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * source.numel() / (ms * 1e-3)


def floors(batch, heads, length, key_dim, value_dim, bandwidth):
    """HBM-traffic floors (ms) at `bandwidth` bytes/s: forward reads q, k, v and writes o; backward adds do in,
    dq, dk, dv out."""
    tokens = batch * heads * length
    fwd_bytes = 2 * tokens * (2 * key_dim + 2 * value_dim)
    bwd_bytes = 2 * tokens * (4 * key_dim + 3 * value_dim)
    return {"fwd_floor_ms": fwd_bytes / bandwidth * 1e3, "fwd_bwd_floor_ms": (fwd_bytes + bwd_bytes) / bandwidth * 1e3}


# ---- accuracy against float64 ----

def _grads(fn, q, k, v, rates, do, heads_first, **kwargs):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, rates, **kwargs)
    o.backward(do)
    return [x.detach() for x in (o, q.grad, k.grad, v.grad)]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def accuracy_cases(impls):
    """Section 4 of kernel_anchors.md: bf16 kernels vs the float64 quadratic reference."""
    from transnormer_hf.kernels import lightning_attn_parallel_ref

    cases = [
        ("layer0_D128_N1000", 1000, 128, 128, tnl_decay_rates(32)[:8]),
        ("layer0_D64_N1000", 1000, 64, 64, tnl_decay_rates(32)[:8]),
        ("dk256_dv128_N512", 512, 256, 128, tnl_decay_rates(32)[:8]),
        ("last_layer_N4096", 4096, 128, 128, tnl_decay_rates(32, layer=23)[:8]),
        ("rate4_N512", 512, 128, 128, torch.full((8,), 4.0)),
    ]
    rows = []
    for tag, length, key_dim, value_dim, rates in cases:
        rates = rates.cuda()
        q, k, v = _make(2, 8, length, key_dim, value_dim, heads_first=False, dtype=torch.float64, seed=1)
        do = torch.randn_like(v)
        truth = _grads(lambda q, k, v, r: lightning_attn_parallel_ref(q, k, v, r)[0], q, k, v, rates, do, False)
        for name in impls:
            fn, heads_first, _ = IMPLS[name]
            to = (lambda x: x.transpose(1, 2).contiguous()) if heads_first else (lambda x: x.contiguous())
            back = (lambda x: x.transpose(1, 2)) if heads_first else (lambda x: x)
            try:
                got = _grads(fn, *(to(x.bfloat16()) for x in (q, k, v)), rates, to(do.bfloat16()), heads_first)
                errs = [rel_err(back(g), t) for g, t in zip(got, truth)]
                rows.append({"case": tag, "impl": name, **dict(zip(("o", "dq", "dk", "dv"), errs))})
            except Exception as error:  # an anchor that cannot run a case is recorded, not fatal
                rows.append({"case": tag, "impl": name, "error": repr(error)[:200]})
            print(rows[-1], flush=True)
    return rows


def kernel_checks():
    """Ours on the GPU in fp32/bf16 with initial/final states and their gradients, and varlen, vs float64."""
    from transnormer_hf.kernels import lightning_attn, lightning_attn_parallel_ref

    rows = []
    specs = [  # (tag, dtype, N, d_k, d_v, cu_seqlens)
        ("fp32_states_N1000_dk128", torch.float32, 1000, 128, 128, None),
        ("bf16_states_N1000_dk128", torch.bfloat16, 1000, 128, 128, None),
        ("bf16_states_N777_dk256_dv128", torch.bfloat16, 777, 256, 128, None),
        ("bf16_states_N300_dk64_dv64", torch.bfloat16, 300, 64, 64, None),
        ("fp16_states_N500_dk128", torch.float16, 500, 128, 128, None),
        ("bf16_varlen", torch.bfloat16, 1500, 128, 128, [0, 100, 100, 1163, 1500]),
        ("fp32_varlen", torch.float32, 1500, 128, 64, [0, 1, 700, 1500]),
    ]
    for tag, dtype, length, key_dim, value_dim, bounds in specs:
        heads = 4
        batch = 1 if bounds else 2
        num_states = len(bounds) - 1 if bounds else batch
        cu_seqlens = torch.tensor(bounds, device="cuda") if bounds else None
        rates = torch.tensor([0.84, 0.1, 1e-5, 4.0], device="cuda")
        q, k, v = _make(batch, heads, length, key_dim, value_dim, heads_first=False, dtype=torch.float64, seed=2)
        h0 = torch.randn(num_states, heads, key_dim, value_dim, device="cuda", dtype=torch.float64)
        do, dht = torch.randn_like(v), torch.randn_like(h0)
        results = []
        for inputs, fn in (((q, k, v, h0), lightning_attn_parallel_ref),
                           ((q.to(dtype), k.to(dtype), v.to(dtype), h0.float()), lightning_attn)):
            leaves = [x.detach().requires_grad_() for x in inputs]
            o, ht = fn(*leaves[:3], rates, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu_seqlens)
            ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
            results.append([o, ht] + [x.grad for x in leaves])
        names = ("o", "ht", "dq", "dk", "dv", "dh0")
        row = {"case": tag, **{n: rel_err(g, t) for n, g, t in zip(names, results[1], results[0])}}
        row["finite"] = all(bool(torch.isfinite(x).all()) for x in results[1])
        rows.append(row)
        print(row, flush=True)
    return rows


@contextlib.contextmanager
def launch_config_as(block_c: int, num_warps: int, num_stages: int):
    """Every sweep of our kernel launched with these settings inside the block (BLOCK_A stays the head width's)."""
    import importlib

    module = importlib.import_module("transnormer_hf.kernels.triton_lightning_attn")
    default = module._launch_config
    module._launch_config = lambda dim_a, dim_c, dtype, device, *_: (
        default(dim_a, dim_c, dtype, device)[0], block_c, num_warps, num_stages)
    try:
        yield
    finally:
        module._launch_config = default


def sweep_launch_configs(shapes, configs):
    """Time ours under other (BLOCK_C, num_warps, num_stages) launch settings, all sweeps alike."""
    rows = []
    for block_c, num_warps, num_stages in configs:
        with launch_config_as(block_c, num_warps, num_stages):
            for shape in shapes:
                try:
                    result = time_impl("ours", *shape)
                except Exception as error:
                    result = {"error": repr(error)[:200]}
                rows.append({"shape": shape, "BLOCK_C": block_c, "num_warps": num_warps, "num_stages": num_stages,
                             **result})
                print(rows[-1], flush=True)
    return rows


def varlen_lengths(seed=0, total=32768, count=25):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(total - 1, generator=gen)[: count - 1] + 1).values.tolist()
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", nargs="*", default=["A", "F"], help="A B C (fixed length) and F (varlen)")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS))
    parser.add_argument("--max-n", type=int, default=1 << 30, help="skip fixed-length shapes with N above this")
    parser.add_argument("--key-dims", nargs="*", type=int, default=[128, 256],
                        help="time only fixed-length shapes with these d_k (grid B has 128 and 256)")
    parser.add_argument("--anchor-max-n", type=int, default=32768,
                        help="time SDPA and lightning_attn2 (slow, recompiled per N) only up to this N")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--accuracy-impls", nargs="*", default=["ours", "fla_chunk", "fla_fused_chunk", "lightning_attn2"],
                        help="whose accuracy to measure (the anchors' are also in kernel_anchors.md section 4)")
    parser.add_argument("--launch-configs", nargs="*", default=[],
                        help="BLOCK_C,num_warps,num_stages triples to time ours with (at B4 H32 N8K, D 128 and 256)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--plot", help="only plot this JSON file (CPU) into a PNG beside it")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)

    torch.backends.cuda.matmul.allow_tf32 = False
    record = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "sdpa_backend": "default dispatch (torch picks cuDNN / flash / efficient)",
        "floors_bandwidth": "measured device-to-device copy of 1 GiB (bytes read + written) on this GPU",
        "floors_bandwidth_TBps": round(copy_bandwidth() / 1e12, 3),
        "rows": [], "varlen": [], "accuracy": [], "checks": [], "launch_configs": [],
    }
    try:
        record["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                               "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    def save():  # after every section, so a run cut short still leaves its numbers
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(record, handle, indent=1)

    for name in ("fla_chunk", "fla_fused_chunk"):
        # fla autotunes once per (K, V), not per N: tune it at a mid-size shape, not at the grid's first.
        if name in args.impls:
            time_impl(name, 4, 32, 8192, 128, 128, rep=5)
    for grid in args.grids:
        if grid == "F":
            for tag, lengths in VARLEN.items():
                lengths = lengths or varlen_lengths()
                cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
                for name in args.impls:
                    if not IMPLS[name][2]:
                        continue
                    cu_arg = cu if name == "ours" else cu.long()
                    result = time_impl(name, 1, 32, sum(lengths), 128, 128, cu_seqlens=cu_arg)
                    row = {"grid": "F", "case": tag, "sequences": len(lengths), "impl": name, **result}
                    record["varlen"].append(row)
                    print(row, flush=True)
                    save()
            continue
        for batch, heads, length, key_dim, value_dim in GRIDS[grid]:
            if length > args.max_n or key_dim not in args.key_dims:
                continue
            for name in args.impls:
                if name in ("sdpa_causal", "lightning_attn2") and length > args.anchor_max_n:
                    continue
                start = time.time()
                try:
                    result = time_impl(name, batch, heads, length, key_dim, value_dim)
                except Exception as error:
                    result = {"error": repr(error)[:300]}
                if result is None:
                    continue
                torch.cuda.empty_cache()
                row = {"grid": grid, "B": batch, "H": heads, "N": length, "d_k": key_dim, "d_v": value_dim,
                       "impl": name, **result,
                       **floors(batch, heads, length, key_dim, value_dim, record["floors_bandwidth_TBps"] * 1e12),
                       "wall_s": round(time.time() - start, 1)}
                record["rows"].append(row)
                print(time.strftime("%H:%M:%S"), row, flush=True)
                save()
    if not args.skip_checks:
        record["checks"] = kernel_checks()
        save()
        record["accuracy"] = accuracy_cases(args.accuracy_impls)
        save()
    if args.launch_configs:
        configs = [tuple(int(x) for x in item.split(",")) for item in args.launch_configs]
        record["launch_configs"] = sweep_launch_configs([(4, 32, 8192, 128, 128), (4, 32, 8192, 256, 128)], configs)
        save()
    summary(record)


def summary(record):
    print(f"\n{record['gpu']}  {record['versions']}")
    by_shape = {}
    for row in record["rows"] + record["varlen"]:
        key = (row["grid"], row.get("case") or (row["B"], row["H"], row["N"], row["d_k"]))
        by_shape.setdefault(key, {})[row["impl"]] = row
    for key, impls in by_shape.items():
        ours = impls.get("ours", {})
        cells = []
        for name, row in impls.items():
            if "fwd_ms" in row:
                cells.append(f"{name} {row['fwd_ms']:.3f}/{row['fwd_bwd_ms']:.3f}ms {row['extra_peak_MiB']:.0f}MiB")
        ratio = ""
        if "fwd_bwd_ms" in ours and "fwd_bwd_ms" in impls.get("fla_chunk", {}):
            ratio = f" | f+b vs fla x{impls['fla_chunk']['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}"
        print(key, "; ".join(cells), ratio)


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as handle:
        record = json.load(handle)
    rows = [r for r in record["rows"] if r["grid"] == "A" and "fwd_ms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        for name in IMPLS:
            points = sorted((r["N"], r[key]) for r in rows if r["impl"] == name)
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        floor_key = "fwd_floor_ms" if key == "fwd_ms" else "fwd_bwd_floor_ms"
        floor = sorted({(r["N"], r[floor_key]) for r in rows})
        axis.plot(*zip(*floor), "k--", label=f"HBM floor ({record.get('floors_bandwidth_TBps', 3.0)} TB/s copy)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("N (tokens per sequence)")
        axis.set_ylabel("ms")
        axis.set_title(("forward" if key == "fwd_ms" else "forward+backward") + ", B=4 H=32 D=128 bf16")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{record['gpu']}, torch {record['versions']['torch']}, triton {record['versions']['triton']}, "
                 f"{record['date'][:10]}", fontsize=9)
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
