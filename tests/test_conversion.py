"""Conversion and Hub export: official and transformers checkpoints in, verified folders out, nothing half-written."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checks import assert_close_to_ref
from conftest import FIXTURE

from transnormer_hf.cli import main
from transnormer_hf.conversion import convert, export_remote_code, push
from transnormer_hf.conversion import remote_code
from transnormer_hf.conversion.checkpoint import CheckpointReader, _load_bin

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def copy_folder(src: Path, dst: Path) -> Path:
    """A writable copy (the fixture files are read-only)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        shutil.copyfile(path, dst / path.name)
    return dst


def fixture_state() -> dict[str, torch.Tensor]:
    return _load_bin(FIXTURE / "released" / "pytorch_model.bin")


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: tensor.clone() for name, tensor in reader.iter_tensors()}


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The released fixture folder converted once (shared by the tests that only read it)."""
    dst = tmp_path_factory.mktemp("converted") / "tnl"
    convert(str(FIXTURE / "released"), dst, log=lambda line: None)
    return dst


# ---------------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("folder", ["released", "hf"])
def test_fixture_folders_convert_and_match_reference_logits(folder, tmp_path, reference, converted, capsys):
    import transnormer_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    dst = converted if folder == "released" else tmp_path / "out"
    if folder == "hf":
        assert main(["convert", str(FIXTURE / folder), str(dst)]) == 0
        printed = capsys.readouterr().out
        assert "23/23 tensors identical" in printed and "max |diff| 0" in printed
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "transnormer_llm" and config["tie_word_embeddings"] is True
    assert {"config.json", "generation_config.json", "model.safetensors", "conversion.json"} <= {p.name for p in dst.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(reference["train.input_ids"], use_cache=False).logits
    assert_close_to_ref(f"{folder} logits", logits, reference["eval.logits"])
    source = fixture_state()
    written = read_all(dst)
    assert set(written) == set(source) - {LM_HEAD}  # tied: stored once, like transformers' save_pretrained
    assert all(bitwise(written[name], source[name]) for name in written)


def test_sharded_round_trip_through_both_formats(tmp_path):
    sharded = tmp_path / "sharded"
    convert(str(FIXTURE / "released"), sharded, max_shard_size="100KB", log=lambda line: None)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    official = tmp_path / "official"
    assert main(["convert", str(sharded), str(official), "--to", "official", "--max-shard-size", "100KB"]) == 0
    config = json.loads((official / "config.json").read_text())
    assert "model_type" not in config and config["decoder_embed_dim"] == 64 and config["linear_use_lrpe_list"] == [1, 0, 1, 0]
    assert (official / "pytorch_model.bin.index.json").is_file()
    official_state = read_all(official)
    assert bitwise(official_state[EMBED], official_state[LM_HEAD])  # both tied keys, as released
    back = tmp_path / "back"
    convert(str(official), back, log=lambda line: None)
    source, final = fixture_state(), read_all(back)
    assert set(final) == set(source) - {LM_HEAD}
    assert all(bitwise(final[name], source[name]) for name in final)


def test_legacy_pickle_with_only_the_lm_head_key(tmp_path):
    src = copy_folder(FIXTURE / "released", tmp_path / "src")
    state = fixture_state()
    embedding = state.pop(EMBED)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # not memory-mappable
    dst = tmp_path / "dst"
    convert(str(src), dst, log=lambda line: None)
    assert bitwise(read_all(dst)[EMBED], embedding)  # tied: either key is enough


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_casts_are_exact(dtype, torch_dtype, converted, tmp_path):
    dst = tmp_path / dtype
    convert(str(converted), dst, dtype=dtype, log=lambda line: None)
    assert json.loads((dst / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
    source, written = fixture_state(), read_all(dst)
    for name, tensor in written.items():
        assert bitwise(tensor, source[name].to(torch_dtype)), name
    # ... and back up to fp32 is exact too: the values are those of the low-precision cast.
    up = tmp_path / f"{dtype}-fp32"
    convert(str(dst), up, dtype="fp32", log=lambda line: None)
    assert all(bitwise(t, written[name].float()) for name, t in read_all(up).items())


def test_mixed_dtype_source_keeps_each_tensor_and_round_trips(tmp_path, capsys):
    """bf16 weights with fp32 LRPE thetas (a mixed-precision save): `keep` writes each tensor in its own dtype, bit
    for bit, through both formats; `--dtype fp32` casts only the bf16 ones, exactly."""
    src = copy_folder(FIXTURE / "released", tmp_path / "src")
    state = {name: tensor if name.endswith("lrpe.theta") else tensor.to(torch.bfloat16)
             for name, tensor in fixture_state().items()}
    torch.save(state, src / "pytorch_model.bin")
    kept = tmp_path / "kept"
    assert main(["convert", str(src), str(kept)]) == 0
    assert "max |diff| 0" in capsys.readouterr().out
    written = read_all(kept)
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16, torch.float32}
    assert all(bitwise(written[name], state[name]) for name in written) and set(written) == set(state) - {LM_HEAD}
    official, back = tmp_path / "official", tmp_path / "back"
    assert main(["convert", str(kept), str(official), "--to", "official"]) == 0
    assert main(["convert", str(official), str(back)]) == 0
    assert all(bitwise(tensor, state[name]) for name, tensor in read_all(back).items())
    up = tmp_path / "fp32"
    convert(str(kept), up, dtype="fp32", log=lambda line: None)
    assert all(bitwise(tensor, state[name].float()) for name, tensor in read_all(up).items())


def test_sentencepiece_tokenizer_becomes_fast_with_identical_ids(tmp_path, monkeypatch):
    import sentencepiece  # in the test extra: the converter's id check needs it too
    from transformers import AutoTokenizer

    from transnormer_hf.conversion import tokenizer as tokenizer_module
    from transnormer_hf.conversion.tokenizer import SAMPLE_TEXTS

    corpus = ["Hello world, a tiny corpus for a tiny tokenizer.", "The quick brown fox jumps over the lazy dog!",
              "数字 12345 和中文, def f(x): return x * 2", "Ünïcödé àccents and\ttabs\nnewlines"] * 20
    src = copy_folder(FIXTURE / "released", tmp_path / "src")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=120, model_type="bpe",
        character_coverage=1.0, byte_fallback=False, minloglevel=2,
    )
    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    dst = tmp_path / "dst"
    convert(str(src), dst, log=lambda line: None)
    assert (dst / "tokenizer.json").is_file()
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())  # no remote code needed
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    fast = AutoTokenizer.from_pretrained(dst)
    for text in SAMPLE_TEXTS + ("an unseen sentence, with 987 and 😀",):
        assert fast(text).input_ids == [processor.bos_id()] + processor.encode(text), text
    assert fast.padding_side == "left"
    # A text the fast tokenizer reads differently ("<s>" is a special token to it, plain text to SentencePiece)
    # makes the check refuse the tokenizer: nothing is written.
    monkeypatch.setattr(tokenizer_module, "SAMPLE_TEXTS", SAMPLE_TEXTS + ("<s> is text to SentencePiece",))
    with pytest.raises(ValueError, match="disagrees with SentencePiece on '<s> is text"):
        convert(str(src), tmp_path / "refused", log=lambda line: None)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_conversion_with_byte_fallback(model_type, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from transnormer_hf.conversion.tokenizer import SAMPLE_TEXTS, convert_tokenizer

    corpus = ["Hello world, a small corpus for a small tokenizer.", "The quick brown fox jumps over the lazy dog!",
              "数字 12345 和中文 def f(x): return x * 2", "  spaced   out\ttabs\nnewlines  "] * 30
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=310, model_type=model_type,
        byte_fallback=True, character_coverage=0.99, user_defined_symbols=["<tool>"], minloglevel=2,
    )
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert "same ids as SentencePiece" in convert_tokenizer(src, dst, pad_id=0, vocab_size=310)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    fast = AutoTokenizer.from_pretrained(dst)
    for text in SAMPLE_TEXTS + ("unseen ☃ bytes 😀 and <tool> pieces",):
        assert fast(text).input_ids == processor.encode(text), text
        assert fast.decode(processor.encode(text)) == processor.decode(processor.encode(text)), text
    with pytest.raises(ValueError, match="has 310 pieces but the model's vocab_size is 128"):
        convert_tokenizer(src, tmp_path, pad_id=0, vocab_size=128)


def test_hub_id_source_is_downloaded_and_recorded(monkeypatch, tmp_path):
    import huggingface_hub

    requested = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(FIXTURE / "released")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dst = tmp_path / "dst"
    convert("OpenNLPLab/fake-tnl", dst, log=lambda line: None)
    assert requested["repo_id"] == "OpenNLPLab/fake-tnl" and "*.bin" in requested["allow_patterns"]
    assert json.loads((dst / "conversion.json").read_text())["source"]["repo_id"] == "OpenNLPLab/fake-tnl"


# ---------------------------------------------------------------------------------------------------- bad input
class ArbitraryObject:
    """Unpickling this would create a file: it must never happen."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _edit_bin(folder: Path, edit) -> None:
    state = dict(fixture_state())
    edit(state)
    torch.save(state, folder / "pytorch_model.bin")


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_with_object(folder: Path) -> None:
    ArbitraryObject.marker = folder / "EXECUTED"
    torch.save({EMBED: torch.zeros(2), "payload": ArbitraryObject()}, folder / "pytorch_model.bin")


CORRUPTIONS = {
    "truncated safetensors": ("hf", _truncate, "truncated safetensors file"),
    "missing key": ("released", lambda f: _edit_bin(f, lambda s: s.pop("model.layers.1.channel_mixer.l2.weight")),
                    "missing 1 tensor(s): ['model.layers.1.channel_mixer.l2.weight']"),
    "extra key": ("released", lambda f: _edit_bin(f, lambda s: s.update({"model.layers.9.extra": torch.zeros(3)})),
                  "1 unexpected tensor(s): ['model.layers.9.extra']"),
    "wrong shape": ("released", lambda f: _edit_bin(f, lambda s: s.update({"model.layers.0.token_mixer.out_proj.weight": torch.zeros(64, 63)})),
                    "wrong shape(s): ['model.layers.0.token_mixer.out_proj.weight (64, 63) (expected (64, 64))']"),
    "untied lm_head": ("released", lambda f: _edit_bin(f, lambda s: s.update({LM_HEAD: s[LM_HEAD] + 1})),
                       "lm_head.weight differs from model.embed_tokens.weight"),
    "unknown config field": ("released", lambda f: _edit_config(f, lambda c: c.update(rotary_base=10000)),
                             "unknown field(s) ['rotary_base']"),
    "contradictory config": ("released", lambda f: _edit_config(f, lambda c: c.update(hidden_size=32)),
                             "contradictory config.json: hidden_size=32 but decoder_embed_dim=64"),
    "contradictory scale": ("hf", lambda f: _edit_config(f, lambda c: c.update(scale_embedding=False)),
                            "contradictory config.json: scale_embedding=False but no_scale_embedding=False"),
    "foreign model_type": ("hf", lambda f: _edit_config(f, lambda c: c.update(model_type="llama")),
                           "model_type 'llama'"),
    "pickle with objects": ("released", _pickle_with_object, "it holds objects other than tensors"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_input_is_a_clear_error_and_leaves_dst_untouched(case, tmp_path, capsys):
    folder, corrupt, message = CORRUPTIONS[case]
    src = copy_folder(FIXTURE / folder, tmp_path / "src")
    corrupt(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous content")
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left behind
    assert not (src / "EXECUTED").exists()


def test_failure_after_writing_leaves_dst_untouched(monkeypatch, tmp_path, capsys):
    import importlib

    convert_module = importlib.import_module("transnormer_hf.conversion.converter")  # the module, not the function

    def failing_check(*args, **kwargs):
        raise ValueError("verification failed: simulated")

    monkeypatch.setattr(convert_module, "compare_logits", failing_check)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous content")
    assert main(["convert", str(FIXTURE / "released"), str(dst), "--overwrite"]) == 2
    assert "simulated" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_fp16_overflow_is_refused(tmp_path, capsys):
    src = copy_folder(FIXTURE / "released", tmp_path / "src")
    _edit_bin(src, lambda s: s["model.layers.2.channel_mixer.l3.weight"].__setitem__((0, 0), 1e6))
    assert main(["convert", str(src), str(tmp_path / "dst"), "--dtype", "fp16"]) == 2
    assert "casting model.layers.2.channel_mixer.l3.weight to torch.float16 overflows" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_non_empty_dst_needs_overwrite(converted, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert main(["convert", str(FIXTURE / "released"), str(dst)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(["convert", str(FIXTURE / "released"), str(dst), "--overwrite"]) == 0
    assert "keep.txt" not in {p.name for p in dst.iterdir()} and (dst / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- remote code
def test_remote_code_export_loads_without_transnormer_hf(converted, tmp_path, monkeypatch):
    from transnormer_hf import TransNormerLLMForCausalLM
    from transnormer_hf.conversion.verify import fixed_input_ids

    seen = {}
    original = remote_code.remote_logits

    def spy(folder, ids):  # the export's own check runs in a process where transnormer_hf cannot be imported
        seen["ids"], (seen["logits"], seen["module"]) = ids, original(folder, ids)
        return seen["logits"], seen["module"]

    monkeypatch.setattr(remote_code, "remote_logits", spy)
    dst = copy_folder(converted, tmp_path / "remote")
    lines = []
    files = export_remote_code(dst, log=lines.append)
    assert "without transnormer_hf" in lines[0] and seen["module"].startswith("transformers_modules.")
    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_transnormer.TransNormerLLMForCausalLM"
    assert {"configuration_transnormer.py", "modeling_transnormer.py", "kernels_transnormer.py"} <= set(files)
    for name in files:  # flat: only sibling imports, nothing from the package
        assert "transnormer_hf." not in "".join(l for l in (dst / name).read_text().splitlines() if "import" in l)
    original_model = TransNormerLLMForCausalLM.from_pretrained(FIXTURE / "released").eval()
    with torch.no_grad():
        expected = original_model(fixed_input_ids(128), use_cache=False).logits
    assert torch.equal(seen["ids"], fixed_input_ids(128)) and torch.equal(seen["logits"], expected)


def test_remote_code_generator_guards_triton_and_lists_siblings(monkeypatch, tmp_path):
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    kernel = tmp_path / "fake_triton.py"
    kernel.write_text('"""A Triton kernel."""\n\nimport torch\nimport triton\nimport triton.language as tl\n\n'
                      "from .reference import srms_norm_ref\nfrom transnormer_hf.kernels import srms_norm\n\n"
                      "def op(x):\n    return srms_norm_ref(x)\n")
    sources = remote_code.bundle_sources()
    monkeypatch.setattr(remote_code, "bundle_sources", lambda: {**sources, "kernels_fake_triton.py": kernel})
    bundle = remote_code.generate_bundle()
    for name, text in bundle.items():
        (tmp_path / name).write_text(text)
    generated = bundle["kernels_fake_triton.py"]
    assert "from .kernels_reference import srms_norm_ref" in generated
    assert "from .kernels_transnormer import srms_norm" in generated
    assert "triton" not in get_imports(tmp_path / "kernels_fake_triton.py")  # optional for CPU users
    assert "kernels_fake_triton" in get_relative_imports(tmp_path / "kernels_transnormer.py")  # copied with it
    assert 'f"{__package__}.kernels_{name}"' in bundle["kernels_transnormer.py"]


# ---------------------------------------------------------------------------------------------------- push
class FakeHubApi:
    """Records what push sends; checks each call binds to the installed huggingface_hub's HfApi signature."""

    def __init__(self):
        from huggingface_hub import HfApi

        self.real = HfApi
        self.calls, self.uploaded = [], {}

    def _record(self, method, *args, **kwargs):
        import inspect

        inspect.signature(getattr(self.real, method)).bind(None, *args, **kwargs)
        self.calls.append((method, args, kwargs))

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
        return SimpleNamespace(commit_url="https://hub.local/me/tnl/commit/1", pr_url=None)


def test_push_sends_the_verified_folder_and_model_card(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import ModelCard

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(FIXTURE / "released"))
    dst = tmp_path / "tnl"
    convert("OpenNLPLab/fake-tnl", dst, log=lambda line: None)
    api = FakeHubApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    assert main(["push", str(dst), "me/tnl", "--private", "--revision", "v1", "--license", "apache-2.0"]) == 0
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1:] == (("me/tnl",), {"private": True, "exist_ok": True})
    assert api.calls[1][1:] == (("me/tnl",), {"branch": "v1", "exist_ok": True})
    upload = api.calls[2][2]
    assert (upload["repo_id"], upload["revision"], upload["create_pr"]) == ("me/tnl", "v1", False)
    assert sorted(api.uploaded) == ["README.md", "config.json", "conversion.json", "generation_config.json",
                                    "model.safetensors"]
    assert api.uploaded["model.safetensors"] == (dst / "model.safetensors").read_bytes()
    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and card.data.base_model == "OpenNLPLab/fake-tnl"
    assert 'AutoModelForCausalLM.from_pretrained("me/tnl")' in card.text
    assert "188,544 parameters" in card.text and "23/23 identical" in card.text and "max abs diff 0" in card.text


def test_push_refuses_a_folder_changed_after_verification(converted, tmp_path):
    dst = copy_folder(converted, tmp_path / "tnl")
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (dst / "model.safetensors").write_bytes(bytes(data))
    api = FakeHubApi()
    with pytest.raises(ValueError, match="changed since verification"):
        push(dst, "me/tnl", api=api, log=lambda line: None)
    (dst / "conversion.json").unlink()
    with pytest.raises(ValueError, match="no conversion.json"):
        push(dst, "me/tnl", api=api, log=lambda line: None)
    assert api.calls == []
