"""`python -m data_pipelines.convert`: LLaVA-format JSON, chat JSONL, a Hugging Face dataset or
WebDataset tar shards -> an ArrayRecord dataset of `Example`s, with a rejects log and a
printed report. The conversion itself is `data_pipelines.conversion`: one module per format
(llava, chat_jsonl, hf, webdataset) over its checks (rejection reasons) and its driver.

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_processes=16
    python -m data_pipelines.convert --format=jsonl --jsonl chats.jsonl --out /data/text
    python -m data_pipelines.convert --format=hf --hf_dataset /data/the_cauldron_ai2d --split=train --out /data/ai2d
    python -m data_pipelines.convert --format=webdataset --wds "/data/shards/train-{000000..000099}.tar" \\
        --out /data/wds

The input is streamed (never held whole); `--num_processes` worker processes convert it in
parallel, each committing a chunk of `--chunk_size` of its records at a time, so a killed
conversion rerun with the same flags resumes where it stopped (a different input or flags
into a directory holding an unfinished conversion is an error naming the directory).
`--num_shards` is the number of shard files per committed chunk; the dataset lists every
chunk's shards in its manifest.json.
"""
import sys

from absl import app, flags

from data_pipelines.conversion import (
    CHUNK_SIZE,
    ConversionError,
    convert_hf,
    convert_jsonl,
    convert_llava,
    convert_webdataset,
)
from data_pipelines.images import DEFAULT_MAX_PIXELS

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program: importing this module (e.g.
    `read_llava` from tools.evaluate, which has an --image_root of its own) defines none."""
    flags.DEFINE_enum("format", None, ["llava", "jsonl", "hf", "webdataset"], "Input format.")
    flags.DEFINE_string("json", None, "--format=llava: the LLaVA JSON file (a list of records).")
    flags.DEFINE_string("image_root", None, "--format=llava|hf: directory the records' image paths are relative to "
                        "(hf: needed only for images stored as paths).")
    flags.DEFINE_string("jsonl", None, "--format=jsonl: the chat JSONL file.")
    flags.DEFINE_string("hf_dataset", None, "--format=hf: a Hugging Face dataset saved with save_to_disk (Dataset "
                        "or DatasetDict), a directory of parquet files, or one parquet file; read locally, nothing "
                        "downloaded.")
    flags.DEFINE_string("split", None, "--format=hf: the split to convert when the dataset holds several.")
    flags.DEFINE_list("wds", None, "--format=webdataset: tar shards: paths, a directory (its *.tar), or brace "
                      "notation such as /data/train-{000000..000099}.tar.")
    flags.DEFINE_string("out", None, "Dataset directory to write (shards, manifest.json, rejects.jsonl).")
    flags.DEFINE_integer("num_shards", 1, "ArrayRecord shard files per committed chunk (records dealt "
                         "round-robin over them).")
    flags.DEFINE_integer("num_processes", 1, "Worker processes; each converts the records whose id hashes to it "
                         "(the result does not depend on the number).")
    flags.DEFINE_integer("chunk_size", CHUNK_SIZE, "Input records a worker converts between commits: the work a "
                         "killed conversion redoes on resume, per worker; each chunk adds --num_shards files (at "
                         "hundreds of millions of records, 1000000 keeps the file count in the hundreds).")
    flags.DEFINE_float("max_reject_fraction", 0.1, "Fail if more than this fraction of records is rejected.")
    flags.DEFINE_string("source", None, "Mixture source name of the records (default: the format's name; text "
                        "for jsonl).")
    flags.DEFINE_integer("num_workers", 8, "Threads reading and checking images, per process.")
    flags.DEFINE_bool("allow_outside_image_root", False, "--format=llava|hf: accept image paths that lead outside "
                      "--image_root (absolute, ../, symlinks out); refused by default (reason outside_image_root).")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_PIXELS, "Refuse images whose header declares more pixels "
                         "(decompression bombs; reason image_too_large).")


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
                                   max_image_pixels=FLAGS.max_image_pixels, num_processes=FLAGS.num_processes,
                                   chunk_size=FLAGS.chunk_size)
        elif FLAGS.format == "jsonl":
            if not FLAGS.jsonl:
                raise app.UsageError("--format=jsonl needs --jsonl")
            report = convert_jsonl(FLAGS.jsonl, FLAGS.out, num_shards=FLAGS.num_shards,
                                   max_reject_fraction=FLAGS.max_reject_fraction,
                                   source=FLAGS.source or "text", num_processes=FLAGS.num_processes,
                                   chunk_size=FLAGS.chunk_size)
        else:
            if FLAGS.num_processes != 1:  # one reader; its images are checked on --num_workers threads
                raise app.UsageError(f"--format={FLAGS.format} converts in one process: drop --num_processes")
            common = dict(num_shards=FLAGS.num_shards, max_reject_fraction=FLAGS.max_reject_fraction,
                          num_workers=FLAGS.num_workers, max_image_pixels=FLAGS.max_image_pixels,
                          chunk_size=FLAGS.chunk_size)
            if FLAGS.format == "hf":
                if not FLAGS.hf_dataset:
                    raise app.UsageError("--format=hf needs --hf_dataset")
                report = convert_hf(FLAGS.hf_dataset, FLAGS.out, split=FLAGS.split, image_root=FLAGS.image_root,
                                    source=FLAGS.source or "hf",
                                    allow_outside_image_root=FLAGS.allow_outside_image_root, **common)
            else:
                if not FLAGS.wds:
                    raise app.UsageError("--format=webdataset needs --wds")
                report = convert_webdataset(FLAGS.wds if len(FLAGS.wds) > 1 else FLAGS.wds[0], FLAGS.out,
                                            source=FLAGS.source or "webdataset", **common)
    except ConversionError as e:
        if e.report is not None:
            print(e.report.summary())
        sys.exit(f"error: {e}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # committed chunks stay: the same command picks up from them
        print("\ninterrupted: rerun the same command to resume from the committed chunks", file=sys.stderr)
        sys.exit(130)
    print(report.summary())


if __name__ == "__main__":
    define_flags()
    app.run(main)
