"""Checkpoint I/O: find the model (local path, GGUF file or hub id), read config and weights.

    resolve(path_or_id)  -> a local directory or .gguf file (hub ids go through huggingface_hub)
    read_model(path)     -> Checkpoint(config, weights under canonical names, where it came from)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MinillmError
from .names import sanitize
from .safetensors_io import read_checkpoint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a snapshot needs: config, weights, tokenizer and template files. Never *.bin (pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, np.ndarray]
    path: Path
    source_dtypes: dict[str, int] = field(default_factory=dict)  # storage dtype -> parameter count
    gguf_reader: object = None
    file_bytes: int = 0
    raw_config: dict = field(default_factory=dict)  # config.json as read (quantize.py writes it back)


def resolve(path_or_id: str | Path) -> Path:
    """A local model directory or .gguf file; a hub id `org/name` is downloaded into the HF cache."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    text = str(path_or_id)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return _download(text)
    raise MinillmError(f"no model at {text!r}: give a model directory, a .gguf file, or a hub id like org/name")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hub ids
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise MinillmError(
            f"could not fetch {repo_id!r}: the Hugging Face hub cannot be reached (offline?) and it is not "
            "in the local cache. Download it where there is a network and pass the local directory instead."
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MinillmError(f"could not fetch {repo_id!r} from the Hugging Face hub: {exc}. "
                           "Pass a local directory instead.") from exc


def _dtype_counts(weights, stored: dict[str, str]) -> dict[str, int]:
    """Parameters per storage dtype ("BF16", ...; quantized layers as e.g. "int4 g64")."""
    counts: dict[str, int] = {}
    for name, w in weights.items():
        if hasattr(w, "spec"):
            kind = w.spec.describe()
            size = int(w.shape[0] * w.shape[1])
        else:
            kind, size = stored.get(name, str(w.dtype)), int(w.size)
        counts[kind] = counts.get(kind, 0) + size
    return counts


def read_model(path_or_id, progress: bool = True) -> Checkpoint:
    path = resolve(path_or_id)
    if path.is_file():
        if path.suffix != ".gguf":
            raise MinillmError(f"{path} is a file but not a .gguf: pass the model directory that holds it")
        from .gguf_import import read_gguf  # noqa: PLC0415

        cfg_dict, weights, reader = read_gguf(path, progress=progress)
        dtypes: dict[str, int] = {}
        for t in reader.tensors:
            dtypes[t.tensor_type.name] = dtypes.get(t.tensor_type.name, 0) + int(t.n_elements)
        return Checkpoint(ModelConfig.from_hf(cfg_dict), weights, path, dtypes, reader, path.stat().st_size,
                          cfg_dict)
    config = ModelConfig.from_file(path / "config.json")
    stored: dict[str, str] = {}
    raw = read_checkpoint(path, stored)
    if config.quantization_config:
        from .quantized import collect_quantized  # noqa: PLC0415

        raw = collect_quantized(raw, config)
    weights = sanitize(raw, config)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return Checkpoint(config, weights, path, _dtype_counts(raw, stored), None, size,
                      json.loads((path / "config.json").read_text()))
