"""The Lightning Attention kernel's tunables on this GPU: the split policy and the launch configuration.

Times our kernel (forward and forward+backward, `attention.time_impl`) on grid shapes under each split policy
(programs per SM, the shortest sequence that may be split, the gain a split must bring) and each launch
configuration (BLOCK_C, num_warps, num_stages, all sweeps alike); one run, one JSON.

    python benchmarks/attention_tuning.py --out benchmarks/results/attention_tuning_h200.json
"""

from __future__ import annotations

import argparse
import json

import attention
import transnormer_hf.kernels.triton_lightning_attn as kernel

SPLIT_SHAPES = [(4, 32, 8192, 128, 128), (4, 32, 32768, 128, 128), (2, 8, 8192, 128, 128), (2, 16, 8192, 128, 128),
                (2, 32, 8192, 128, 128), (1, 8, 32768, 128, 128), (1, 16, 32768, 128, 128), (8, 8, 2048, 128, 128),
                (2, 8, 8192, 256, 128), (1, 32, 32768, 256, 128)]
# (programs per SM, shortest sequence split, gain); the first is the shipped policy
SPLIT_POLICIES = [(kernel._PROGRAMS_PER_SM, kernel._MIN_SPLIT_TOKENS, kernel._SPLIT_GAIN),
                  (2, 4096, 2.0), (4, 4096, 2.0), (4, 4096, 1.5), (8, 4096, 1.5), (4, 2048, 1.5)]
LAUNCH_SHAPES = [(4, 32, 4096, 128, 128), (4, 32, 32768, 128, 128), (2, 8, 8192, 128, 128), (1, 16, 32768, 128, 128),
                 (4, 32, 8192, 256, 128)]
LAUNCH_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (32, 4, 2), (32, 4, 3), (32, 2, 2), (64, 4, 1)]


def sweep_split_policies(shapes, policies):
    """Rows of `attention.time_impl("ours", ...)` for each split policy, the shipped one restored after."""
    shipped = kernel._PROGRAMS_PER_SM, kernel._MIN_SPLIT_TOKENS, kernel._SPLIT_GAIN
    rows = []
    for policy in policies:
        kernel._PROGRAMS_PER_SM, kernel._MIN_SPLIT_TOKENS, kernel._SPLIT_GAIN = policy
        kernel._target_programs.cache_clear()
        for shape in shapes:
            rows.append({"policy": policy, "shape": shape, **attention.time_impl("ours", *shape, rep=40)})
            print(rows[-1], flush=True)
    kernel._PROGRAMS_PER_SM, kernel._MIN_SPLIT_TOKENS, kernel._SPLIT_GAIN = shipped
    kernel._target_programs.cache_clear()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (after each section)")
    args = parser.parse_args()
    record = {"command": "python benchmarks/attention_tuning.py --out " + args.out, "versions": attention.versions(),
              "gpu": attention.torch.cuda.get_device_name(), "split": [], "launch_configs": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    record["split"] = sweep_split_policies(SPLIT_SHAPES, SPLIT_POLICIES)
    save()
    for config in LAUNCH_CONFIGS:  # one at a time, so a run cut short keeps what it measured
        record["launch_configs"] += attention.sweep_launch_configs(LAUNCH_SHAPES, [config])
        save()


if __name__ == "__main__":
    main()
