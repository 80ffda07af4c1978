"""Import a Hugging Face model directory into a genieblue_jax checkpoint.

    python -m tools.from_hf --hf_dir /models/Qwen2.5-3B --out /ckpt/qwen2.5-3b
    python -m tools.from_hf --hf_dir /models/siglip-so400m-patch14-384 --out /ckpt/siglip \\
        --select_layer=-1

Reads config.json and *.safetensors (single file or sharded with an index) of
Qwen2ForCausalLM, LlamaForCausalLM (Llama 3.x's llama3 RoPE), Qwen3ForCausalLM,
Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its language model), SmolLM3ForCausalLM,
SiglipVisionModel or SiglipModel (vision tower only; SigLIP 2 at fixed resolution). Never
loads pickle (*.bin) files. Errors name the missing tensor / bad shape / unsupported config
field. With --mesh, every tensor is placed straight into its shard. What a partial import
leaves out (a VLM's vision tower, a SiglipModel's text tower) is said on its line.

The tokenizer travels with the weights (the checkpoint's hf_assets/): tokenizer.json /
tokenizer.model, tokenizer_config.json, the chat template (its `chat_template`,
chat_template.jinja or chat_template.json) and generation_config.json. An LLM's line says which
chat template its prompts will be rendered with and where generation will stop.
"""
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json + *.safetensors).")
    flags.DEFINE_string("out", None, "Checkpoint directory to write.")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Dtype the parameters are stored in.")
    flags.DEFINE_integer("select_layer", -1, "SigLIP only: which hidden state feeds the projector "
                         "(HF hidden_states indexing; -1 = last_hidden_state).")
    flags.DEFINE_multi_string("ignore_config_field", [], "Waive an HF config field we do not know "
                              "(only if it does not change the computation).")
    flags.DEFINE_string("mesh", None, "Optional mesh, e.g. 'fsdp=-1' or 'data=1,fsdp=4,tensor=2'.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --out.")
    flags.mark_flags_as_required(["hf_dir", "out"])


def parse_mesh(spec: str | None):
    """--mesh 'axis=size,...' -> a mesh (None without one). Raises app.UsageError for another format."""
    if not spec:
        return None
    from genieblue_jax.sharding import make_mesh
    try:
        axes = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
    except ValueError:
        raise app.UsageError(f"--mesh={spec!r}: expected 'axis=size,...', e.g. 'fsdp=-1'") from None
    return make_mesh(axes)


def main(argv):
    """Imports --hf_dir into a checkpoint at --out and prints what it wrote (for an LLM, also the chat
    template and stop tokens it will use)."""
    from genieblue_jax import cli
    cli.start(argv)  # (Orbax's INFO lines per array written would bury the two lines below)
    from genieblue_jax import models
    from genieblue_jax.hf import import_hf
    try:
        name, cfg, params = import_hf(FLAGS.hf_dir, FLAGS.out, param_dtype=FLAGS.param_dtype,
                                      ignore_fields=FLAGS.ignore_config_field,
                                      select_layer=FLAGS.select_layer, mesh=parse_mesh(FLAGS.mesh),
                                      overwrite=FLAGS.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # the input's fault: one line, no traceback
        sys.exit(f"tools.from_hf: error: {e}")
    logging.info("imported %s", cfg)
    from genieblue_jax.hf import PARTIAL_IMPORTS, architecture_of, read_hf_config
    arch = architecture_of(read_hf_config(FLAGS.hf_dir), FLAGS.hf_dir)
    partial = f"; from the {arch}, {PARTIAL_IMPORTS[arch]}" if arch in PARTIAL_IMPORTS else ""
    print(f"wrote {FLAGS.out}: component {name!r}, {models.count_params(params):,} parameters "
          f"({FLAGS.param_dtype}){partial}")
    if name == "llm":
        print(chat_summary(FLAGS.out))


def chat_summary(checkpoint_dir: str) -> str:
    """One line: the chat template an imported LLM renders prompts with, and its stop tokens
    (read from its hf_assets/, as `genieblue_jax.load` reads them; the weights are not loaded)."""
    from data_pipelines.chat import chat_renderer, stop_token_ids
    from data_pipelines.tokenizer import load_tokenizer
    from genieblue_jax import checkpoint
    assets = checkpoint.assets_dir(checkpoint_dir)
    try:
        tok = load_tokenizer(assets) if assets else None
    except FileNotFoundError:
        tok = None
    if tok is None:
        return ("warning: no tokenizer in the HF directory (tokenizer.json / tokenizer.model): tools.chat and "
                "tools.serve cannot read text with this checkpoint; copy the model's tokenizer files into the HF "
                "directory and import again, or train with --config.data.tokenizer=DIR")
    try:
        renderer = chat_renderer(tok, image_token=None)
    except KeyError:
        return (f"no chat template and no ChatML tokens: plain-text prompts only; generation stops at "
                f"{[tok.piece(i) for i in stop_token_ids(tok)]}")
    except ValueError as e:
        return f"chat: {e}"
    what = f"its own chat template ({renderer.source})" if renderer.kind == "template" else \
        "ChatML (its tokenizer has no chat template)"
    return f"chat prompts: {what}; generation stops at {[tok.piece(i) for i in renderer.stop_token_ids]}"


if __name__ == "__main__":
    define_flags()
    app.run(main)
