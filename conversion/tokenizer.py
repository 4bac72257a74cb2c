"""The tokenizer: the released SentencePiece model (which needs remote code) as a fast `tokenizer.json`.

The fast tokenizer is built from the SentencePiece model's own settings (normalizer, dummy prefix, byte
fallback, merges ranked by score; the same on every transformers version) and then checked: on a fixed set of sample texts it must give exactly the ids
of `sentencepiece` itself (when that package is installed), otherwise nothing is written. (Special-token
strings such as "<s>" inside a text are read as special tokens, as by the official transformers tokenizer.)
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

SAMPLE_TEXTS = (
    "Hello world! This is TransNormerLLM.",
    "  leading spaces, trailing spaces   ",
    "multiple   spaces\tand\ttabs\nand\nnewlines\n\n",
    "数字 12345 and 3.14159, 中文和English混合。",
    "def f(x):\n    return x ** 2  # code",
    "Ünïcödé àccents, ß, ø, ñ; emoji 🙂🚀",
    "URL https://huggingface.co/OpenNLPLab?x=1&y=2",
    "a",
    "",
    "▁already escaped▁",
    "Line one.\r\nLine two.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def _wire_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as ints, everything else as raw bytes."""
    fields, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value: int | bytes = varint()
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == 2:
            size = varint()
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((number, value))
    return fields


def read_sentencepiece_model(model_file: Path) -> SimpleNamespace:
    """The parts of a SentencePiece ModelProto the converter needs, parsed without the protobuf package.

    Field numbers and defaults are those of sentencepiece_model.proto (pieces 1, trainer_spec 2,
    normalizer_spec 3); the result has the attribute names of the generated protobuf classes.
    """
    def signed(value: int) -> int:  # int32 fields are sign-extended to 64 bits on the wire
        return value - (1 << 64) if value >= 1 << 63 else value

    try:
        model = _wire_fields(model_file.read_bytes())
        pieces = []
        for number, value in model:
            if number == 1:
                entry = dict(_wire_fields(value))
                pieces.append(SimpleNamespace(
                    piece=entry.get(1, b"").decode(), score=struct.unpack("<f", entry[2])[0] if 2 in entry else 0.0,
                    type=entry.get(3, 1),
                ))
        trainer = dict(_wire_fields(next((value for number, value in model if number == 2), b"")))
        normalizer = dict(_wire_fields(next((value for number, value in model if number == 3), b"")))
    except (IndexError, KeyError, UnicodeDecodeError, struct.error, ValueError) as error:
        raise ValueError(f"{model_file} is not a SentencePiece model ({error})") from error
    trainer_spec = SimpleNamespace(
        model_type=trainer.get(3, 1), byte_fallback=bool(trainer.get(35, 0)), unk_id=signed(trainer.get(40, 0)),
        bos_id=signed(trainer.get(41, 1)), eos_id=signed(trainer.get(42, 2)), pad_id=signed(trainer.get(43, -1)),
        unk_piece=trainer.get(45, b"<unk>").decode(),
    )
    normalizer_spec = SimpleNamespace(
        precompiled_charsmap=normalizer.get(2, b""), add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)), escape_whitespaces=bool(normalizer.get(5, 1)),
    )
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer_spec, normalizer_spec=normalizer_spec)


def _source_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _backend(proto: SimpleNamespace) -> "tokenizers.Tokenizer":  # noqa: F821
    """A `tokenizers` pipeline that encodes like SentencePiece with the settings stored in the model.

    SentencePiece normalises (charsmap, then extra spaces, then " " -> "▁", then the dummy "▁" prefix) and
    segments the whole normalised text: BPE applies merges in the order of the merged piece's score, Unigram
    picks the best-scoring segmentation. User-defined pieces are always emitted whole.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    user_defined = [piece.piece for piece in proto.pieces if piece.type == 4]
    if spec.model_type == 2:  # BPE
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
        mergeable = {piece.piece: (-piece.score, index) for index, piece in enumerate(proto.pieces) if piece.type == 1}
        ranked = sorted(
            (rank, text[:cut], text[cut:]) for text, rank in mergeable.items()
            for cut in range(1, len(text)) if text[:cut] in mergeable and text[cut:] in mergeable
        )
        model = BPE(vocab=vocab, merges=[(left, right) for _, left, right in ranked], unk_token=spec.unk_piece,
                    fuse_unk=True, byte_fallback=spec.byte_fallback, ignore_merges=bool(user_defined))
    elif spec.model_type == 1:  # Unigram
        model = Unigram([(piece.piece, piece.score) for piece in proto.pieces], spec.unk_id, spec.byte_fallback)
    else:
        raise ValueError(f"only BPE and Unigram SentencePiece models convert; got model_type {spec.model_type}")
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:  # spaces only: SentencePiece leaves tabs and newlines alone
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if spec.byte_fallback else []) + [decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _build_fast(model_file: Path, add_bos: bool, add_eos: bool, pad_id: int | None):
    """A `PreTrainedTokenizerFast` equivalent to the SentencePiece model in `model_file`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    proto = read_sentencepiece_model(model_file)
    try:
        backend = _backend(proto)
    except ValueError as error:
        raise ValueError(f"{model_file}: {error}") from error

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    spec = proto.trainer_spec
    bos, eos, unk = piece(spec.bos_id), piece(spec.eos_id), piece(spec.unk_id)
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    specials = [(token, token_id) for token, token_id in ((bos, spec.bos_id), (eos, spec.eos_id)) if token]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
        pad_token=piece(pad_id) if pad_id is not None else None, padding_side="left",
        add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False,
    )


def _check_ids(model_file: Path, saved: Path, add_bos: bool, add_eos: bool) -> int:
    """Reload the written tokenizer and compare its ids with SentencePiece's on SAMPLE_TEXTS; returns the count."""
    import sentencepiece
    from transformers import AutoTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    fast = AutoTokenizer.from_pretrained(saved)
    for text in SAMPLE_TEXTS:
        expected = ([processor.bos_id()] if add_bos else []) + processor.encode(text) + ([processor.eos_id()] if add_eos else [])
        got = fast(text)["input_ids"]
        if got != expected:
            raise ValueError(
                f"the fast tokenizer converted from {model_file} disagrees with SentencePiece on {text!r}: "
                f"{got[:20]} vs {expected[:20]}; not writing a tokenizer that changes ids"
            )
    return len(SAMPLE_TEXTS)


def convert_tokenizer(src: Path, dst: Path, pad_id: int | None, vocab_size: int | None = None) -> str:
    """Put a fast tokenizer into `dst`; returns a one-line description for the summary.

    A source `tokenizer.json` is copied with its companions; a `tokenizer.model` (SentencePiece) is converted
    and checked id for id; no tokenizer in `src` is fine (weights-only checkpoints).
    """
    if (src / "tokenizer.json").is_file():
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copyfile(src / name, dst / name)
        return f"copied {', '.join(copied)}"
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        return "none in the source (no tokenizer.json or tokenizer.model)"
    pieces = len(read_sentencepiece_model(model_file).pieces)
    if vocab_size is not None and pieces > vocab_size:
        raise ValueError(f"{model_file} has {pieces} pieces but the model's vocab_size is {vocab_size}")
    config = _source_tokenizer_config(src)
    # BaiChuanTokenizer's class defaults (tnl_spec.md section 3) when the source has no tokenizer_config.json.
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    _build_fast(model_file, add_bos, add_eos, pad_id).save_pretrained(dst)
    shutil.copyfile(model_file, dst / "tokenizer.model")  # kept for the official code and for re-checking
    try:
        checked = _check_ids(model_file, dst, add_bos, add_eos)
    except ImportError:
        return "tokenizer.json from tokenizer.model (ids NOT checked: install sentencepiece to check them)"
    return f"tokenizer.json from tokenizer.model, same ids as SentencePiece on {checked} sample texts"
