"""Talk to a model: one question, or an interactive conversation.

    python -m tools.chat --checkpoint workdirs/stage2_skip --prompt "What is 12 plus 7?"
    python -m tools.chat --checkpoint workdirs/stage2_skip --image scene.png --prompt "How many circles?"
    python -m tools.chat --checkpoint workdirs/stage2_skip                   # interactive

`--checkpoint` is anything `genieblue_jax.load` takes (a training workdir, a checkpoint,
an HF directory). Prompts are rendered by the model's own chat template (ChatML for a tokenizer
without one) and answers end at its end tokens, as `GenieBlue.generate` does. Routing is
GenieBlue's non-shared base: a conversation without images runs the untouched base LLM; once an
image is in it, the multimodal path runs (`--mode` forces one of text / multimodal / shared).
The line printed after each answer says which path ran and how fast.

Interactive commands: `/image PATH` attaches an image to your next message, `/mode
auto|text|multimodal|shared`, `/reset` starts a new conversation, `/quit` (or Ctrl-D) ends.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from genieblue_jax import cli

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("checkpoint", None, "Training workdir, genieblue_jax checkpoint or HF model directory.")
    flags.DEFINE_multi_string("image", [], "Image file(s) for the prompt (repeat the flag for several).")
    flags.DEFINE_string("prompt", None, "The question; without it, an interactive conversation starts.")
    flags.DEFINE_enum("mode", "auto", ["auto", "text", "multimodal", "shared"],
                      "auto: the base LLM for text, the multimodal path with images (non-shared base).")
    flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per answer.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("system", None, "Optional system message (without one, the model's chat template may add "
                        "its default system turn, as Qwen2.5-Instruct's and Llama 3.2's do).")
    flags.DEFINE_string("chat_template_kwargs", None, "The chat template's options as a JSON object, e.g. "
                        "'{\"enable_thinking\": false}' (Qwen3, SmolLM3); default: the model's trained ones.")
    flags.DEFINE_integer("step", None, "For a workdir: the checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["checkpoint"])


class Conversation:
    """Chat turns and their images, answered by `model.generate` (the routing is its own)."""

    def __init__(self, model, mode: str | None, system: str | None = None, **gen_kwargs):
        self.model, self.mode, self.gen_kwargs = model, mode, gen_kwargs
        self.system = system
        self.reset()

    def reset(self):
        """Starts a new conversation: no turns but the system message, no images."""
        self.turns = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []

    def ask(self, text: str, images=()) -> tuple[str, str, float, int]:
        """(answer, mode that ran, seconds, new tokens)."""
        from data_pipelines.records import IMAGE_TAG
        images = list(images)
        content = (f"{IMAGE_TAG}\n" * len(images) + text) if images and IMAGE_TAG not in text else text
        turns = self.turns + [{"role": "user", "content": content}]
        all_images = self.images + images
        mode = self.mode or ("multimodal" if all_images else "text")
        t0 = time.perf_counter()
        answer, results = self.model.generate(turns, images=all_images or None, mode=mode, return_tokens=True,
                                              **self.gen_kwargs)
        seconds = time.perf_counter() - t0
        self.turns, self.images = turns + [{"role": "assistant", "content": answer}], all_images
        return answer, mode, seconds, int(results[0].lengths[0])


def _status(mode: str, seconds: float, tokens: int) -> str:
    path = {"text": "base LLM (non-shared)", "multimodal": "multimodal path (replicated blocks + LoRA)",
            "shared": "multimodal weights on text (shared)"}[mode]
    return f"[{path}; {tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s]"


def interactive(conv: Conversation, read=input, write=print) -> None:
    """The interactive loop over `read` / `write` (input / print): messages, /image, /mode, /reset,
    /quit; errors are printed and the conversation goes on."""
    pending: list[str] = []
    write("Type a message. /image PATH attaches an image, /mode auto|text|multimodal|shared, /reset, /quit.")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            conv.reset()
            pending = []
            write("(new conversation)")
            continue
        if line.startswith("/image "):
            path = line[len("/image "):].strip()
            try:
                conv.model.requests.tiles([path], where=path)  # fail now, not at the next message
            except (OSError, ValueError) as e:
                write(f"error: {e}")
                continue
            pending.append(path)
            write(f"(image {path} attached to your next message)")
            continue
        if line.startswith("/mode"):
            choice = line[len("/mode"):].strip()
            if choice not in ("auto", "text", "multimodal", "shared"):
                write("usage: /mode auto|text|multimodal|shared")
                continue
            conv.mode = None if choice == "auto" else choice
            write(f"(mode {choice})")
            continue
        try:
            answer, mode, seconds, tokens = conv.ask(line, pending)
        except ValueError as e:
            write(f"error: {e}")
            continue
        pending = []
        write(f"model> {answer}")
        write(_status(mode, seconds, tokens))


def main(argv):
    """Loads --checkpoint and answers --prompt once, or starts the interactive conversation."""
    cli.start(argv)
    import genieblue_jax
    try:
        model = genieblue_jax.load(FLAGS.checkpoint, step=FLAGS.step)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: cannot load --checkpoint={FLAGS.checkpoint}: {e}")
    try:
        options = json.loads(FLAGS.chat_template_kwargs) if FLAGS.chat_template_kwargs else None
    except ValueError as e:
        sys.exit(f"error: --chat_template_kwargs={FLAGS.chat_template_kwargs!r} is not JSON: {e}")
    conv = Conversation(model, None if FLAGS.mode == "auto" else FLAGS.mode, FLAGS.system,
                        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                        seed=FLAGS.seed, chat_template_kwargs=options)
    if FLAGS.prompt is None:
        print(f"loaded {model}")
        interactive(conv)
        return
    try:
        answer, mode, seconds, tokens = conv.ask(FLAGS.prompt, FLAGS.image)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(answer)
    print(_status(mode, seconds, tokens), file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
