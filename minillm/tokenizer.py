"""Tokenizers: tokenizer.json through the `tokenizers` library, or rebuilt from GGUF metadata.

A GGUF file of a byte-level BPE model (`tokenizer.ggml.model == "gpt2"`) carries the vocabulary,
the merges and a token type per entry; the pre-tokenizer is named (`tokenizer.ggml.pre`) rather
than stored, so the split rule for each name is written here, as llama.cpp defines it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import MinillmError

# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), by `tokenizer.ggml.pre`. "smollm" splits
# every digit on its own before the GPT-2 rule, as SmolLM2's own tokenizer.json does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level  # "gpt2", "default" and unknown names: GPT-2's own rule


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_from_gguf(reader) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the one the GGUF file was converted from."""

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MinillmError(
            f"this GGUF file has a {kind!r} tokenizer; minillm rebuilds byte-level BPE ('gpt2') ones. "
            "Use the original Hugging Face directory (with tokenizer.json) instead."
        )
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok


def load_tokenizer(path: Path, gguf_reader=None) -> Tokenizer | None:
    """The tokenizer of a model directory (tokenizer.json) or GGUF file; None if it has none."""
    if gguf_reader is not None:
        has_vocab = "tokenizer.ggml.model" in gguf_reader.fields
        return tokenizer_from_gguf(gguf_reader) if has_vocab else None
    f = Path(path) / "tokenizer.json"
    if not f.exists():
        return None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:  # the tokenizers library raises a bare Exception for malformed files
        raise MinillmError(f"{f} is not a valid tokenizer.json: {exc}") from exc
