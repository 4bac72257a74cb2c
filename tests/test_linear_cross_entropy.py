"""The chunked linear + cross-entropy loss: the op against transformers' cross-entropy in float64, and the model with
`loss_chunk_size` against its default head (loss and every gradient, packing, accumulation, checkpointing, Trainer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import assert_close_to_ref, rel_err
from conftest import tiny_config
from test_training import _documents, _enable_checkpointing, _grads, _one_sgd_step
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

from transnormer_hf import TransNormerLLMForCausalLM
from transnormer_hf.data import PackedCollator, PaddedCollator, build_examples
from transnormer_hf.kernels import cross_entropy_rows_ref, linear_cross_entropy

# ---- the op -------------------------------------------------------------------------------------------------------


def _op_inputs(dtype=torch.float64, rows=13, width=8, vocab=11, ignored=(1, 4, 5, 6, 7)):
    """With chunk_size 4, rows 4..7 form a chunk whose labels are all ignored."""
    hidden = torch.randn(rows, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    labels[list(ignored)] = -100
    return hidden, weight, labels


def _with_grads(loss, hidden, weight):
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("num_items_in_batch", [None, 20, torch.tensor(20)], ids=["mean", "int", "tensor"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 32])
def test_op_equals_cross_entropy_in_float64(chunk_size, num_items_in_batch):
    hidden, weight, labels = _op_inputs()
    ref = _with_grads(fixed_cross_entropy(hidden @ weight.T, labels, num_items_in_batch), hidden, weight)
    out = _with_grads(linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size,
                                           num_items_in_batch=num_items_in_batch), hidden, weight)
    for name, got, want in zip(("loss", "grad_hidden", "grad_weight"), out, ref):
        assert got.dtype == want.dtype == torch.float64, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


def test_op_with_every_label_ignored_matches_cross_entropy():
    hidden, weight, labels = _op_inputs(ignored=range(13))
    for num_items_in_batch in (None, 4):  # the mean is nan (with zero gradients); a given count gives 0
        ref = _with_grads(fixed_cross_entropy(hidden @ weight.T, labels, num_items_in_batch), hidden, weight)
        out = _with_grads(linear_cross_entropy(hidden, weight, labels, chunk_size=4,
                                               num_items_in_batch=num_items_in_batch), hidden, weight)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_op_skips_the_gradient_nobody_asked_for():
    hidden, weight, labels = _op_inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    (ref_hidden,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels), hidden)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, labels, chunk_size=4).grad_fn is None


def test_op_in_bf16_and_under_autocast_is_as_close_to_float64_as_the_unfused_head():
    hidden64, weight64, labels = _op_inputs(rows=40, width=16, vocab=50, ignored=(3, 9))
    truth = _with_grads(F.cross_entropy(hidden64 @ weight64.T, labels), hidden64, weight64)

    def both_paths(dtype, autocast):
        hidden = hidden64.detach().to(dtype).requires_grad_()
        weight = weight64.detach().to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fused = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
            unfused = ForCausalLMLoss(F.linear(hidden, weight), labels, 50, shift_labels=labels)
        return _with_grads(fused, hidden, weight), _with_grads(unfused, hidden, weight)

    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        fused, unfused = both_paths(dtype, autocast)
        assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == dtype
        for name, got, baseline, ref in zip(("loss", "grad_hidden", "grad_weight"), fused, unfused, truth):
            assert_close_to_ref(f"{name} {dtype} autocast={autocast}", got, ref, baseline)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(chunk_size=0), "chunk_size must be a positive integer; got 0"),
        (dict(chunk_size=2.0), "chunk_size must be a positive integer"),
        (dict(hidden=torch.randn(2, 13, 8)), r"hidden must be a 2-D float tensor \(T, D\)"),
        (dict(weight=torch.randn(11, 7)), r"weight must be \(V, D\) with hidden's D = 8; got \(11, 7\)"),
        (dict(weight=torch.randn(11, 8)), "weight and hidden must share a dtype"),
        (dict(labels=torch.zeros(12, dtype=torch.long)), r"labels must be an int64 tensor of shape \(T,\) = \(13,\)"),
        (dict(labels=torch.zeros(13, dtype=torch.int32)), "labels must be an int64 tensor"),
        (dict(num_items_in_batch=2.5), "num_items_in_batch must be an int, a tensor or None"),
    ],
)
def test_op_bad_input_names_the_argument(change, message):
    hidden, weight, labels = _op_inputs()
    args = {**dict(hidden=hidden, weight=weight, labels=labels, chunk_size=4), **change}
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_config_loss_chunk_size_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match=rf"loss_chunk_size must be a non-negative integer \(0 = off\); got {value!r}"):
        tiny_config(loss_chunk_size=value)


# ---- the Triton rows kernel (CPU interpreter) ----------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [7, 300, 5000], ids=["one-block", "masked-block", "two-blocks"])
@pytest.mark.parametrize("want_grad", [True, False], ids=["grad", "loss-only"])
def test_triton_rows_equal_the_torch_rows_in_fp32(vocab, want_grad):
    from transnormer_hf.kernels.triton_cross_entropy import cross_entropy_rows

    logits = 4 * torch.randn(6, vocab)
    labels = torch.tensor([0, vocab - 1, -100, 3 % vocab, -100, vocab // 2])
    ref_loss, ref_grad = cross_entropy_rows_ref(logits.double(), labels, -100, want_grad)
    loss, grad = cross_entropy_rows(logits.clone(), labels, -100, want_grad)
    assert_close_to_ref("loss", loss, ref_loss, rtol=1e-5)
    assert (grad is None) == (not want_grad)
    if want_grad:
        assert_close_to_ref("grad", grad, ref_grad, rtol=1e-5)
        assert grad[[2, 4]].abs().max() == 0  # ignored rows


def test_triton_rows_in_bf16_overwrite_the_logits_with_their_gradient():
    from transnormer_hf.kernels.triton_cross_entropy import cross_entropy_rows

    logits = (3 * torch.randn(5, 300)).bfloat16()
    labels = torch.tensor([1, -100, 299, 0, 17])
    ref_loss, ref_grad = cross_entropy_rows_ref(logits.double(), labels, -100, True)
    buffer = logits.clone()
    loss, grad = cross_entropy_rows(buffer, labels, -100, True)
    assert grad.data_ptr() == buffer.data_ptr() and grad.dtype == torch.bfloat16  # no second (rows, V) buffer
    assert_close_to_ref("loss", loss, ref_loss, rtol=1e-5)  # fp32 math on the same bf16 logits
    assert (grad.double() - ref_grad).abs().max() <= 2 ** -7  # one bf16 rounding (truncation in the interpreter)


def test_linear_cross_entropy_triton_backend_equals_torch_backend():
    hidden, weight, labels = _op_inputs(torch.float32, rows=21, width=16, vocab=300)
    torch_path = _with_grads(linear_cross_entropy(hidden, weight, labels, chunk_size=8, backend="torch"), hidden, weight)
    triton_path = _with_grads(linear_cross_entropy(hidden, weight, labels, chunk_size=8, backend="triton"),
                              hidden, weight)
    for got, want in zip(triton_path, torch_path):
        assert rel_err(got, want) < 1e-5


# ---- the model ----------------------------------------------------------------------------------------------------


def _loss_and_grads(model, chunk_size, **batch):
    model.config.loss_chunk_size = chunk_size
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    return output, _grads(model)


def _assert_same_loss_and_grads(model, chunk_size, **batch):
    chunked, chunked_grads = _loss_and_grads(model, chunk_size, **batch)
    default, default_grads = _loss_and_grads(model, 0, **batch)
    assert chunked.logits is None and default.logits is not None
    torch.testing.assert_close(chunked.loss, default.loss, rtol=1e-5, atol=0)
    assert chunked_grads.keys() == default_grads.keys()
    assert "model.embed_tokens.weight" in chunked_grads  # the tied head's gradient reaches the embedding
    for name, grad in chunked_grads.items():  # fp32 sums in another order: relative RMS, not elementwise
        assert rel_err(grad, default_grads[name]) < 1e-5, name


@pytest.mark.parametrize("chunk_size", [5, 1000])  # 5 does not divide 2 * 11 rows; 1000 is one chunk
def test_model_chunked_loss_equals_the_default_head(chunk_size):
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    ids = torch.tensor(_documents((2 * 11,))).view(2, 11)
    labels = ids.clone()
    labels[0, :4] = -100
    _assert_same_loss_and_grads(model, chunk_size, input_ids=ids, labels=labels)
    _assert_same_loss_and_grads(model, chunk_size, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(37))
    shift_labels = torch.roll(labels, -2, dims=1)  # explicit shift_labels win over labels, as in transformers
    _assert_same_loss_and_grads(model, chunk_size, input_ids=ids, labels=labels, shift_labels=shift_labels)
    model.config.loss_chunk_size = chunk_size
    with torch.no_grad():  # evaluation keeps the logits and the same loss
        evaluated = model(input_ids=ids, labels=labels)
    assert evaluated.logits.shape == (2, 11, 48)
    torch.testing.assert_close(evaluated.loss, ForCausalLMLoss(evaluated.logits, labels, 48), rtol=1e-6, atol=0)


def test_model_chunked_loss_on_packed_rows():
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    documents = _documents((9, 5, 70, 3, 12))
    batch = PackedCollator()(build_examples(documents, max_length=80, packing=True))
    assert batch["position_ids"].eq(0).sum() == len(documents)  # positions restart at every document
    _assert_same_loss_and_grads(model, 16, **batch, num_items_in_batch=sum(len(doc) - 1 for doc in documents))


def test_model_chunked_loss_with_gradient_checkpointing():
    model = TransNormerLLMForCausalLM(tiny_config()).train()
    ids = torch.tensor(_documents((2 * 11,))).view(2, 11)
    _, plain_grads = _loss_and_grads(model, 0, input_ids=ids, labels=ids)
    _enable_checkpointing(model)
    _, checkpointed_grads = _loss_and_grads(model, 7, input_ids=ids, labels=ids)
    for name, grad in checkpointed_grads.items():
        assert rel_err(grad, plain_grads[name]) < 1e-5, name


def test_trainer_gradient_accumulation_with_chunked_loss_equals_large_batch(tmp_path):
    rows = build_examples(_documents((3, 20, 7, 30)), max_length=64, packing=False)
    large = _one_sgd_step(4, 1, tmp_path, rows)
    accumulated = _one_sgd_step(2, 2, tmp_path, rows, loss_chunk_size=6)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_loss_drops_with_chunked_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = TransNormerLLMForCausalLM(tiny_config(loss_chunk_size=16))
    rows = build_examples(_documents((30,) * 8), max_length=64, packing=False) * 4
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                             logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PaddedCollator(0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
