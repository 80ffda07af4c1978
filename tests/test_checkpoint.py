"""Model checkpoints (genieblue_jax.checkpoint) record their files' checksums and a restore
refuses a damaged file by name, instead of loading a changed weight."""
import json
import os
import re
import subprocess

import jax
import numpy as np
import pytest

from genieblue_jax import checkpoint, checksums, models
from genieblue_jax.models.configs import get_preset


def _sha256sum(path):
    """coreutils' SHA-256: the outside reference for the recorded checksums."""
    return subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0]


def _params_files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(os.path.join(path, "params"))
                  for f in fs)


def test_a_damaged_parameter_file_is_refused_by_name(tmp_path):
    cfg = get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(0))
    path = checkpoint.save(str(tmp_path / "ckpt"), {"llm": cfg}, {"llm": params})
    recorded = json.loads((tmp_path / "ckpt" / checkpoint.META_FILE).read_text())["checksums"]
    files = _params_files(path)
    assert sorted(recorded) == files  # every file but genieblue.json itself
    assert all(recorded[f] == {"size": os.path.getsize(os.path.join(path, f)),
                               "sha256": _sha256sum(os.path.join(path, f))} for f in files)
    _, restored, _ = checkpoint.restore(path)  # intact: the saved values
    for name, leaf in models.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(models.flatten(restored["llm"])[name]), np.asarray(leaf))

    data = max(files, key=lambda f: os.path.getsize(os.path.join(path, f)))
    with open(os.path.join(path, data), "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(checksums.CorruptCheckpointError,
                       match=re.escape(f"{path}: damaged checkpoint: {data}: content differs from what was written")):
        checkpoint.restore(path)
    size = os.path.getsize(os.path.join(path, data))
    os.truncate(os.path.join(path, data), size - 3)
    with pytest.raises(checksums.CorruptCheckpointError, match=re.escape(f"{data}: {size - 3} bytes, {size} were")):
        checkpoint.restore(path)


def test_a_checkpoint_without_checksums_is_read_unverified(tmp_path):
    """Checkpoints written before checksums were recorded still load."""
    cfg = get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(1))
    path = checkpoint.save(str(tmp_path / "ckpt"), {"llm": cfg}, {"llm": params})
    meta_path = tmp_path / "ckpt" / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    _, restored, _ = checkpoint.restore(path)
    np.testing.assert_array_equal(np.asarray(restored["llm"]["embed_tokens"]["embedding"]),
                                  np.asarray(params["embed_tokens"]["embedding"]))
