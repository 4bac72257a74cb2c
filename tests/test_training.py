"""Training: the `train` CLI over Trainer, exact packing, gradient accumulation, LoRA, torch.compile, resume,
the tensor-parallel plan's names and clear errors for bad data. Multi-process runs are in test_distributed.py."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from checks import rel_err
from conftest import tiny_config

from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM
from transnormer_hf.cli import main
from transnormer_hf.data import (
    PackedCollator,
    PaddedCollator,
    build_examples,
    read_documents,
    tokenize_documents,
)


def _write_corpus(path, documents=40):
    words = "the cat sat on a mat and then ran to see the dog who was not happy about it".split()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(documents):
        length = int(torch.randint(4, 16, (1,), generator=generator))
        lines.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=generator)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_args(data, out, *extra):
    return ["train", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--max-length", "128",
            "--batch-size", "2", "--lr", "3e-3", "--logging-steps", "1", "--no-progress", *extra]


def _logged_losses(out):
    last = max(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 12-step CLI run with evaluation and checkpoints at steps 6 and 12 (shared by several tests)."""
    root = tmp_path_factory.mktemp("train")
    data = _write_corpus(root / "corpus.txt")
    out = root / "run"
    code = main(_train_args(data, out, "--max-steps", "12", "--save-steps", "6", "--eval-fraction", "0.2"))
    assert code == 0
    return data, out


# ---- Trainer through the CLI -------------------------------------------------------------------------------------

def test_trainer_loss_drops_and_writes_model_and_plot(trained, capsys):
    data, out = trained
    losses = _logged_losses(out)
    assert losses[12] < 0.8 * losses[1], losses
    assert (out / "loss.png").stat().st_size > 1000
    reloaded = TransNormerLLMForCausalLM.from_pretrained(out / "final")
    assert reloaded.config.vocab_size == 259  # the byte tokenizer's vocabulary


@pytest.mark.parametrize("packing", ["--packing", "--no-packing"])
def test_cli_prints_summary(tmp_path, capsys, packing):
    data = _write_corpus(tmp_path / "corpus.txt", documents=6)
    assert main(_train_args(data, tmp_path / "out", "--max-steps", "1", "--save-steps", "100", packing)) == 0
    printed = capsys.readouterr().out
    rows = "packed rows" if packing == "--packing" else "documents"
    assert re.search(r"model tiny: [\d.]+M parameters, [\d.]+M trainable", printed), printed
    assert re.search(rf"data .*: [\d,]+ tokens in \d+ {rows} of at most 128 tokens", printed), printed
    assert re.search(r"done: 1 steps, train loss [\d.]+, [\d,]+ tokens/s", printed), printed
    # the files it names are the files it wrote
    named = re.search(r"saved model to (\S+) \(([^)]+)\)", printed)
    assert named and named.group(1) == str(tmp_path / "out" / "final"), printed
    assert named.group(2).split(", ") == sorted(path.name for path in (tmp_path / "out" / "final").iterdir())
    assert {"config.json", "model.safetensors"} <= set(named.group(2).split(", "))


def test_final_model_not_written_is_an_error_not_a_success(tmp_path, capsys, monkeypatch):
    """Under FSDP with SHARDED_STATE_DICT, Trainer.save_model writes nothing, and the command said `saved model`
    all the same (issue 21, item 11). Accelerate runs FSDP on GPUs only, so here a save_model that writes nothing
    stands in for it (tests/gpu/test_train_fsdp2_save.py runs the real FSDP2 config): the command must fail
    with one line that says so, and never claim the save."""
    from transformers import Trainer

    checkpoint_save = Trainer.save_model

    def save_checkpoints_only(self, output_dir=None, _internal_call=False):
        if _internal_call:  # Trainer's own checkpoints
            checkpoint_save(self, output_dir, _internal_call=True)

    monkeypatch.setattr(Trainer, "save_model", save_checkpoints_only)
    data = _write_corpus(tmp_path / "corpus.txt", documents=6)
    assert main(_train_args(data, tmp_path / "out", "--max-steps", "1", "--save-steps", "100")) == 2
    captured = capsys.readouterr()
    assert "saved model" not in captured.out
    error = [line for line in captured.err.splitlines() if line.startswith("transnormer-hf")]
    assert len(error) == 1 and re.fullmatch(
        r"transnormer-hf train: error: training finished but the final model was not saved to "
        rf"{re.escape(str(tmp_path / 'out' / 'final'))}: no config\.json .*", error[0]), captured.err


def test_cli_loss_chunk_size_reaches_the_saved_config(tmp_path, capsys):
    data = _write_corpus(tmp_path / "corpus.txt", documents=6)
    assert main(_train_args(data, tmp_path / "out", "--max-steps", "1", "--save-steps", "100",
                            "--loss-chunk-size", "32")) == 0
    assert TransNormerLLMForCausalLM.from_pretrained(tmp_path / "out" / "final").config.loss_chunk_size == 32
    capsys.readouterr()  # the first run's progress bars
    assert main(_train_args(data, tmp_path / "bad", "--max-steps", "1", "--loss-chunk-size", "-1")) == 2
    error = capsys.readouterr().err
    assert "loss_chunk_size" in error and len(error.strip().splitlines()) == 1, error


def test_cli_with_a_transformers_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    data = _write_corpus(tmp_path / "corpus.txt", documents=8)
    words = sorted(set(data.read_text().split()))
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "out"
    assert main(_train_args(data, out, "--max-steps", "1", "--save-steps", "100",
                            "--tokenizer", str(tmp_path / "tokenizer"))) == 0
    model = TransNormerLLMForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == len(vocab) and model.config.eos_token_id == 2
    assert AutoTokenizer.from_pretrained(out / "final").encode("the cat", add_special_tokens=False) == [
        vocab["the"], vocab["cat"]]


def test_resume_continues_identically(trained, tmp_path):
    data, out = trained
    resumed = tmp_path / "resumed"
    args = _train_args(data, resumed, "--max-steps", "12", "--save-steps", "6", "--eval-fraction", "0.2",
                       "--resume", str(out / "checkpoint-6"))
    assert main(args) == 0
    full, second = _logged_losses(out), _logged_losses(resumed)
    for step in range(7, 13):
        assert second[step] == pytest.approx(full[step], rel=1e-6), step
    a = TransNormerLLMForCausalLM.from_pretrained(out / "final").state_dict()
    b = TransNormerLLMForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


# ---- exactness of the training objective --------------------------------------------------------------------------

def _documents(lengths, vocab=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_separate_loss_and_gradients():
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    documents = _documents((9, 5, 70, 3, 12))  # 70 > the 64-token block: state carried across blocks
    rows = build_examples(documents, max_length=80, packing=True)
    assert len(rows) == 3  # [9, 5], [70, 3], [12]: several documents per row and several rows per batch
    batch = PackedCollator()(rows)
    assert batch["input_ids"].shape == (1, sum(map(len, documents)))
    total = sum(len(doc) - 1 for doc in documents)
    packed_loss = model(**batch, num_items_in_batch=total).loss
    packed_loss.backward()
    packed_grads = _grads(model)

    model.zero_grad()
    separate_loss = sum(model(input_ids=torch.tensor([doc]), labels=torch.tensor([doc]), num_items_in_batch=total).loss
                        for doc in documents)
    separate_loss.backward()
    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-5, atol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the position restarts the documents would leak into each other: the check above can fail.
    leaked = model(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=total).loss
    assert abs(leaked.item() - separate_loss.item()) > 1e-3


def _one_sgd_step(batch_size, grad_accum, tmp_path, rows, **config):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = TransNormerLLMForCausalLM(tiny_config(**config))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}_ga{grad_accum}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
        disable_tqdm=True, use_cpu=True, remove_unused_columns=False, seed=0, data_seed=0,
    )
    Trainer(model=model, args=args, train_dataset=rows, data_collator=PaddedCollator(0)).train()
    return model.state_dict()


def test_gradient_accumulation_equals_large_batch(tmp_path):
    # Documents of very different lengths: a mean of per-micro-batch means would weight tokens unequally.
    rows = build_examples(_documents((3, 20, 7, 30)), max_length=64, packing=False)
    large = _one_sgd_step(4, 1, tmp_path, rows)
    accumulated = _one_sgd_step(2, 2, tmp_path, rows)
    torch.manual_seed(0)
    initial = TransNormerLLMForCausalLM(tiny_config()).state_dict()
    assert not torch.equal(large["model.layers.0.channel_mixer.l1.weight"],
                           initial["model.layers.0.channel_mixer.l1.weight"])
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-6, msg=name)


def _enable_checkpointing(model, use_reentrant=False):
    # transformers 5.23 renamed gradient_checkpointing_enable (kept as a deprecated alias) to activation_*.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def test_gradient_checkpointing_gives_the_same_gradients():
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    ids = torch.tensor(_documents((2 * 11,))).view(2, 11)
    calls = []
    model.model.layers[0].token_mixer.register_forward_hook(lambda *_: calls.append(1))
    model(input_ids=ids, labels=ids).loss.backward()
    plain = _grads(model)
    model.zero_grad()
    _enable_checkpointing(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1 + 2  # checkpointed: the layer's forward runs again during backward
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- LoRA ---------------------------------------------------------------------------------------------------------

def test_lora_default_targets_train_only_adapters_merge_and_reload(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = TransNormerLLMForCausalLM(tiny_config(initializer_range=0.1)).train()
    frozen = {name: value.clone() for name, value in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))  # no target_modules
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"qkvu_proj", "out_proj", "l1", "l2", "l3"}
    # Reentrant checkpointing behind frozen embeddings gives adapters grads only if enabling checkpointing also
    # made the inputs require grad (enable_input_require_grads): checked below.
    _enable_checkpointing(model, use_reentrant=True)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(_documents((24,))).view(2, 12)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trainable[name]), f"adapter {name} did not train"
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")]), f"{name} changed"

    model.eval()
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, adapted_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = TransNormerLLMForCausalLM(base.config).eval()
    fresh.load_state_dict(frozen)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    merged = model.merge_and_unload()
    assert type(merged) is TransNormerLLMForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_lora_all_linear_excludes_lm_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TransNormerLLMForCausalLM(tiny_config()),
                           LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=2))
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert not any(name.endswith("lm_head") for name in adapted)
    assert sum(name.endswith("qkvu_proj") for name in adapted) == 3


def test_lora_via_cli_saves_adapters_that_reload_on_their_base(tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file

    data = _write_corpus(tmp_path / "corpus.txt", documents=8)
    base = tmp_path / "base"
    TransNormerLLMForCausalLM(tiny_config(vocab_size=259)).save_pretrained(base)
    out = tmp_path / "lora"
    args = _train_args(data, out, "--max-steps", "2", "--save-steps", "100", "--lora", "--lora-r", "4",
                       "--gradient-checkpointing", "--tokenizer", "bytes")
    args[args.index("tiny")] = str(base)
    assert main(args) == 0
    named = re.search(rf"saved adapters to {re.escape(str(out / 'final'))} \(([^)]+)\)", capsys.readouterr().out)
    assert named and {"adapter_config.json", "adapter_model.safetensors"} <= set(named.group(1).split(", "))
    adapters = load_file(out / "final" / "adapter_model.safetensors")
    lora_b = [value for name, value in adapters.items() if "lora_B" in name]
    assert len(lora_b) == 5 * 3 and all(value.abs().sum() > 0 for value in lora_b)  # B starts at 0: it trained
    adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(base)
    # the folder reloads from what it records, and the adapters change the base model's logits
    base_model = TransNormerLLMForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        plain = base_model(ids).logits
        adapted = PeftModel.from_pretrained(base_model, out / "final").eval()(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)


def test_lora_on_a_preset_and_training_on_adapters_are_clear_errors(tmp_path, capsys):
    """A preset's random base weights are never saved, so its adapters could not be reloaded (issue 21, item 9: the
    adapter config recorded base model null); an adapter folder as --model names its base instead of going online."""
    data = _write_corpus(tmp_path / "corpus.txt", documents=4)
    assert main(_train_args(data, tmp_path / "out", "--lora")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--lora trains adapters on a pretrained model, but --model tiny is a " \
        "preset trained from scratch" in error, error
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/tnl-base"}))
    args = _train_args(data, tmp_path / "out", "--tokenizer", "bytes")
    args[args.index("tiny")] = str(adapters)
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--model {str(adapters)!r} holds LoRA adapters (for base model " \
        "'/models/tnl-base'), not a model" in error, error


def test_train_on_a_llama_folder_exits_2_with_one_line(tmp_path, capsys):
    """issue 21, item 9: a Llama folder as --model exited 1 with a 77-line traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                 num_hidden_layers=2)).save_pretrained(llama)
    args = _train_args(_write_corpus(tmp_path / "corpus.txt", documents=4), tmp_path / "out", "--tokenizer", "bytes")
    args[args.index("tiny")] = str(llama)
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"transnormer-hf train: error: --model {str(llama)!r} is not a TransNormerLLM model (its config says "
        "model_type 'llama')"]


def test_load_in_4bit_without_gpu_is_a_clear_error(tmp_path, capsys):
    data = _write_corpus(tmp_path / "corpus.txt", documents=4)
    TransNormerLLMForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    args = _train_args(data, tmp_path / "out", "--lora", "--load-in-4bit")
    args[args.index("tiny")] = str(tmp_path / "base")
    assert main([*args, "--tokenizer", "bytes"]) == 2
    assert re.search(r"--load-in-4bit \(QLoRA\) needs (a CUDA GPU|bitsandbytes)", capsys.readouterr().err)


# ---- torch.compile ------------------------------------------------------------------------------------------------

def test_compiled_training_step_equals_eager_without_graph_breaks():
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    ids = torch.tensor(_documents((20,))).view(2, 10)
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    torch._dynamo.reset()
    # aot_eager traces forward and backward through AOTAutograd like inductor, without the C++ build time.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    compiled_grads = _grads(model)
    model.zero_grad()
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    # Compiled, the CPU token mixer runs all blocks at once rather than its eager loop: fp32 rounding differs (~1e-6).
    for name, grad in _grads(model).items():
        assert rel_err(compiled_grads[name], grad) < 1e-5, name


def test_compiled_decode_step_equals_eager_without_graph_breaks():
    model = TransNormerLLMForCausalLM(tiny_config()).eval()
    prompt = torch.tensor(_documents((12,))).view(2, 6)
    step = prompt[:, -1:]
    with torch.no_grad():
        explained, compiled_cache, eager_cache = (TransNormerLLMCache(model.config) for _ in range(3))
        for cache in (explained, compiled_cache, eager_cache):
            model(input_ids=prompt, cache=cache, use_cache=True)
        explanation = torch._dynamo.explain(model)(input_ids=step, cache=explained, use_cache=True)
        assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(input_ids=step, cache=compiled_cache, use_cache=True).logits
        expected = model(input_ids=step, cache=eager_cache, use_cache=True).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert compiled_cache.seen_tokens == eager_cache.seen_tokens == 7
    for ours, theirs in zip(compiled_cache.layers, eager_cache.layers):
        torch.testing.assert_close(ours.state, theirs.state, rtol=1e-5, atol=1e-6)


# ---- tensor-parallel plan -----------------------------------------------------------------------------------------

def test_tp_plan_names_real_modules_and_keeps_the_token_mixer_whole():
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

    model = TransNormerLLMForCausalLM(tiny_config())
    base_names = [name for name, _ in model.model.named_modules()]
    plan = model.config.base_model_tp_plan
    for pattern, style in plan.items():
        assert style in ALL_PARALLEL_STYLES, style
        if pattern == "embed_tokens":  # transformers <= 5.23 adds this itself for tied embeddings
            assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
            continue
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$")
        matches = [name for name in base_names if regex.match(name)]
        assert len(matches) == model.config.num_hidden_layers, (pattern, matches)
        assert all(isinstance(model.model.get_submodule(name), torch.nn.Linear) for name in matches)
    assert not any("token_mixer" in pattern for pattern in plan)  # fused q|k|v|u and a joint norm: not shardable
    assert plan["layers.*.channel_mixer.l3"] == "rowwise"
    assert {plan["layers.*.channel_mixer.l1"], plan["layers.*.channel_mixer.l2"]} == {"colwise"}
    head_plan = type(model)._tp_plan
    assert all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in head_plan)
    assert all(style in ALL_PARALLEL_STYLES for style in head_plan.values())


# ---- data and its errors ------------------------------------------------------------------------------------------

def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"body": "third"}\n{"body": "fourth"}\n')
    assert read_documents(tmp_path / "a.txt") == ["first doc", "second doc"]
    assert read_documents(tmp_path / "b.jsonl", text_column="body") == ["third", "fourth"]
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tmp_path / "a.txt", folder / "a.txt")
    assert read_documents(folder) == ["first doc", "second doc"]


def test_parquet_reads_or_names_the_missing_package(tmp_path):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow: pip install pyarrow"):
            read_documents(tmp_path / "x.parquet")
        return
    pq.write_table(pyarrow.table({"text": ["one", "two"]}), tmp_path / "x.parquet")
    assert read_documents(tmp_path / "x.parquet") == ["one", "two"]
    with pytest.raises(ValueError, match="no 'body' column"):
        read_documents(tmp_path / "x.parquet", text_column="body")


def test_dataset_name_without_datasets_package_is_clear(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the `datasets` package: pip install datasets"):
        read_documents("some-user/some-dataset")


@pytest.mark.parametrize(
    ("file_name", "content", "extra", "message"),
    [
        ("empty.txt", "", [], r"empty.txt: no documents \(the data is empty or every text is blank\)"),
        ("blank.jsonl", '{"text": "  "}\n', [], r"no documents"),
        ("rows.jsonl", '{"content": "hello"}\n', [], r"rows.jsonl:1: no 'text' column \(found \['content'\]\)"),
        ("bad.jsonl", '{"text": "a"\n', [], r"bad.jsonl:1: not valid JSON"),
        ("long.txt", "x" * 300 + "\n", [], r"document 0 has 301 tokens, more than --max-length 128; .*--long-documents"),
    ],
)
def test_bad_data_is_a_clear_cli_error(tmp_path, capsys, file_name, content, extra, message):
    data = tmp_path / file_name
    data.write_text(content)
    assert main(_train_args(data, tmp_path / "out", "--max-steps", "1", *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith("transnormer-hf train: error: ") and len(error.strip().splitlines()) == 1, error
    assert re.search(message, error), error


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert main(_train_args(tmp_path / "nope.txt", tmp_path / "out")) == 2
    assert "data file not found" in capsys.readouterr().err


def test_long_documents_truncate_or_split():
    encode = lambda text: [3 + ord(c) % 50 for c in text]  # noqa: E731
    assert [len(s) for s in tokenize_documents(["a" * 9], encode, 4, 2, "truncate")] == [4]
    assert [len(s) for s in tokenize_documents(["a" * 9], encode, 4, 2, "split")] == [4, 4, 2]
    with pytest.raises(ValueError, match="more than --max-length 4"):
        tokenize_documents(["a" * 9], encode, 4, 2, "error")


def test_packing_restarts_positions_and_masks_document_starts():
    rows = build_examples([[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_length=6, packing=True)
    assert rows == [
        {"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1], "labels": [-100, 6, 7, -100, 9]},
        {"input_ids": [10, 11, 12, 13], "position_ids": [0, 1, 2, 3], "labels": [-100, 11, 12, 13]},
    ]


# ---- label smoothing ------------------------------------------------------------------------------------------------

def _smoothed_trainer_loss(model, tmp_path):
    """Trainer's loss with label smoothing, and the label smoother on the model's logits with shifted labels."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    ids = torch.randint(3, 48, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels.clone()})
    with torch.no_grad():
        expected = LabelSmoother(epsilon=0.1)(model(input_ids=ids, use_cache=False), labels, shift_labels=True)
    return loss.item(), expected.item()


def test_label_smoothing_shifts_the_labels_as_for_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=48))
    llama_loss, llama_expected = _smoothed_trainer_loss(llama, tmp_path / "llama")
    loss, expected = _smoothed_trainer_loss(TransNormerLLMForCausalLM(tiny_config()), tmp_path / "tnl")
    assert llama_loss == pytest.approx(llama_expected, rel=1e-6)  # Llama's path: the shifted, smoothed loss
    assert loss == pytest.approx(expected, rel=1e-6), f"TNL {loss:.4f} against the shifted {expected:.4f}"
