"""Throughput and memory of the LLaVA converter (`data_pipelines.conversion.convert_llava`).

    python -m tools.benchmark_convert [--records=5000,50000 --processes=1,2 --images=300]

Writes, per size in --records, a LLaVA JSON of that many records (each id shared by two
records as in LLaVA data, 2-4 turns of a few hundred characters, --text_only of them without
an image, the rest naming one of --images distinct small PNGs), then converts it with each
number of worker processes in --processes, every conversion in a fresh subprocess. Printed,
one line per run: wall seconds (process start-up included), records/s, records/s per process,
peak RSS of the converting process(es) (Linux VmHWM: the one process, or the largest worker
and the parent). Then the JSON streaming rate alone (ijson, one process), and the projected
hours for the paper's 645M samples on a --host_cores host with one worker per core: each
worker streams the whole JSON and converts 1/N of it, so hours = samples x (parse + convert
/ N) / 3600, with parse and convert the seconds per record measured here (at the largest
size, the fewest processes). Tiny images make `convert` a lower bound: a real 640 x 480
JPEG takes milliseconds to check, which only makes the parse share (and the projection's
error) smaller. Also printed: the records/s of the design not taken (a parent parsing once
and shipping batches of records to the workers through a pipe), that design's ceiling.

Peak RSS grows from 5k to 50k records mostly because ArrayRecord's writer buffers up to ~16
MiB of an open shard's records (freed when a chunk commits) and a 5k-record chunk does not
fill it; past one full chunk only the identity state (32 bytes per record) grows: compare
--records=50000,200000.
"""
import io
import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from genieblue_jax.cli import PACKAGES_ROOT

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_list("records", ["5000", "50000"], "Record counts of the generated LLaVA JSONs.")
    flags.DEFINE_list("processes", ["1", "2"], "Worker process counts to convert with.")
    flags.DEFINE_integer("images", 300, "Distinct image files the records name.")
    flags.DEFINE_integer("image_size", 32, "Side of the square PNGs, in pixels.")
    flags.DEFINE_float("text_only", 0.3, "Fraction of records without an image.")
    flags.DEFINE_integer("chunk_size", 10_000, "Records per committed chunk (convert_llava's chunk_size).")
    flags.DEFINE_integer("num_workers", 8, "Image-checking threads per process (convert_llava's num_workers).")
    flags.DEFINE_string("work_dir", None, "Where to write inputs and outputs (default: a temporary directory).")
    flags.DEFINE_integer("host_cores", 64, "Cores of the host the projection is for.")
    flags.DEFINE_float("samples", 645e6, "Samples of the projection (the paper's training data).")

# Runs in a fresh interpreter: a conversion's own numbers, not this process's imports.
_CHILD = """
import json, sys, time
from data_pipelines.conversion import convert_llava
from data_pipelines.conversion.driver import peak_rss_kib
json_path, root, out, processes, chunk_size, threads = sys.argv[1:]
start = time.perf_counter()
report = convert_llava(json_path, root, out, num_processes=int(processes), chunk_size=int(chunk_size),
                       num_workers=int(threads))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "total": report.total, "written": report.written,
                  "workers_rss_kib": report.peak_rss_kib, "parent_rss_kib": peak_rss_kib()}))
"""
_PARSE = """
import sys, time
from data_pipelines.conversion.llava import llava_records
start = time.perf_counter()
n = sum(1 for _ in llava_records(sys.argv[1]))
print(n / (time.perf_counter() - start))
"""
# The design not taken: a parent parses once and ships batches of 256 records to a worker
# (pickle + pipe); its records/s is the ceiling of that design whatever the number of workers.
_DISPATCH = """
import multiprocessing, pickle, sys, time
from data_pipelines.conversion.llava import llava_records
from genieblue_jax.cli.benchmark_convert import sink

if __name__ == "__main__":
    here, there = multiprocessing.get_context("spawn").Pipe()
    worker = multiprocessing.get_context("spawn").Process(target=sink, args=(there,))
    worker.start()
    here.send_bytes(pickle.dumps([]))
    start, batch, n = time.perf_counter(), [], 0
    for item in llava_records(sys.argv[1]):
        batch.append(item)
        n += 1
        if len(batch) == 256:
            here.send_bytes(pickle.dumps(batch))
            batch = []
    here.send_bytes(pickle.dumps(batch))
    here.send_bytes(b"")
    here.recv()
    print(n / (time.perf_counter() - start))
    worker.join()
"""


def sink(conn) -> None:
    """The worker end of `_DISPATCH`: receives batches until an empty message, then answers."""
    while conn.recv_bytes() != b"":
        pass
    conn.send(0)


def write_images(root: str, count: int, size: int) -> None:
    """Writes `count` random `size` x `size` PNGs to `root` (00000.png, ...)."""
    import numpy as np
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        with open(os.path.join(root, f"{k:05d}.png"), "wb") as f:
            f.write(buf.getvalue())


def write_llava(path: str, n: int, images: int, text_only: float) -> int:
    """Writes n LLaVA records to `path`, one at a time (a JSON list); returns the file's bytes."""
    import numpy as np
    rng = np.random.default_rng(n)
    words = "the a bus red man sign street two left what is on of in image describe colour how many".split()
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            turns = []
            for t in range(int(rng.integers(1, 3))):
                q = " ".join(rng.choice(words, int(rng.integers(8, 30))))
                a = " ".join(rng.choice(words, int(rng.integers(20, 80))))
                turns += [{"from": "human", "value": q + "?"}, {"from": "gpt", "value": a + "."}]
            rec = {"id": f"{i // 2:012d}", "conversations": turns}  # LLaVA reuses ids: kept as ID#2
            if rng.random() >= text_only:
                rec["image"] = f"{int(rng.integers(images)):05d}.png"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    return os.path.getsize(path)


def run_child(script: str, *args) -> str:
    """Runs the code string `script` with `args` in a fresh interpreter; returns the last line it
    printed. Raises RuntimeError with its stderr when it fails."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=PACKAGES_ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main(argv):
    """Generates the inputs, runs the conversions, prints the table and the projection."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="benchmark_convert_")
    root = os.path.join(work, "images")
    write_images(root, FLAGS.images, FLAGS.image_size)
    print(f"{FLAGS.images} PNGs of {FLAGS.image_size} px, {FLAGS.text_only:.0%} text-only records, "
          f"{os.cpu_count()} CPUs visible, chunk_size {FLAGS.chunk_size}, {FLAGS.num_workers} threads/process")
    print(f"{'records':>8} {'procs':>5} {'seconds':>8} {'records/s':>10} {'per proc':>9} "
          f"{'peak RSS MiB (worker max / parent)':>36}")
    runs = {}
    for n in map(int, FLAGS.records):
        json_path = os.path.join(work, f"llava_{n}.json")
        size = write_llava(json_path, n, FLAGS.images, FLAGS.text_only)
        for p in map(int, FLAGS.processes):
            r = json.loads(run_child(_CHILD, json_path, root, os.path.join(work, f"out_{n}_{p}"), p,
                                     FLAGS.chunk_size, FLAGS.num_workers))
            runs[n, p] = r
            rate = r["total"] / r["seconds"]
            print(f"{n:>8} {p:>5} {r['seconds']:>8.2f} {rate:>10.0f} {rate / p:>9.0f} "
                  f"{max(r['workers_rss_kib']) / 1024:>27.1f} / {r['parent_rss_kib'] / 1024:.1f}")
        print(f"{'':>8} ({size / n:.0f} JSON bytes per record)")
    sizes = sorted(map(int, FLAGS.records))
    for p in map(int, FLAGS.processes):
        small, large = runs[sizes[0], p], runs[sizes[-1], p]
        growth = max(large["workers_rss_kib"]) / max(small["workers_rss_kib"]) - 1
        print(f"peak RSS, {p} process(es): {max(small['workers_rss_kib']) / 1024:.1f} MiB at {sizes[0]} records, "
              f"{max(large['workers_rss_kib']) / 1024:.1f} MiB at {sizes[-1]} ({growth:+.1%})")

    n = sizes[-1]
    parse_rate = float(run_child(_PARSE, os.path.join(work, f"llava_{n}.json")))
    dispatch_rate = float(run_child(_DISPATCH, os.path.join(work, f"llava_{n}.json")))
    p = min(map(int, FLAGS.processes))
    run = runs[n, p]  # its wall time is records x (parse + convert / p)
    convert = max(p * (run["seconds"] / run["total"] - 1 / parse_rate), 0.0)
    per_record = 1 / parse_rate + convert  # one process doing everything
    cores = FLAGS.host_cores
    hours = FLAGS.samples * (1 / parse_rate + convert / cores) / 3600
    naive = FLAGS.samples * per_record / cores / 3600
    print(f"streaming the JSON alone (ijson {__import__('ijson').backend}): {parse_rate:.0f} records/s "
          f"({1e6 / parse_rate:.1f} us/record); converting: {1e6 * convert:.1f} us/record")
    print(f"a parent parsing and shipping records to workers instead (pickle + pipe): {dispatch_rate:.0f} "
          f"records/s ({1e6 / dispatch_rate:.1f} us/record), at least {FLAGS.samples / dispatch_rate / 3600:.2f} h "
          f"for {FLAGS.samples / 1e6:.0f}M samples whatever the number of workers")
    print(f"projection, {FLAGS.samples / 1e6:.0f}M samples on {cores} cores ({cores} processes): "
          f"{hours:.2f} h (each process streams the whole JSON: {FLAGS.samples / parse_rate / 3600:.2f} h of "
          f"that); {naive:.2f} h if parsing were split too")
    print(f"outputs in {work}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
