"""The `transnormer-hf` subcommands end to end with tiny budgets, and their one-line errors on bad arguments."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE
from transformers import AutoModelForCausalLM, AutoTokenizer

from transnormer_hf.cli import main
from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.baselines import same_size_llama
from transnormer_hf.quickstart import QuickstartSetup, run_quickstart, save_and_reload, train_tokenizer

# A few-second version of the quickstart's setup, for the tests that call run_quickstart twice.
TINY = QuickstartSetup(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, sequence_length=32, batch_size=4, heldout_blocks=4,
                       sample_new_tokens=4, decode_steps=1)


def _tiny_model_and_tokenizer():
    """A random tiny TNL and a byte-level BPE tokenizer trained on one sentence."""
    from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM

    tokenizer = train_tokenizer(["Return the value of the attribute, or None when it is missing."] * 50, 300)
    config = TransNormerLLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return TransNormerLLMForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny model saved as `quickstart` saves its model."""
    out = tmp_path_factory.mktemp("tiny_model")
    save_and_reload(*_tiny_model_and_tokenizer(), out, "cpu")
    return out


def test_quickstart_trains_saves_reloads_and_plots(tmp_path):
    """The real CLI with the default model, 10 steps and two short contexts."""
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), "--steps", "10", "--contexts", "32,64", "--seed", "1"]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "loss_curve.png", "decode_scaling.png", "quickstart.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["steps"] == 10 and not summary["interrupted"]
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    assert [row["context"] for row in summary["decode_scaling"]] == [32, 64]
    row_32, row_64 = summary["decode_scaling"]
    assert row_32["tnl_cache_bytes"] == row_64["tnl_cache_bytes"] > 0  # a fixed-size state...
    assert row_64["llama_cache_bytes"] == 2 * row_32["llama_cache_bytes"]  # ...against a growing KV cache

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "TransNormerLLMForCausalLM"
    assert model.generation_config.do_sample and model.generation_config.eos_token_id == tokenizer.eos_token_id
    text = "Return the value of the attribute."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE round trip


def test_save_and_reload_checks_logits(tmp_path):
    model, tokenizer = _tiny_model_and_tokenizer()
    reloaded, _ = save_and_reload(model, tokenizer, tmp_path / "good", "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(ids).logits, reloaded(ids).logits)

    original_save = type(model).save_pretrained

    def save_a_perturbed_copy(self, *args, **kwargs):  # a save that loses information must be caught
        with torch.no_grad():
            self.lm_head.weight[0, 0] += 1.0
            original_save(self, *args, **kwargs)
            self.lm_head.weight[0, 0] -= 1.0

    type(model).save_pretrained = save_a_perturbed_copy
    try:
        with pytest.raises(RuntimeError, match="logits differ"):
            save_and_reload(model, tokenizer, tmp_path / "bad", "cpu")
    finally:
        type(model).save_pretrained = original_save


def test_quickstart_is_deterministic_for_a_seed(tmp_path):
    first = run_quickstart(tmp_path / "a", steps=3, device="cpu", seed=7, contexts=(16,), setup=TINY)
    second = run_quickstart(tmp_path / "b", steps=3, device="cpu", seed=7, contexts=(16,), setup=TINY)
    assert first["losses"] == second["losses"] and first["samples"] == second["samples"]
    for name in ("model.safetensors", "tokenizer.json"):
        digests = {hashlib.sha256((tmp_path / run / name).read_bytes()).hexdigest() for run in "ab"}
        assert len(digests) == 1, name


def test_ctrl_c_during_training_saves_a_usable_model(tmp_path, monkeypatch):
    from transformers import Trainer

    original_step, calls = Trainer.training_step, []

    def step_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step_then_interrupt)
    summary = run_quickstart(tmp_path, steps=50, device="cpu", seed=0, contexts=(16,), setup=TINY)
    assert summary["interrupted"] and summary["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    output = model.generate(**tokenizer("Return the", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert output.shape[1] == tokenizer("Return the", return_tensors="pt")["input_ids"].shape[1] + 3


def test_generate_greedy_stream_and_beams(tiny_model_dir, capsys):
    out = tiny_model_dir
    greedy = ["generate", str(out), "Return the", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main(greedy + ["--stream"]) == 0
    streamed = capsys.readouterr().out.splitlines()
    assert plain[0].startswith("Return the") and plain[:-1] == streamed[:-1]  # same text; last line is timing
    assert "6 tokens" in plain[-1]
    assert main(["generate", str(out), "Return the", "--max-new-tokens", "4", "--num-beams", "2"]) == 0
    assert capsys.readouterr().out.startswith("Return the")


def test_generate_with_an_empty_prompt_starts_from_bos(tiny_model_dir, capsys):
    """As generate() does without input; an empty PROMPT was an internal reshape error (issue 21, item 9)."""
    assert main(["generate", str(tiny_model_dir), "", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=5, do_sample=False)
    assert printed[0] == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert "5 tokens" in printed[-1]


def test_generate_loads_the_official_format_with_a_separate_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 128)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    released = str(FIXTURE / "released")
    assert main(["generate", released, "w5 w6 w7", "--tokenizer", str(tmp_path), "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("w5 w6 w7")
    # this tokenizer has no BOS token: an empty prompt has nothing to start from
    assert main(["generate", released, "", "--tokenizer", str(tmp_path), "--max-new-tokens", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "transnormer-hf generate: error: PROMPT is empty and the tokenizer has no BOS token to start from; "
        "give some text"]


def _not_a_tnl_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["quickstart", "--device", "tpu"], "--device must be one of auto, cpu, cuda; got 'tpu'"),
        (["quickstart", "--steps", "-5"], "--steps must be a positive integer; got -5"),
        (["quickstart", "--contexts", "256,x"], "--contexts must be comma-separated positive integers"),
        (["quickstart", "--device", "cuda"], "--device cuda was requested but torch sees no CUDA GPU"),
        (["generate", "{tmp}/missing", "x"], "model folder '{tmp}/missing' does not exist"),
        (["generate", "{tmp}", "x"], "is not a model folder: it has no config.json"),
        (["generate", "{llama}", "x"], "is not a TransNormerLLM model (its config says model_type 'llama')"),
        (["generate", str(FIXTURE / "released"), "x"], "no tokenizer found with model"),
        (["generate", "{tmp}", "x", "--device", "gpu"], "--device must be one of auto, cpu, cuda"),
        (["generate", "{tmp}", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", "{tmp}", "x", "--stream", "--num-beams", "2"], "--stream works with one beam only"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(arguments, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    llama = _not_a_tnl_model(tmp_path / "llama") if any("{llama}" in a for a in arguments) else ""
    arguments = [a.format(tmp=tmp_path, llama=llama) for a in arguments]
    assert main(arguments) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"transnormer-hf {arguments[0]}: error: ")
    assert message.format(tmp=tmp_path) in stderr


def test_errors_in_a_fresh_process_have_no_traceback(tmp_path):
    environment = {**os.environ, "TRANSNORMER_HF_DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "transnormer_hf", "generate", _not_a_tnl_model(tmp_path), "hello"],
        capture_output=True, text=True, env=environment, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"transnormer-hf generate: error: {str(tmp_path)!r} is not a TransNormerLLM model "
        "(its config says model_type 'llama')"
    ]


@pytest.mark.parametrize("preset", ["385M", "1B", "7B"])
def test_same_size_llama_matches_the_parameter_count_with_an_aligned_mlp(preset):
    """The baseline of every comparison: same size within 0.4%, and an MLP width the matmuls run at full speed."""
    config = TransNormerLLMConfig.from_preset(preset)
    with torch.device("meta"):
        tnl, llama = TransNormerLLMForCausalLM(config), same_size_llama(config)
    tnl_params, llama_params = (sum(p.numel() for p in model.parameters()) for model in (tnl, llama))
    assert abs(llama_params / tnl_params - 1) < 0.004, (tnl_params, llama_params)
    assert llama.config.intermediate_size % 64 == 0
    assert (llama.config.hidden_size, llama.config.num_hidden_layers) == (config.hidden_size, config.num_hidden_layers)
