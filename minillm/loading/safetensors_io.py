"""Reading safetensors checkpoints (single file or sharded) into memory-mapped NumPy arrays.

The format (https://github.com/huggingface/safetensors):

    [ 8 bytes: N, little-endian u64 ][ N bytes: JSON header ][ data buffer ............ ]
    header = {"name": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
              "__metadata__": {...}}      offsets are relative to the start of the data buffer

We read the header ourselves and np.memmap the buffer so that F32/F16/int tensors cost no copy. The
safetensors library's NumPy loader would do the same but cannot return bfloat16 (NumPy has no such
dtype); BF16 is widened here to float32 by placing its 16 bits in the top half of a float32 word.
Writing goes through the library (safetensors.numpy.save_file).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import MinillmError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8,  # raw bytes; quant/fp8 decodes them
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top 16 bits of a float32: shift them back into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path, stored: dict | None = None) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file; BF16 comes back as float32, the rest in their own dtype.

    If `stored` is given, it receives each tensor's dtype as the file stores it ("BF16", "F16", ...).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MinillmError(f"{path} is truncated: it is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise MinillmError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MinillmError(f"{path} has a corrupted safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else None
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MinillmError(f"{path}: tensor {name!r} has a malformed header entry ({exc})") from exc
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end > data_len or end - begin != expected or begin < 0:
            raise MinillmError(
                f"{path} is truncated or corrupted: tensor {name!r} needs bytes {begin}..{end} "
                f"({expected} for shape {shape}) but the data holds {data_len}"
            )
        arr = buf[begin:end].view(dtype).reshape(shape) if expected else np.zeros(shape, dtype)
        out[name] = bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
        if stored is not None:
            stored[name] = info["dtype"]
    return out


def read_checkpoint(directory: Path, stored: dict | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: model.safetensors, or the shards its index names."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MinillmError(f"{index} is malformed: {exc}") from exc
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise MinillmError(f"{directory} holds no .safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        shard = directory / name
        if not shard.exists():
            raise MinillmError(f"{directory}: the index names shard {name}, which is missing")
        tensors.update(read_safetensors(shard, stored))
    return tensors
