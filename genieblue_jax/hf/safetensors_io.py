"""Lazy reading of `*.safetensors` checkpoints (single file or sharded with an index).

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then raw little-endian data.
We memory-map the files, so a tensor is only read when asked for (one at a time), and
bfloat16 works through `ml_dtypes` without torch. Pickle (`*.bin`) is never loaded.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(path: str) -> dict:
    """The JSON header of safetensors file `path`: {"header_size": bytes, "tensors": {name:
    {"dtype", "shape", "data_offsets"}}, "metadata": dict}. ValueError naming the file when it is
    too short, the header is not JSON, or an entry is malformed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    data_size = os.path.getsize(path) - 8 - n
    for name, meta in header.items():  # a truncated file: name the first tensor it cut
        try:
            begin, end = meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has no valid data_offsets in the header") from None
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data but the file holds "
                             f"{data_size} (truncated or damaged file)")
    return {"header_size": n, "tensors": header}


class SafetensorsCheckpoint:
    """All tensors of an HF model directory, by name, read lazily.

        ckpt = SafetensorsCheckpoint("/path/to/hf_dir")
        ckpt.names()                       # every tensor name
        ckpt.shape("model.norm.weight")    # without reading data
        ckpt.get("model.norm.weight")      # np.ndarray (a read-only memmap view)
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                pickles = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (f" (found pickle files {pickles}: they are not loaded for safety; convert "
                        "them with `model.save_pretrained(dir, safe_serialization=True)`)") if pickles else ""
                raise FileNotFoundError(f"{hf_dir}: no *.safetensors files and no {INDEX_FILE}{hint}")
            weight_map = None
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index} lists shard {fname!r}, which does not exist")
            h = read_header(path)
            for name, meta in h["tensors"].items():
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in both {self._entries[name][0]} and {path}")
                self._entries[name] = (path, meta, 8 + h["header_size"])
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items()
                             if n not in self._entries or os.path.basename(self._entries[n][0]) != f)
            if missing:
                raise ValueError(f"{index} maps tensors not found in the named shard: {missing[:10]}")
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._entries)

    def stamp(self) -> tuple[tuple[str, int, int], ...]:
        """(path, size in bytes, mtime in ns) of every shard: identifies this version of the
        files, for caching what was computed from their data."""
        files = sorted({e[0] for e in self._entries.values()})
        return tuple((f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _meta(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in {self.hf_dir}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (no data read); KeyError naming it if absent."""
        return tuple(self._meta(name)[1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        """The tensor's numpy dtype (bfloat16 through ml_dtypes); ValueError for an unsupported one."""
        meta = self._meta(name)[1]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {meta['dtype']}")
        return np.dtype(_DTYPES[meta["dtype"]])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the memory-mapped file (nothing copied until used)."""
        path, meta, data_start = self._meta(name)
        dtype = self.dtype(name)
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} in {path}: {end - begin} bytes for shape {shape} {dtype}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self._maps[path][data_start + begin:data_start + end]
        return buf.view(dtype).reshape(shape)
