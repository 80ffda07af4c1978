"""Reading the small JSON files that mark our directories (checkpoint metadata, workdir
config, export manifests), with errors that name the file; local or gs:// (genieblue_jax.paths)."""
from __future__ import annotations

import json

from genieblue_jax import paths


def read_json(directory: str, name: str, what: str) -> dict:
    """`directory/name` as a dict. A missing file is a FileNotFoundError saying what the
    directory is not (`what`); invalid JSON or a non-object a ValueError naming the file.

        >>> read_json("/nonexistent", "genieblue.json", "not a genieblue_jax checkpoint")
        Traceback (most recent call last):
        FileNotFoundError: /nonexistent: no genieblue.json (not a genieblue_jax checkpoint)
    """
    path = paths.path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {name} ({what})")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content
