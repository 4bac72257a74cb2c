"""`transnormer-hf train` on one GPU, plain and with --lora: the final model it saves reloads with from_pretrained and
gives the logits of the model that was in memory when it was saved.

The CLI runs in this process (its `main`), so the in-memory model can be read: Trainer.save_model is wrapped to
record that model's logits on a probe batch right after it writes `final/`. The model has the 385M preset's heads
(8 x 128; LRPE layer 0 with d_k = 256) in 2 layers, so the Triton kernels train at a released head shape while the
saves stay small. The FSDP2 accelerate case is tests/gpu/test_train_fsdp2_save.py.

Tolerance: same weights and same kernels on the same GPU, so the logits must be equal up to the reduction order a
kernel may choose per call: relative RMS 1e-6 (fp32), and the reloaded weights must equal the in-memory ones exactly.
"""

from __future__ import annotations

import pytest
import torch
from checks import rel_err
from .gpu_suite import DEVICE, DRY

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.cli import main

WORDS = "the cat sat on a mat and then ran to see the dog who was not happy about it".split()


def _corpus(path, documents=64):
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(documents):
        length = int(torch.randint(8, 40, (1,), generator=generator))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def base_model(tmp_path):
    """A random model saved as a folder (the CLI's --model), 259 byte-tokenizer ids."""
    fields = (dict(hidden_size=32, num_attention_heads=2, intermediate_size=48) if DRY else
              dict(hidden_size=1024, num_attention_heads=8, intermediate_size=2816))
    config = TransNormerLLMConfig(vocab_size=259, num_hidden_layers=2, lrpe_layers=[1, 0], **fields)
    torch.manual_seed(0)
    TransNormerLLMForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def saved_in_memory(monkeypatch):
    """Records, when `final/` is written, the in-memory model's eval logits on a probe batch and its weights."""
    from transformers import Trainer

    probe = torch.randint(3, 259, (2, 96), generator=torch.Generator().manual_seed(1))
    record = {}
    save_model = Trainer.save_model

    def save_and_record(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if output_dir is not None and str(output_dir).endswith("final"):
            model = self.model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                record["logits"] = model(input_ids=probe.to(DEVICE)).logits.float().cpu()
            record["weights"] = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
            model.train(was_training)

    monkeypatch.setattr(Trainer, "save_model", save_and_record)
    record["probe"] = probe
    return record


def _train(base, tmp_path, *extra) -> None:
    data = _corpus(tmp_path / "corpus.txt")
    args = ["train", "--model", str(base), "--tokenizer", "bytes", "--data", str(data),
            "--output-dir", str(tmp_path / "run"), "--max-length", "256", "--batch-size", "2", "--lr", "1e-3",
            "--max-steps", "4", "--save-steps", "100", "--logging-steps", "1", "--no-progress", *extra]
    assert main(args) == 0


def _logits(model, probe) -> torch.Tensor:
    with torch.no_grad():
        return model.to(DEVICE).eval()(input_ids=probe.to(DEVICE)).logits.float().cpu()


def test_train_saves_a_model_that_reloads_to_the_same_logits(base_model, tmp_path, saved_in_memory):
    _train(base_model, tmp_path)
    reloaded = TransNormerLLMForCausalLM.from_pretrained(tmp_path / "run" / "final")
    initial = TransNormerLLMForCausalLM.from_pretrained(base_model)
    for name, weight in reloaded.named_parameters():
        assert torch.equal(weight.detach(), saved_in_memory["weights"][name]), f"{name} differs from the saved model"
    assert not torch.equal(reloaded.model.layers[0].token_mixer.qkvu_proj.weight,
                           initial.model.layers[0].token_mixer.qkvu_proj.weight), "training changed nothing"
    err = rel_err(_logits(reloaded, saved_in_memory["probe"]), saved_in_memory["logits"])
    assert err <= 1e-6, f"reloaded logits differ from the in-memory model's: rel RMS {err:.2e}"


def test_train_lora_saves_adapters_that_reload_to_the_same_logits(base_model, tmp_path, saved_in_memory):
    from peft import PeftModel

    # With gradient checkpointing, as the README's fine-tuning example. Not with --bf16: accelerate wraps the
    # in-memory model's forward in autocast, so its logits would differ from the reloaded model's by bf16 rounding.
    _train(base_model, tmp_path, "--lora", "--lora-r", "8", "--gradient-checkpointing")
    reloaded = PeftModel.from_pretrained(TransNormerLLMForCausalLM.from_pretrained(base_model),
                                         tmp_path / "run" / "final")
    adapters = {name: p for name, p in reloaded.named_parameters() if "lora_" in name}
    assert adapters and any("lora_B" in name and p.abs().sum() > 0 for name, p in adapters.items()), "no trained B"
    for name, weight in adapters.items():
        assert torch.equal(weight.detach().cpu(), saved_in_memory["weights"][name]), f"{name} differs"
    err = rel_err(_logits(reloaded, saved_in_memory["probe"]), saved_in_memory["logits"])
    assert err <= 1e-6, f"reloaded logits differ from the in-memory model's: rel RMS {err:.2e}"
