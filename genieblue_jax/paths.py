"""The one path layer: every file the framework reads or writes is named through `path()`
(etils.epath), so a workdir, a checkpoint, a dataset or an export can live on local disk or
on Cloud Storage (`gs://`, through gcsfs) alike; Orbax and Grain take the same paths.

A scheme nothing here serves is an error naming the path, never a local directory with a
colon in its name (`gs:/bucket/run` with one slash, or `foo://x`, would otherwise become
`./gs:/bucket/run` on the VM's disk, lost with the VM).

    >>> str(path("gs://bucket/run") / "checkpoints")
    'gs://bucket/run/checkpoints'
    >>> path("runs/a").is_absolute()      # local paths are made absolute
    True
    >>> path("gs:/bucket/run")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: gs:/bucket/run: not a path genieblue_jax can use (a URL needs scheme://; supported: gs://, s3://, ...)
"""
from __future__ import annotations

import os
import re

from etils import epath

# Schemes etils.epath serves (gcsfs / s3fs). Everything else with a colon is refused.
REMOTE_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a gs:// / s3:// URL as it is, a local path made absolute.

    Raises ValueError naming `p` for a scheme other than REMOTE_SCHEMES, or a scheme
    without `//`."""
    s = os.fspath(p)
    m = _URL.match(s)
    if m and not (len(m.group(1)) == 1 and os.name == "nt"):  # "C:\..." is a Windows drive, not a scheme
        if m.group(1) not in REMOTE_SCHEMES or not m.group(2):
            raise ValueError(f"{s}: not a path genieblue_jax can use (a URL needs scheme://; supported: "
                             f"{', '.join(f'{x}://' for x in REMOTE_SCHEMES)}, or a local path)")
        return epath.Path(s)
    return epath.Path(os.path.abspath(s))


def is_remote(p: str | os.PathLike) -> bool:
    """True for gs:// / s3:// paths (not on this machine's disk)."""
    return bool(_URL.match(os.fspath(p))) and os.fspath(p).split(":", 1)[0] in REMOTE_SCHEMES


def join(p: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a URL's scheme: the string form of `path(p) / parts...`."""
    return os.fspath(path(p).joinpath(*parts))


def local_dir(p: str | os.PathLike) -> str:
    """`p` as an absolute local path, for outputs that must be written on this machine's disk
    (exports staged and renamed into place, ONNX / AIMET files). Raises ValueError naming `p`
    for a gs:// / s3:// path (write locally, then copy: `gcloud storage cp -r DIR URL`) and,
    through `path()`, for any other scheme.

        >>> local_dir("gs://bucket/export")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: gs://bucket/export: written on local disk only; write to a local directory, then copy it ...
    """
    if is_remote(p):
        raise ValueError(f"{os.fspath(p)}: written on local disk only; write to a local directory, then copy it "
                         f"(gcloud storage cp -r DIR {os.fspath(p)})")
    return os.fspath(path(p))

