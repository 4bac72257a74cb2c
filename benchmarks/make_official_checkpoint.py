"""Write a random checkpoint in the released (official) layout: sharded pytorch_model-*.bin + index, bf16.

Used to measure `transnormer-hf convert` time and peak memory on a released size without downloading one:

    python benchmarks/make_official_checkpoint.py --preset 1B --out /tmp/tnl-1b-official
    /usr/bin/time -v transnormer-hf convert /tmp/tnl-1b-official /tmp/tnl-1b-converted
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from transnormer_hf import TransNormerLLMConfig
from transnormer_hf.conversion.checkpoint import write_bin
from transnormer_hf.conversion.official import EMBED_KEY, LM_HEAD_KEY, expected_shapes, official_config_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1B", choices=["385M", "1B", "7B"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-shard-size", type=int, default=1_000_000_000, help="bytes per .bin shard")
    args = parser.parse_args()
    config = TransNormerLLMConfig.from_preset(args.preset, hidden_act="swish")
    shapes = expected_shapes(config)
    layout = {name: (shape, torch.bfloat16) for name, shape in shapes.items()}
    generator = torch.Generator().manual_seed(0)

    def random_tensors(names: list[str]) -> dict[str, torch.Tensor]:
        return {name: (0.02 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16) for name in names}

    args.out.mkdir(parents=True, exist_ok=False)
    files = write_bin(args.out, layout, random_tensors, args.max_shard_size, shared={LM_HEAD_KEY: EMBED_KEY})
    (args.out / "config.json").write_text(json.dumps(official_config_dict(config, torch.bfloat16), indent=2) + "\n")
    size = sum((args.out / name).stat().st_size for name in files)
    print(f"wrote {args.preset}-shaped random checkpoint to {args.out}: {len(files)} files, {size / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
