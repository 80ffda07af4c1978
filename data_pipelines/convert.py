"""`python -m data_pipelines.convert`: LLaVA-format JSON or chat JSONL -> an ArrayRecord
dataset of `Example`s, with a rejects log and a printed report. The conversion itself (formats,
checks, rejection reasons) is `data_pipelines.conversion`.

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_shards=64
    python -m data_pipelines.convert --format=jsonl --jsonl chats.jsonl --out /data/text
"""
import sys

from absl import app, flags

from data_pipelines.conversion import ConversionError, convert_jsonl, convert_llava
from data_pipelines.images import DEFAULT_MAX_PIXELS

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program: importing this module (e.g.
    `read_llava` from tools.evaluate, which has an --image_root of its own) defines none."""
    flags.DEFINE_enum("format", None, ["llava", "jsonl"], "Input format.")
    flags.DEFINE_string("json", None, "--format=llava: the LLaVA JSON file (a list of records).")
    flags.DEFINE_string("image_root", None, "--format=llava: directory the records' image paths are relative to.")
    flags.DEFINE_string("jsonl", None, "--format=jsonl: the chat JSONL file.")
    flags.DEFINE_string("out", None, "Dataset directory to write (shards, manifest.json, rejects.jsonl).")
    flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord shards.")
    flags.DEFINE_float("max_reject_fraction", 0.1, "Fail if more than this fraction of records is rejected.")
    flags.DEFINE_string("source", None, "Mixture source name of the records (default: llava / text).")
    flags.DEFINE_integer("num_workers", 8, "--format=llava: threads reading and checking images.")
    flags.DEFINE_bool("allow_outside_image_root", False, "--format=llava: accept image paths that lead outside "
                      "--image_root (absolute, ../, symlinks out); refused by default (reason outside_image_root).")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_PIXELS, "--format=llava: refuse images whose header "
                         "declares more pixels (decompression bombs; reason image_too_large).")


def main(argv):
    """The command (absl flags above); exits non-zero with the error and the report on failure."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.format is None or FLAGS.out is None:
        raise app.UsageError("--format and --out are required")
    try:
        if FLAGS.format == "llava":
            if not FLAGS.json or not FLAGS.image_root:
                raise app.UsageError("--format=llava needs --json and --image_root")
            report = convert_llava(FLAGS.json, FLAGS.image_root, FLAGS.out, num_shards=FLAGS.num_shards,
                                   max_reject_fraction=FLAGS.max_reject_fraction,
                                   source=FLAGS.source or "llava", num_workers=FLAGS.num_workers,
                                   allow_outside_image_root=FLAGS.allow_outside_image_root,
                                   max_image_pixels=FLAGS.max_image_pixels)
        else:
            if not FLAGS.jsonl:
                raise app.UsageError("--format=jsonl needs --jsonl")
            report = convert_jsonl(FLAGS.jsonl, FLAGS.out, num_shards=FLAGS.num_shards,
                                   max_reject_fraction=FLAGS.max_reject_fraction,
                                   source=FLAGS.source or "text")
    except ConversionError as e:
        if e.report is not None:
            print(e.report.summary())
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(report.summary())


if __name__ == "__main__":
    define_flags()
    app.run(main)
