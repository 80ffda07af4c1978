"""Lazy reading of `*.safetensors` checkpoints (single file or sharded with an index), through
the `safetensors` library (`safe_open(..., "numpy")`: memory-mapped, bfloat16 as
`ml_dtypes.bfloat16`, no torch). A tensor, or one slice of it, is read only when asked for.
Pickle (`*.bin`) is never loaded.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def open_safetensors(path: str):
    """`safe_open(path, "numpy")`; ValueError naming the file when it is not a readable
    safetensors file (too short, a header that is not JSON, data cut short)."""
    try:
        return safe_open(path, "numpy")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged ({e})") from None


class SafetensorsCheckpoint:
    """All tensors of an HF model directory, by name, read lazily.

        ckpt = SafetensorsCheckpoint("/path/to/hf_dir")
        ckpt.names()                       # every tensor name
        ckpt.shape("model.norm.weight")    # without reading data
        ckpt.get("model.norm.weight")      # np.ndarray
        ckpt.slice("lm_head.weight")[:8]   # the first 8 rows only

    FileNotFoundError for a directory without safetensors files (naming any pickle files found)
    or an index naming a missing shard; ValueError for a damaged file, a tensor in two files, or
    an index that does not match the files.
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
        self._files: dict[str, object] = {}  # path -> safe_open handle
        self._entries: dict[str, str] = {}   # tensor name -> path
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index} lists shard {fname!r}, which does not exist")
            self._files[path] = open_safetensors(path)
            for name in self._files[path].keys():
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in both {self._entries[name]} and {path}")
                self._entries[name] = path
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items()
                             if n not in self._entries or os.path.basename(self._entries[n]) != f)
            if missing:
                raise ValueError(f"{index} maps tensors not found in the named shard: {missing[:10]}")

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._entries)

    def stamp(self) -> tuple[tuple[str, int, int], ...]:
        """(path, size in bytes, mtime in ns) of every shard: identifies this version of the
        files, for caching what was computed from their data."""
        return tuple((f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in sorted(self._files))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _file(self, name: str):
        """The open file holding tensor `name`; KeyError naming the tensor if absent."""
        try:
            return self._files[self._entries[name]]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in {self.hf_dir}") from None

    def slice(self, name: str):
        """The tensor as a lazy `safetensors` slice: `.get_shape()`, `.get_dtype()` (the file's
        tag, e.g. "BF16") and `[index]` (basic slices) reading only those bytes. KeyError naming
        the tensor if absent."""
        return self._file(name).get_slice(name)

    def dtype(self, name: str) -> str:
        """The tensor's dtype tag in the file ("F32", "BF16", "F8_E4M3", ...), from the header."""
        return self.slice(name).get_dtype()

    def file(self, name: str) -> str:
        """The path of the file holding tensor `name`; KeyError naming it if absent."""
        self._file(name)
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (no data read); KeyError naming it if absent."""
        return tuple(self.slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The whole tensor (bfloat16 as `ml_dtypes.bfloat16`); KeyError naming it if absent."""
        return self._file(name).get_tensor(name)
