"""Export a GenieBlue model to PyTorch / Hugging Face directories.

    python -m tools.to_torch --checkpoint workdirs/stage2_skip --out /export/mllm
    python -m tools.to_torch --checkpoint /ckpt/mllm --out /export/mllm --merge_lora --dtype bfloat16 --overwrite

--checkpoint is anything `genieblue_jax.load` reads (local or gs://): a training workdir (or one of its
checkpoints/<step>), a genieblue_jax checkpoint, or a Hugging Face model directory. OUT gets
base_llm/ (text requests), multimodal_llm/ (+ lora_adapter/ unless --merge_lora; image
requests), vision_tower/, projector/, genieblue_torch.json and a README.md saying how to
load each part (`genieblue_jax.export.to_torch` documents the layout).

A model that is not multimodal (e.g. a `tools.from_hf` LLM import) exports its component
alone (base_llm/ or vision_tower/) and says so. CogVLM models are refused: transformers /
PEFT have no architecture for their visual experts. An existing, non-empty OUT is refused
unless --overwrite (which replaces only the parts an export writes). OUT may be on gs://: the
export is made in a local temporary directory, then copied.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from genieblue_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    """Flags are defined only when run as a script, so importing this module (the tests call
    `run`) never collides with another tool's flags in the same process."""
    flags.DEFINE_string("checkpoint", None, "Training workdir, genieblue_jax checkpoint or HF model directory.")
    flags.DEFINE_string("out", None, "Export directory to write.")
    flags.DEFINE_bool("merge_lora", False, "Fold the LoRA into multimodal_llm (no PEFT adapter directory).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of every tensor.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out.")
    flags.mark_flags_as_required(["checkpoint", "out"])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run(checkpoint: str, out: str, *, merge_lora: bool = False, dtype: str = "float32",
        overwrite: bool = False):
    """The tool without absl (tests call it): loads, exports, prints, returns the `TorchExport`."""
    import genieblue_jax
    from genieblue_jax import paths
    from genieblue_jax.export.to_torch import export_torch
    src = paths.path(checkpoint)  # local or gs://
    if not src.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    if not src.is_dir():
        raise NotADirectoryError(f"--checkpoint {checkpoint} is a file; give the checkpoint / workdir directory")
    dst = paths.path(out)  # local or gs://
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:  # before the (slow) load
        raise FileExistsError(f"--out {out} already exists and is not empty; pass --overwrite to replace the "
                              "export in it")
    model = genieblue_jax.load(checkpoint)
    result = export_torch(model, out, merge_lora=merge_lora, dtype=dtype, overwrite=overwrite)
    m = result.manifest
    if m["multimodal"]:
        print(f"exported {m['structure']['name']} MLLM from {checkpoint} ({dtype}"
              f"{', LoRA merged' if merge_lora else ''}) to {result.out_dir}")
    else:
        print(f"NOTE: {checkpoint} is not a multimodal model (components {sorted(model.configs)}); exported only "
              f"{[p for p, d in m['parts'].items() if d]} to {result.out_dir}")
    sizes = result.sizes()
    for part in (*m["parts"], "metadata"):
        if part in sizes:
            d = os.path.join(result.out_dir, part) if part != "metadata" else result.out_dir
            print(f"  {part + '/' if part != 'metadata' else 'genieblue_torch.json, README.md':<32} "
                  f"{_human(sizes[part]):>10}  {d}")
    if m["tokenizer"]:
        print(f"  tokenizer: {m['tokenizer']}")
    else:
        print("  tokenizer: none (the model carries no tokenizer file)")
    print(f"  total {_human(sum(sizes.values()))}; see {os.path.join(result.out_dir, 'README.md')}")
    return result


def main(argv):
    """`run` with the flags; bad input exits with `tools.to_torch: error: ...` (no traceback)."""
    cli.start(argv)
    from genieblue_jax.export.to_torch import UnsupportedVariantError
    try:
        run(FLAGS.checkpoint, FLAGS.out, merge_lora=FLAGS.merge_lora, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, UnsupportedVariantError) as e:
        sys.exit(f"tools.to_torch: error: {e}")  # bad input: the message names it; no traceback


if __name__ == "__main__":
    define_flags()
    app.run(main)
