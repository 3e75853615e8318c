"""Tokenizers, special tokens and chat templates.

The text <-> token mapping is the `tokenizers` library's, from tokenizer.json or rebuilt from GGUF
metadata. A GGUF file of a byte-level BPE model (`tokenizer.ggml.model == "gpt2"`) carries the
vocabulary, the merges and a token type per entry; the pre-tokenizer is named (`tokenizer.ggml.pre`)
rather than stored, so the split rule for each name is written here, as llama.cpp defines it.

Around it, ChatTokenizer keeps what generation needs: the BOS/EOS tokens (EOS may be several ids),
whether a raw prompt starts with BOS, and the model's chat template, rendered as transformers'
`apply_chat_template` renders it (chat_template.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .chat_template import render_chat_template
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


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


@dataclass
class ChatTokenizer:
    """A tokenizer with the special tokens and chat template of its model."""

    tokenizer: Tokenizer
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, unk_token, pad_token -> text
    eos_ids: tuple = ()
    bos_id: int | None = None
    add_bos: bool = False  # whether a raw prompt gets BOS in front (the template handles chats)
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        """A raw prompt, as the model's tokenizer would encode it for completion."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt: bool = True, template: str | None = None, **kwargs) -> str:
        template = template or self.chat_template
        if template is None:
            raise MinillmError(
                "this model has no chat template: use `minillm generate` for plain completion, or pass "
                "--template with a Jinja file (for example a ChatML template)"
            )
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens, **kwargs})

    def encode_chat(self, messages, add_generation_prompt: bool = True, template: str | None = None, **kwargs):
        # Templates write BOS themselves where the model wants it, so no special tokens are added here
        # (transformers' apply_chat_template does the same).
        return self.encode_plain(self.render_chat(messages, add_generation_prompt, template, **kwargs))

    def save_files(self, directory: Path) -> None:
        """tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (EOS ids), as a Hugging Face model directory holds them."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        cfg = {**self.special_tokens, "add_bos_token": self.add_bos, "chat_template": self.chat_template,
               "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_ids)}))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _token_text(value):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MinillmError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _template_from_config(tok_cfg: dict, directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        return named.get("default") or next(iter(named.values()), None)
    if t is None and (directory / "chat_template.json").exists():
        t = _read_json(directory / "chat_template.json").get("chat_template")
    return t


def _eos_ids(tok: Tokenizer, eos_token, *sources) -> tuple:
    ids = []
    for src in sources:
        if src is None:
            continue
        ids.extend(src if isinstance(src, (list, tuple)) else [src])
    if eos_token is not None and tok.token_to_id(eos_token) is not None:
        ids.append(tok.token_to_id(eos_token))
    return tuple(dict.fromkeys(int(i) for i in ids))  # de-duplicated, in order


def load_tokenizer(path: Path, gguf_reader=None, model_config=None) -> ChatTokenizer | None:
    """The ChatTokenizer of a model directory or GGUF file; None if it has no tokenizer."""
    config_eos = model_config.eos_token_ids if model_config is not None else ()
    if gguf_reader is not None:
        if "tokenizer.ggml.model" not in gguf_reader.fields:
            return None
        tok = tokenizer_from_gguf(gguf_reader)
        tokens = _gguf_field(gguf_reader, "tokenizer.ggml.tokens")
        specials = {}
        for name in ("bos", "eos", "unknown", "padding"):
            i = _gguf_field(gguf_reader, f"tokenizer.ggml.{name}_token_id")
            if i is not None and 0 <= i < len(tokens):
                key = {"unknown": "unk", "padding": "pad"}.get(name, name)
                specials[f"{key}_token"] = tokens[i]
        bos_id = _gguf_field(gguf_reader, "tokenizer.ggml.bos_token_id")
        return ChatTokenizer(
            tok, specials, _eos_ids(tok, specials.get("eos_token"), config_eos), bos_id,
            bool(_gguf_field(gguf_reader, "tokenizer.ggml.add_bos_token", False)),
            _gguf_field(gguf_reader, "tokenizer.chat_template"),
        )
    directory = Path(path)
    f = directory / "tokenizer.json"
    if not f.exists():
        return None
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as exc:  # the tokenizers library raises a bare Exception for malformed files
        raise MinillmError(f"{f} is not a valid tokenizer.json: {exc}") from exc
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    specials = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(tok_cfg.get(key, special_map.get(key)))
        if text is not None:
            specials[key] = text
    gen_cfg = _read_json(directory / "generation_config.json")
    bos_text = specials.get("bos_token")
    bos_id = tok.token_to_id(bos_text) if bos_text else None
    return ChatTokenizer(
        tok, specials, _eos_ids(tok, specials.get("eos_token"), gen_cfg.get("eos_token_id"), config_eos),
        bos_id, bool(tok_cfg.get("add_bos_token", False)), _template_from_config(tok_cfg, directory),
    )
