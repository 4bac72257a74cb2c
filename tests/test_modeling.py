"""The model against the official code's outputs (tnl_tiny_a fixture) and the standard transformers surface."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from checks import rel_err
from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMConfig, TransNormerLLMForCausalLM, TransNormerLLMModel
from transnormer_hf.modeling_transnormer import TransNormerLLMAttention

PARITY = 1e-5  # the bar: every reference tensor within 1e-5 relative in fp32


def _assert_parity(name, out, ref):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= PARITY, f"{name}: relative error {err:.3e} > {PARITY}"


@pytest.fixture(scope="module", params=["hf", "released"])
def official(request, fixture_dir):
    return TransNormerLLMForCausalLM.from_pretrained(fixture_dir / request.param, dtype=torch.float32).eval()


def test_both_official_folders_load_with_tied_head(official, fixture_dir):
    assert official.lm_head.weight.data_ptr() == official.model.embed_tokens.weight.data_ptr()
    released = torch.load(fixture_dir / "released" / "pytorch_model.bin", weights_only=True)
    ours = official.state_dict()
    assert set(ours) == set(released), "parameter names must be the official ones"
    for name, tensor in released.items():
        assert torch.equal(ours[name], tensor), name


def test_train_mode_logits_and_hidden_states(official, reference):
    official.train()
    try:
        out = official(reference["train.input_ids"], output_hidden_states=True)
    finally:
        official.eval()
    _assert_parity("train.logits", out.logits, reference["train.logits"])
    assert len(out.hidden_states) == 5
    for index, hidden in enumerate(out.hidden_states):
        _assert_parity(f"train.hidden_states.{index}", hidden, reference[f"train.hidden_states.{index}"])


def test_eval_logits(official, reference):
    with torch.no_grad():
        logits = official(reference["train.input_ids"], use_cache=False).logits
    _assert_parity("eval.logits", logits, reference["eval.logits"])


def _step_by_step(model, ids):
    """Feed `ids` one token at a time through the cache: (logits (B, N, V), the cache)."""
    cache, steps = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


def test_step_by_step_decode(official, reference):
    ids = reference["train.input_ids"]
    logits, cache = _step_by_step(official, ids)
    assert cache.get_seq_length() == ids.shape[1]
    _assert_parity("decode.logits", logits, reference["decode.logits"])


def test_long_prefill_states_and_next_token(official, reference):
    with torch.no_grad():
        out = official(reference["long.input_ids"], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        _assert_parity("long.logits", out.logits, reference["long.logits"])
        for layer in range(official.config.num_hidden_layers):
            assert cache[layer].dtype == torch.float32
            _assert_parity(f"long.state.{layer}", cache[layer], reference[f"long.state.{layer}"])
        state_bytes = cache.state_bytes
        following = official(reference["long.next_input_ids"], cache=cache, use_cache=True)
    _assert_parity("long.next_logits", following.logits, reference["long.next_logits"])
    assert cache.state_bytes == state_bytes, "the recurrent state must not grow with the context"


def test_left_padded_batch(official, reference):
    mask = reference["pad.attention_mask"]
    with torch.no_grad():
        logits = official(reference["pad.input_ids"], attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    _assert_parity("pad.logits", logits[real], reference["pad.logits"][real])


@pytest.mark.parametrize("case", ["greedy", "greedy_pad"])
def test_greedy_generate_matches_official(official, reference, case):
    ids = reference[f"{case}.input_ids"]
    mask = reference.get(f"{case}.attention_mask", torch.ones_like(ids))
    out = official.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                            return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, reference[f"{case}.sequences"])
    _assert_parity(f"{case}.scores", torch.stack(out.scores, dim=1), reference[f"{case}.scores"])


def test_reusing_an_instance_never_shifts_positions(official, reference):
    """The official module keeps an LRPE offset on itself (spec 10.1); ours gives the same answer every time."""
    ids = reference["train.input_ids"]
    with torch.no_grad():
        official(reference["long.input_ids"], use_cache=True)
        first = official(ids, use_cache=True).logits
        second = official(ids, use_cache=True).logits
    assert torch.equal(first, second)
    _assert_parity("eval.logits after reuse", first, reference["eval.logits"])


def test_triton_backend_reproduces_the_fixture(fixture_dir, reference, official):
    """The model on its Triton path (the interpreter on CPU): prefill (chunked kernel on the fused projection's
    strided views, fused gated norm), step-by-step decode (decode kernel), a left-padded batch, packed documents
    (cu_seqlens) and gradients, as on the torch path."""
    model = TransNormerLLMForCausalLM.from_pretrained(fixture_dir / "released", dtype=torch.float32,
                                                      attention_backend="triton").eval()
    ids = reference["train.input_ids"]
    _assert_parity("triton decode.logits", _step_by_step(model, ids)[0], reference["decode.logits"])
    mask = reference["pad.attention_mask"]
    with torch.no_grad():
        _assert_parity("triton eval.logits", model(ids, use_cache=False).logits, reference["eval.logits"])
        padded = model(reference["pad.input_ids"], attention_mask=mask, use_cache=False).logits
        _assert_parity("triton pad.logits", padded[mask.bool()], reference["pad.logits"][mask.bool()])
        # packed documents (positions restart inside the rows): the kernel's cu_seqlens path
        position_ids = torch.cat([torch.arange(n) for n in (10, 20, 7)])[None].expand(ids.shape[0], -1)
        packed = [m(ids, position_ids=position_ids, use_cache=False).logits for m in (model, official)]
    _assert_parity("triton packed logits", *packed)
    gradients = []
    for backend_model in (model, official):
        backend_model.zero_grad()
        backend_model(ids, labels=ids).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in backend_model.named_parameters()})
        backend_model.zero_grad()
    for name, grad in gradients[0].items():
        _assert_parity(f"triton grad {name}", grad, gradients[1][name])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_after_an_inference_mode_forward(backend):
    """The first forward under torch.inference_mode (an eval loop, a pipeline) must not leave tensors that
    autograd cannot save: the decay rates are cached per device at their first use."""
    model = TransNormerLLMForCausalLM(tiny_config(attention_backend=backend))
    ids = torch.randint(3, 48, (2, 9))
    with torch.inference_mode():
        model(ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_official_config_loads_unchanged(fixture_dir):
    raw = json.loads((fixture_dir / "released" / "config.json").read_text())
    assert "model_type" not in raw
    config = TransNormerLLMConfig.from_pretrained(fixture_dir / "released")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 4, 4)
    assert (config.intermediate_size, config.lrpe_layers, config.hidden_act) == (128, [1, 0, 1, 0], "swish")
    assert config.scale_embedding and config.model_type == "transnormer_llm"
    assert config.decoder_embed_dim == 64  # the official names stay readable


def test_save_then_auto_reload_gives_identical_logits(official, reference, tmp_path):
    official.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "transnormer_llm" and "auto_map" not in saved
    assert AutoConfig.from_pretrained(tmp_path).model_type == "transnormer_llm"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is TransNormerLLMForCausalLM
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = reference["train.input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, official(ids).logits)
    assert type(AutoModel.from_pretrained(tmp_path)) is TransNormerLLMModel


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_tracks_fp32(official, reference, dtype, tolerance):
    half = TransNormerLLMForCausalLM(official.config).to(dtype).eval()
    half.load_state_dict(official.state_dict())
    ids = reference["long.input_ids"]
    with torch.no_grad():
        out = half(ids, use_cache=True)
    assert out.logits.dtype == dtype
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert all(cache[layer].dtype == torch.float32 for layer in range(4)), "states stay fp32 in any dtype"
    assert rel_err(out.logits, reference["long.logits"]) < tolerance


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_attention_stays_finite_where_its_output_outgrows_fp16(backend):
    # Issue 21 item 1: the attention output has no softmax denominator, so in a last layer (lambda ~ 1) it grows
    # with position; here it reaches ~2e5 within 256 tokens (large random weights, as a trained model's last
    # layers at 2K tokens), past fp16's 65504. It used to be cast to fp16 before the norm: inf, then NaN.
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, lrpe_layers=[0, 1],
                         intermediate_size=64, attention_backend=backend)
    layer = TransNormerLLMAttention(config, layer_idx=1)
    for parameter in layer.parameters():  # fp16-representable weights and inputs: fp16 rounds only activations
        torch.nn.init.normal_(parameter, std=1.0)
    layer = layer.half().float()
    x, positions = torch.randn(1, 257, 64).half().float(), torch.arange(257)
    with torch.no_grad():
        reference, _ = layer(x, None, positions, None, None, False)  # fp32, all 257 tokens in one prefill
        half = copy.deepcopy(layer).half()
        out, state = half(x[:, :256].half(), None, positions[:256], None, None, True)
        step, _ = half(x[:, 256:].half(), state, positions[256:], None, None, True)  # one-token decode step
    for name, got, ref in (("prefill", out, reference[:, :256]), ("decode step", step, reference[:, 256:])):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), f"{name}: non-finite fp16 outputs"
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 2e-3, f"{name}: max error {err:.2e} of the largest fp32 output"  # fp16's epsilon is 4.9e-4


def test_inputs_embeds_and_return_dict(tiny_model):
    ids = torch.randint(3, 48, (2, 11))
    with torch.no_grad():
        by_ids = tiny_model(ids, use_cache=False)
        by_embeds = tiny_model(inputs_embeds=tiny_model.get_input_embeddings()(ids), use_cache=False)
        as_tuple = tiny_model(ids, use_cache=False, return_dict=False)
    assert torch.equal(by_ids.logits, by_embeds.logits)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], by_ids.logits)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        tiny_model()


def test_logits_to_keep(tiny_model):
    ids = torch.randint(3, 48, (2, 9))
    with torch.no_grad():
        full = tiny_model(ids).logits
        last = tiny_model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 48)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)  # matmul blocking may differ in ulps


def test_loss_is_the_shifted_mean_over_labelled_tokens(tiny_model):
    ids = torch.randint(3, 48, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = tiny_model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits.double(), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)
    summed = tiny_model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    expected_sum = torch.nn.functional.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(summed.double(), expected_sum / 100, rtol=1e-6, atol=1e-6)


def test_right_padding_with_ignored_labels_trains_on_real_tokens_only(tiny_model):
    short, long = torch.randint(3, 48, (1, 6)), torch.randint(3, 48, (1, 10))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1), long])
    mask = (torch.arange(10) < torch.tensor([[6], [10]])).long()
    labels = batch.masked_fill(mask == 0, -100)
    tiny_model.train()
    padded = tiny_model(batch, attention_mask=mask, labels=labels)
    alone = tiny_model(short, labels=short)
    assert rel_err(padded.logits[0, :6], alone.logits[0]) < 1e-6
    padded.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    ids = torch.randint(3, 48, (2, 12))
    tiny_model.train()
    tiny_model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    if hasattr(tiny_model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
        tiny_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in tiny_model.model.layers)
    tiny_model(ids, labels=ids).loss.backward()
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_packed_rows_equal_separate_documents(tiny_model):
    docs = [torch.randint(3, 48, (1, n)) for n in (5, 9, 2)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        logits = tiny_model(packed, position_ids=position_ids, use_cache=False).logits
        start = 0
        for doc in docs:
            alone = tiny_model(doc, use_cache=False).logits
            assert rel_err(logits[:, start:start + doc.shape[1]], alone) < 1e-6
            start += doc.shape[1]
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        tiny_model(packed, position_ids=position_ids, use_cache=True)


def test_a_foreign_cache_is_a_clear_error(tiny_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="must be a TransNormerLLMCache"):
        tiny_model(torch.randint(3, 48, (1, 4)), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="not both"):
        tiny_model(torch.randint(3, 48, (1, 4)), cache=TransNormerLLMCache(tiny_model.config),
                   past_key_values=TransNormerLLMCache(tiny_model.config))


def test_bad_attention_mask_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        tiny_model(torch.randint(3, 48, (2, 4)), attention_mask=torch.ones(2, 1, 4))


def test_resize_token_embeddings_keeps_the_tie(tiny_model):
    tiny_model.resize_token_embeddings(64)
    assert tiny_model.config.vocab_size == 64
    assert tiny_model.lm_head.weight.shape == (64, 32)
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()


def test_init_weights_follow_the_official_scheme():
    config = tiny_config(initializer_range=0.02, hidden_size=256, intermediate_size=512, vocab_size=512)
    model = TransNormerLLMForCausalLM(config)
    assert torch.all(model.model.embed_tokens.weight[config.pad_token_id] == 0), "the pad row starts at zero"
    weight = model.model.layers[0].channel_mixer.l1.weight
    assert abs(weight.std().item() - 0.02) < 0.002
    theta = model.model.layers[0].token_mixer.lrpe.theta
    assert torch.equal(theta.flatten()[:3], torch.tensor([1.0, 10000.0 ** (-2 / 256), 10000.0 ** (-4 / 256)]))


def test_meta_device_loading_rebuilds_theta(official, tmp_path):
    official.save_pretrained(tmp_path)
    for name in ("model.layers.0.token_mixer.lrpe.theta",):
        assert name in official.state_dict()
    reloaded = TransNormerLLMForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usage=True)
    for (name, ours), (_, theirs) in zip(reloaded.state_dict().items(), official.state_dict().items()):
        assert not ours.is_meta, name
        assert torch.equal(ours, theirs), name


BAD_FIELDS = [
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(num_attention_heads=3), r"num_attention_heads \(3\) must divide attention_hidden_size \(32\)"),
        (dict(hidden_act="softplus"), "hidden_act must be one of"),
        (dict(norm_type="batchnorm"), "norm_type must be one of"),
        (dict(lrpe_layers=[1, 0]), r"lrpe_layers must be a list with one 0/1 flag per layer \(3\)"),
        (dict(lrpe_layers=[1, 2, 0]), "lrpe_layers entries must be 0 or 1"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
        (dict(initializer_range=-0.1), "initializer_range must be >= 0"),
        (dict(attention_backend="cuda"), "attention_backend must be 'auto', 'torch' or 'triton'"),
        (dict(loss_chunk_size=-1), "loss_chunk_size must be a non-negative integer"),
]


@pytest.mark.parametrize("fields,message", [
    *BAD_FIELDS,
    (dict(decoder_embed_dim=64), "contradictory config: hidden_size=32 but its official alias decoder_embed_dim=64"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_official_aliases_and_presets():
    config = TransNormerLLMConfig(decoder_embed_dim=64, decoder_layers=2, decoder_attention_heads=4, hidden_dim=64,
                                  glu_dim=96, linear_use_lrpe_list=[1, 0], no_scale_embedding=True,
                                  linear_act_fun="swish", bias=True, vocab_size=100)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.intermediate_size, config.lrpe_layers, config.hidden_act) == (96, [1, 0], "swish")
    assert config.scale_embedding is False and config.use_bias is True
    one_b = TransNormerLLMConfig.from_preset("1B")
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.intermediate_size) == (2048, 16, 5632)
    with pytest.raises(ValueError, match="preset must be one of"):
        TransNormerLLMConfig.from_preset("3B")


# ---- overriding fields: constructor, from_pretrained, attribute assignment (issue 21, item 2) -----------------------

def _tiny_llama(num_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                        num_key_value_heads=2, num_hidden_layers=num_layers))


@pytest.mark.parametrize("num_layers", [2, 6])
def test_from_pretrained_with_another_layer_count_builds_trains_and_saves_like_llama(num_layers, tmp_path):
    """`from_pretrained(path, num_hidden_layers=n)` on a 4-layer model: Llama builds, trains and saves with n layers;
    so does TNL, its LRPE flags following the layer count (kept layers keep theirs, added ones get 0)."""
    ids = torch.randint(3, 48, (2, 9))
    originals = {"llama": _tiny_llama(4), "tnl": TransNormerLLMForCausalLM(tiny_config(num_hidden_layers=4,
                                                                                      lrpe_layers=[0, 1, 1, 0]))}
    for name, original in originals.items():
        original.save_pretrained(tmp_path / name)
        model = type(original).from_pretrained(tmp_path / name, num_hidden_layers=num_layers)
        assert len(model.model.layers) == num_layers, name
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.save_pretrained(tmp_path / f"{name}-{num_layers}")
        reloaded = type(original).from_pretrained(tmp_path / f"{name}-{num_layers}").eval()
        assert reloaded.config.num_hidden_layers == num_layers, name
        kept = original.state_dict()
        for key, value in reloaded.state_dict().items():
            if key.startswith("model.layers.") and int(key.split(".")[2]) < 4:
                assert torch.equal(value, kept[key]), (name, key)
    assert reloaded.config.lrpe_layers == [0, 1, 1, 0, 0, 0][:num_layers]
    assert reloaded.config.layer_types == ["linear_attention"] * num_layers


def test_official_checkpoint_with_fewer_layers_keeps_its_first_layers(fixture_dir, tmp_path):
    """The official format names the fields differently (decoder_layers, linear_use_lrpe_list): the override still
    applies and the first 2 of the fixture's 4 layers load with their weights (each layer's decay rate depends on
    the layer count, as in the official code, so the outputs are those of a 2-layer TNL)."""
    model = TransNormerLLMForCausalLM.from_pretrained(fixture_dir / "released", num_hidden_layers=2,
                                                      dtype=torch.float32)
    assert (model.config.num_hidden_layers, model.config.lrpe_layers, len(model.model.layers)) == (2, [1, 0], 2)
    full = TransNormerLLMForCausalLM.from_pretrained(fixture_dir / "released", dtype=torch.float32).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, full[key]), key
    model.save_pretrained(tmp_path)
    assert TransNormerLLMConfig.from_pretrained(tmp_path).lrpe_layers == [1, 0]


def test_setting_num_hidden_layers_after_construction_like_llama(tmp_path):
    from transformers import LlamaForCausalLM

    llama_config = _tiny_llama(3).config
    llama_config.num_hidden_layers = 2
    LlamaForCausalLM(llama_config).save_pretrained(tmp_path / "llama")
    config = tiny_config()  # 3 layers, lrpe_layers [1, 0, 1]
    config.num_hidden_layers = 2
    assert (config.lrpe_layers, config.layer_types) == ([1, 0], ["linear_attention"] * 2)
    config.decoder_layers = 4  # the official name is the same field
    assert (config.num_hidden_layers, config.lrpe_layers) == (4, [1, 0, 0, 0])
    config.lrpe_layers = [1, 1, 0, 1]
    model = TransNormerLLMForCausalLM(config)
    assert len(model.model.layers) == 4
    model.save_pretrained(tmp_path / "tnl")
    assert TransNormerLLMConfig.from_pretrained(tmp_path / "tnl").lrpe_layers == [1, 1, 0, 1]


@pytest.mark.parametrize("fields,message", BAD_FIELDS)
def test_attribute_assignment_is_validated_like_a_constructor_argument(fields, message):
    config = tiny_config()
    before = config.to_dict()
    ((name, value),) = fields.items()
    with pytest.raises(ValueError, match=message):
        setattr(config, name, value)
    assert config.to_dict() == before, "a refused value must leave the config as it was"


@pytest.mark.parametrize("fields,message", BAD_FIELDS)
def test_from_pretrained_overrides_are_validated_like_constructor_arguments(fields, message, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        TransNormerLLMConfig.from_pretrained(tmp_path, **fields)


def test_from_pretrained_overrides_apply_together_in_any_order(tmp_path):
    tiny_config().save_pretrained(tmp_path)  # 3 layers
    for overrides in (dict(lrpe_layers=[0, 1], num_hidden_layers=2), dict(num_hidden_layers=2, lrpe_layers=[0, 1])):
        config = TransNormerLLMConfig.from_pretrained(tmp_path, **overrides)
        assert (config.num_hidden_layers, config.lrpe_layers) == (2, [0, 1])


def test_head_dim_is_accepted_like_llamas(tmp_path):
    """LlamaConfig takes head_dim; TNL's is attention_hidden_size / heads, so head_dim= sets that width, and one that
    contradicts it is a clear error (issue 21, item 9: it raised "property 'head_dim' ... has no setter")."""
    config = TransNormerLLMConfig(hidden_size=32, num_attention_heads=2, head_dim=24, num_hidden_layers=2)
    assert (config.head_dim, config.attention_hidden_size) == (24, 48)
    config.save_pretrained(tmp_path)
    assert TransNormerLLMConfig.from_pretrained(tmp_path, head_dim=8).attention_hidden_size == 16
    config.head_dim = 16
    assert config.attention_hidden_size == 32
    assert TransNormerLLMForCausalLM(config).model.layers[0].token_mixer.head_dim == 16
    with pytest.raises(ValueError, match=r"head_dim \(16\) must be attention_hidden_size / num_attention_heads "
                                         r"\(48 / 2\)"):
        TransNormerLLMConfig(hidden_size=32, num_attention_heads=2, attention_hidden_size=48, head_dim=16)
    with pytest.raises(ValueError, match="head_dim must be a positive integer; got 0"):
        config.head_dim = 0
