"""minillm: a small from-scratch LLM inference runtime.

    import minillm
    m = minillm.load("path/to/model")          # a directory, a .gguf file, or a hub id
    logits = m(m.encode("The capital of France is"))
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import MinillmError
from .model import Model

__all__ = ["load", "LoadedModel", "Model", "ModelConfig", "MinillmError"]
__version__ = "0.1.0"


class LoadedModel:
    """A model with its tokenizer and where it came from: what `minillm.load` returns.

    Calling it runs the forward pass (`logits = m(tokens)`, `m(tokens, cache)`).
    """

    def __init__(self, model: Model, tokenizer, checkpoint):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.config = model.config

    def __call__(self, tokens, cache=None, last_only=False):
        return self.model(tokens, cache=cache, last_only=last_only)

    def new_cache(self, batch=1, max_len=None):
        return self.model.new_cache(batch, max_len)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MinillmError(f"{self.checkpoint.path} has no tokenizer (tokenizer.json)")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load(path_or_id, device: str = "cpu", progress: bool = True) -> LoadedModel:
    """Load a model directory (safetensors + config.json), a .gguf file, or a hub id `org/name`."""
    from .backend import get_xp  # noqa: PLC0415
    from .loading import read_model  # noqa: PLC0415
    from .tokenizer import load_tokenizer  # noqa: PLC0415

    xp = get_xp(device)
    ckpt = read_model(path_or_id, progress=progress)
    model = Model(ckpt.config, ckpt.weights, xp=xp)
    tokenizer = load_tokenizer(ckpt.path, ckpt.gguf_reader)
    return LoadedModel(model, tokenizer, ckpt)
