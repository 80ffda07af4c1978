"""Export a GenieBlue model to ONNX + AIMET encodings for Qualcomm QNN (phones).

    python -m tools.export_qnn --checkpoint workdirs/stage2_skip --out /export/qnn
    python -m tools.export_qnn --checkpoint /ckpt/mllm --out /export/qnn --data /data/vqa --data /data/text \\
        --context 2048 --prefill_len 128 --calib 32

--checkpoint is a training workdir (its latest checkpoint, or --step), a
`WORKDIR/checkpoints/<step>` folder, or a whole-MLLM checkpoint (`save_mllm`). OUT gets
onnx/ (five float32 graphs: vision tower + projector, base LLM prefill / decode,
multimodal LLM prefill / decode, sharing three weight files), qnn/ (per graph NAME.onnx +
NAME.encodings for `qnn-onnx-converter --quantization_overrides`: LLM weights int4, ViT /
projector / LoRA int8, activations int16) and report.md / report.json (sizes, ONNX vs JAX
parity, quantized vs float error). Calibration uses the workdir's own training data, or
--data dataset directories (with --tokenizer when the checkpoint has none).

The encodings need aimet-onnx, an optional extra with its own install step (see
genieblue_jax/export/qnn/quantize.py). Without it the tool stops at once, before loading the
checkpoint or writing anything, with a non-zero exit and the install command;
--quantize=no asks explicitly for the float graphs and report only (no encodings).
"""
import sys

from absl import app, flags

from genieblue_jax import cli

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("checkpoint", None, "Training workdir, WORKDIR/checkpoints/<step>, or an MLLM checkpoint.")
    flags.DEFINE_string("out", None, "Output directory (onnx/, qnn/, report.md, report.json), local or gs:// "
                        "(made locally, then copied).")
    flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: the latest).")
    flags.DEFINE_integer("context", 2048, "KV-cache context C (slots) of the decoder graphs.")
    flags.DEFINE_integer("prefill_len", 128, "Tokens per prefill-graph call (AR); decode graphs take 1.")
    flags.DEFINE_integer("vision_batch", 1, "Tiles per vision-graph call.")
    flags.DEFINE_integer("calib", 16, "Calibration requests of each kind (with images / text-only); 0: none "
                         "(no parity check, no encodings).")
    flags.DEFINE_integer("decode_steps", 8, "Tokens at the end of each calibration request run through the decode "
                         "graph.")
    flags.DEFINE_multi_string("data", [], "Dataset directory for calibration (repeat for several); default: the "
                              "workdir's training data.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer for --data (default: the checkpoint's own).")
    flags.DEFINE_enum("quantize", "yes", ["yes", "no"], "AIMET encodings: yes (needs aimet-onnx; without it the "
                      "tool exits with an error before any work), or no (float ONNX graphs and report only).")
    flags.DEFINE_enum("embedding_bits", "4", ["4", "8", "16"], "Bits of the token-embedding table (one scale for "
                      "the table: QNN reads it through a Gather).")
    flags.DEFINE_bool("parity", True, "Compare the float ONNX graphs with the JAX model on the calibration requests.")
    flags.DEFINE_bool("overwrite", False, "Replace the contents of an existing --out.")
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    """Loads --checkpoint and writes the ONNX graphs, encodings and report to --out; bad input (or a
    missing quantizer with --quantize=yes) exits with `export_qnn: ...`."""
    cli.start(argv)
    from genieblue_jax import paths
    if not paths.path(FLAGS.checkpoint).exists():  # first: the quantizer's import alone takes ~20 s
        sys.exit(f"export_qnn: {FLAGS.checkpoint}: no such directory")
    from genieblue_jax.export.qnn import quantize
    if FLAGS.quantize == "yes":   # before the checkpoint is loaded: a missing quantizer is no reason to wait
        try:
            quantize.require_aimet()
        except ImportError as e:
            sys.exit(f"export_qnn: {e}\nor pass --quantize=no to write the float ONNX graphs and report only "
                     "(no encodings)")
    import genieblue_jax
    from genieblue_jax.export.qnn import export_qnn
    try:
        model = genieblue_jax.load(FLAGS.checkpoint, step=FLAGS.step)
        report = export_qnn(model, FLAGS.out, context=FLAGS.context, prefill_len=FLAGS.prefill_len,
                            vision_batch=FLAGS.vision_batch, calib=FLAGS.calib, decode_steps=FLAGS.decode_steps,
                            data=FLAGS.data, tokenizer=FLAGS.tokenizer, quantize=FLAGS.quantize,
                            embedding=f"int{FLAGS.embedding_bits}", parity=FLAGS.parity, overwrite=FLAGS.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        sys.exit(f"export_qnn: {e}")
    deploy = report["sizes"]["deployments"]
    for label, v in deploy.items():
        print(f"{label}: {v['quantized_bytes'] / 1e6:,.2f} MB quantized, {v['float_bytes'] / 1e6:,.2f} MB float32")
    print(f"quantization: {report['quantization']['status'].splitlines()[0]}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
