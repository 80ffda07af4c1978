"""Trainable / deployed parameters and phone storage of every variant (paper Tables 4-5).

    python -m tools.param_report --llm=qwen2.5-3b --vit=siglip-so400m-384

Counts come from abstract shapes (nothing is allocated). "#Param (paper)" follows the
paper's convention (stage-2 trainable parts, vision tower counted whole including its
unused pooling head); "stage 2 (ours)" is what our trainer actually updates.
"""


from absl import app, flags

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("llm", "qwen2.5-3b", "LLM preset.")
    flags.DEFINE_string("vit", "siglip-so400m-384", "Vision tower preset.")


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def render(llm: str, vit: str) -> str:
    """The report of the `llm` + `vit` presets: every variant's parameter counts (paper Tables 4-5)
    and the deploy storage, as text."""
    from genieblue_jax.structure.report import LLM_BITS, OTHER_BITS, paper_table, storage_summary
    rows = paper_table(llm, vit)
    header = ("variant", "stage 1 trainable", "#Param (paper)", "stage 2 trainable (ours)",
              "deploy: text path", "deploy: all weights", f"storage W{LLM_BITS}/W{OTHER_BITS}")
    body = [(r.name, _m(r.stage1_trainable), _m(r.paper_param), _m(r.stage2_trainable),
             _m(r.deploy_text), _m(r.deploy_multimodal), _gb(r.deploy_storage_bytes)) for r in rows]
    widths = [max(len(str(x[i])) for x in (header, *body)) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [f"Parameters: {llm} + {vit} (stage 1 trains the projector; stage 2 the ViT, projector "
           "and branch; full fine-tune the ViT, projector and LLM)", "",
           line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    s = storage_summary(llm, vit)
    out += ["", f"Deploy storage (LLM and its blocks {LLM_BITS}-bit; ViT, projector, LoRA "
            f"{OTHER_BITS}-bit; pooling head not deployed):",
            f"  LLM only (text):                    {_gb(s['llm_only'])}",
            f"  base MLLM (ViT + projector + LLM):  {_gb(s['base_mllm'])}",
            f"  GenieBlue-Skip (+ copies + LoRA):   {_gb(s['genieblue'])} "
            f"(+{_gb(s['genieblue'] - s['base_mllm'])})"]
    return "\n".join(out)


def main(argv):
    """Prints `render` of --llm / --vit."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    print(render(FLAGS.llm, FLAGS.vit))


if __name__ == "__main__":
    define_flags()
    app.run(main)
