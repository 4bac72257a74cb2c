"""`transnormer-hf train` under `accelerate launch` with the README's FSDP2 config (one GPU): the final model is
written, and it is the trained model (issue 21, item 11: SHARDED_STATE_DICT used to leave no `final/` while the
command printed `saved model`). Accelerate runs FSDP on GPUs only, hence this test's place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_fsdp2_config() -> str:
    """The README's FSDP2 accelerate config, as a user copies it, with num_processes 1 (one GPU)."""
    block = re.search(r"```yaml\n# accelerate config for FSDP2:.*?\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no FSDP2 accelerate config block"
    config = block.group(1)
    assert "fsdp_version: 2" in config and "SHARDED_STATE_DICT" in config and "mixed_precision: bf16" in config
    return re.sub(r"num_processes: \d+", "num_processes: 1", config)


def _sharded_checkpoint_weights(checkpoint: Path, work: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Trainer checkpoint saved under FSDP's SHARDED_STATE_DICT (a DCP folder)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (shards,) = checkpoint.glob("pytorch_model_fsdp_*")
    dcp_to_torch_save(shards, work / "weights.pt")
    return torch.load(work / "weights.pt", weights_only=True)["model"]


def test_fsdp2_sharded_run_saves_a_final_model_that_reloads(tmp_path):
    from safetensors.torch import load_file

    from transnormer_hf import TransNormerLLMForCausalLM

    (tmp_path / "fsdp2.yaml").write_text(_readme_fsdp2_config())
    words = "the cat sat on a mat and then ran to see the dog who was not happy about it".split()
    (tmp_path / "corpus.txt").write_text("".join(" ".join(words[i % 7:] + words[: i % 5]) + "\n" for i in range(40)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp2.yaml"),
               "-m", "transnormer_hf", "train", "--model", "tiny", "--data", str(tmp_path / "corpus.txt"),
               "--output-dir", str(out), "--max-length", "128", "--batch-size", "2", "--lr", "3e-3",
               "--max-steps", "4", "--save-steps", "4", "--bf16", "--no-progress"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    final = out / "final"
    written = sorted(path.name for path in final.iterdir())
    assert {"config.json", "model.safetensors"} <= set(written), written
    assert f"saved model to {final} ({', '.join(written)})" in run.stdout, run.stdout

    # final/ holds exactly the trained weights: those of the sharded checkpoint at the last step
    trained = _sharded_checkpoint_weights(out / "checkpoint-4", tmp_path)
    saved = load_file(final / "model.safetensors")
    for name, value in saved.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    reloaded = TransNormerLLMForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    reference = TransNormerLLMForCausalLM(reloaded.config).eval()
    missing, unexpected = reference.load_state_dict({name: trained[name] for name in saved}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embeddings
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
