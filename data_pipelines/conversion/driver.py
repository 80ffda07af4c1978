"""The one conversion driver every format runs through (`run`): a format's `Reader` streams
records, the driver converts them on threads and worker processes, commits them chunk by
chunk (resumable), rejects what the checks refuse and writes the dataset, `rejects.jsonl`
and the `ConversionReport`.

Nothing is dropped silently: a bad record is counted and logged to `out/rejects.jsonl`
({POSITION, "id", "reason", "detail"}, POSITION the reader's `label`: "index", "line",
"sample") with one of `checks.REASONS`, and the good ones are written. If more than
`max_reject_fraction` of the records are rejected the conversion fails (ConversionError; the
CLI exits non-zero): the rejects log stays, the shards are removed and no manifest is written.

Scale (the paper trains on 645M samples; a LLaVA JSON of that many is hundreds of GB):

- Processes. `num_processes` workers (spawned: JAX may be imported in the caller, and fork is
  unsafe then). Record identity is decided per id, so records are partitioned by a stable hash
  (BLAKE2b) of their id without "#k" suffixes ("{source}-{position}" when absent; by position
  when the id is unusable): every record whose final id could collide with another's goes to
  one worker, in input order, and the kept records, their ids and the rejects are the same
  for any `num_processes` (only the order of records in the dataset differs). Each worker
  streams the whole input itself (its own `Reader.records()`) and converts its share, rather
  than a parent parsing once and shipping records to the workers. Measured
  (`benchmark_convert`, 620-byte LLaVA records, a shared 2-core host): parsing 4-5 us a
  record; parsing, pickling and sending batches of 256 down a pipe 16 us on the parent's side
  alone; converting a record (checks, encoding, a small image read and decoded, the write)
  100-450 us, milliseconds with real photos. So a worker's wall time is about records x
  (5 us + convert / N), where a dispatching parent caps the whole conversion at one record per
  ~16 us whatever N (3x the duplicated parse), and needs IPC; here workers share nothing and
  resume on their own.
- Chunks and resume. A worker commits every `chunk_size` of its input records: the chunk's
  `num_shards` shard file(s) are closed and synced, then its marker
  (`out/.conversion/data-wWWW-cCCCCCC.json`: counts, reject lines, the identity keys of
  the kept records) is renamed into place, last. A conversion killed at any point and rerun
  with the same `resume_args` (those in `out/.conversion/args.json`: the input's files and
  every argument; `input_args`, `files_digest`) resumes: committed chunks are kept (their
  records parsed and skipped, the identity state rebuilt from their markers), files of
  uncommitted ones are deleted and redone, so every record is converted exactly once. Other
  input/arguments into an out_dir that holds an unfinished conversion is a ConversionError
  naming the directory (a finished dataset there is replaced, as before). When every worker
  is done the parent merges the markers into the report, `rejects.jsonl` (by input position)
  and `manifest.json`, which lists every chunk's shards as one round-robin group each
  (`records.ShardedWriter`), so `ArrayRecordExampleSource` and the training pipeline read it
  unchanged; `.conversion/` is then removed. The reject-fraction rule applies to the merged
  counts.
- Memory. Bounded per worker: one record parsed at a time, a chunk's reject lines and 32
  bytes of identity keys per record, ArrayRecord writing without compression threads (its
  writer still buffers up to ~16 MiB of the records of an open shard, freed at the chunk's
  commit), freed heap returned after each chunk; only the identity state grows with the
  input: two sets of 16-byte digests (`checks.Identity`: sorted numpy arrays, ~32 bytes per
  kept record, 320 MB for a worker's 10M records). `ConversionReport.peak_rss_kib` has each
  worker's peak RSS (`peak_rss_kib`).
"""
import base64
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
from typing import Iterator, Protocol

from absl import logging

from data_pipelines.conversion.checks import Identity, Reject, record_id
from data_pipelines.records import MANIFEST, SCHEMA_VERSION, Example, ShardedWriter

# A worker's input records per committed chunk: the resume granularity (a killed worker redoes at most
# this many), memory held until the commit (a few hundred bytes a record), --num_shards files per chunk (at the
# paper's 645M records, --chunk_size=1000000 keeps the dataset at ~650 files).
CHUNK_SIZE = 10_000
REJECTS_FILE = "rejects.jsonl"
_CHUNK = 256  # records read and converted at once (images checked on threads)
_STATE_DIR = ".conversion"  # args.json + chunk markers of an unfinished conversion; removed when it finishes
_ARGS = "args.json"
_CHUNK_FILE = re.compile(r"data-w([0-9]{3})-c([0-9]{6})-[0-9]{5}-of-[0-9]{5}\.array_record")
_WRITER_FILE = re.compile(r"data-[0-9]{5}-of-[0-9]{5}\.array_record")  # a ShardedWriter("data") dataset
_SUFFIXES = re.compile(r"(#[0-9]+)+$")  # "X#2#3" -> "X": ids made unique stay with their base id
_LIBC = None  # glibc, for malloc_trim (False where there is none)


class ConversionError(ValueError):
    """The input cannot be converted (bad file, too many rejects); `report` when known."""

    def __init__(self, message: str, report: "ConversionReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: counts, reject reasons, the manifest; `summary()` prints it."""
    input: str
    out_dir: str
    total: int = 0
    written: int = 0                                         # good records (written if it succeeded)
    rejected: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)  # reason -> count
    adjusted: dict = dataclasses.field(default_factory=dict)  # ADJUSTMENTS key -> records kept with it
    manifest: dict | None = None                             # None when the conversion failed
    peak_rss_kib: list = dataclasses.field(default_factory=list)  # per worker process (KiB): `peak_rss_kib`

    @property
    def rejects_path(self) -> str:
        """out_dir/rejects.jsonl: one JSON line per rejected record."""
        return os.path.join(self.out_dir, REJECTS_FILE)

    @property
    def reject_fraction(self) -> float:
        """Rejected / total records (0 for an empty input)."""
        return self.rejected / self.total if self.total else 0.0

    def summary(self) -> str:
        """The printed report: totals, written, rejected per reason, adjustments, the rejects log."""
        lines = [f"converted {self.input} -> {self.out_dir}",
                 f"  total     {self.total}",
                 f"  written   {self.written}" if self.manifest is not None else
                 f"  written   0 ({self.written} good records discarded: the conversion failed)",
                 f"  rejected  {self.rejected} ({100 * self.reject_fraction:.1f}%)"]
        lines += [f"    {reason:<20} {n}" for reason, n in sorted(self.reasons.items())]
        if self.adjusted:
            lines.append(f"  kept, adjusted  {sum(self.adjusted.values())}")
            lines += [f"    {name:<22} {n}" for name, n in sorted(self.adjusted.items())]
        lines.append(f"  rejects log: {self.rejects_path}")
        return "\n".join(lines)


class Reader(Protocol):
    """What a format gives the driver. With `num_processes > 1` it must pickle (spawned
    workers receive it) and `records()` must give the same sequence in every process."""
    label: str   # the rejects log's position key: "index", "line", "sample"
    source: str  # default ids are "{source}-{position}": which worker owns an id-less record

    def records(self) -> Iterator[tuple]:
        """(position, record) in input order; a `Reject` in place of a record that failed to
        parse (it is logged as that record's rejection)."""

    def convert(self, record, position) -> tuple[Example, list[str]]:
        """(Example, adjustments) of one record; raises `Reject`."""

    def threaded(self, record) -> bool:
        """Whether converting `record` is worth a thread hand-off (it reads or decodes images)."""


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: Linux's VmHWM, which belongs to this process
    image (ru_maxrss, the fallback, is carried over from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def import_optional(module: str):
    """`module` imported; ImportError naming the `formats` extra that installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"reading this format needs the `{module}` package: "
                          f"pip install 'genieblue_jax[formats]'") from None


def check_counts(**counts) -> None:
    """ValueError naming the first of `counts` (name=value) that is not an integer >= 1.

    >>> check_counts(num_shards=1, chunk_size=0)
    Traceback (most recent call last):
    ValueError: chunk_size must be an integer >= 1, got 0
    """
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def input_args(fmt: str, path: str, **arguments) -> dict:
    """`resume_args` for one input file: the format, the file (path, size, mtime) and `arguments`."""
    st = os.stat(path)
    return {"format": fmt, "input": os.path.abspath(path), "input_bytes": st.st_size,
            "input_mtime_ns": st.st_mtime_ns, **arguments}


def files_digest(paths) -> str:
    """What a resume must match of an input of several files: every file's name, size and
    mtime (a directory's files, walked in sorted order), hashed."""
    listing = []
    for path in paths:
        files = [path] if not os.path.isdir(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        for f in files:
            st = os.stat(f)
            listing.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every worker of one conversion needs (picklable: spawned workers receive it)."""
    out_dir: str
    reader: Reader
    num_shards: int            # shard files per committed chunk
    chunk_size: int
    num_threads: int = 1       # image-checking threads per worker
    num_processes: int = 1
    parent_pid: int = 0        # spawned workers stop when this process is gone


def _chunk_name(worker: int, chunk: int) -> str:
    return f"data-w{worker:03d}-c{chunk:06d}"


def _marker_path(out_dir: str, worker: int, chunk: int) -> str:
    return os.path.join(out_dir, _STATE_DIR, _chunk_name(worker, chunk) + ".json")


def _done_path(out_dir: str, worker: int) -> str:
    return os.path.join(out_dir, _STATE_DIR, f"w{worker:03d}.done.json")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a marker is there whole or not at all


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a marker must never outlive the data it vouches for (a machine crash)
    finally:
        os.close(fd)


def _owner(item, num_processes: int, source: str) -> int:
    """The worker of record (position, rec): a stable hash of its id without "#k" suffixes, so
    every record whose final id could collide with another's goes to the same worker, in input
    order; a record without a usable id (rejected anyway) by its position."""
    pos, rec = item
    rid = None
    if isinstance(rec, dict):
        try:
            rid = record_id(rec, f"{source}-{pos}")
        except Reject:
            pass
    key = f"\0{pos}" if rid is None else _SUFFIXES.sub("", rid)
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_processes


def _attempt(reader: Reader, item):
    pos, rec = item
    try:
        if isinstance(rec, Reject):
            raise rec
        return pos, rec, reader.convert(rec, pos)
    except Reject as r:
        return pos, rec, r


def _attempt_all(reader: Reader, batch: list, pool):
    """`_attempt` of each item of `batch`, in input order, on the `pool` threads (file reads and
    decodes release the GIL), except records the reader says are not worth it (text only),
    converted inline: a thread hand-off costs more than those."""
    futures = {} if pool is None else {
        i: pool.submit(_attempt, reader, item) for i, item in enumerate(batch) if reader.threaded(item[1])}
    for i, item in enumerate(batch):
        yield futures.pop(i).result() if i in futures else _attempt(reader, item)


def _count(counts: dict, key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _write_chunk(plan: _Plan, worker: int, chunk: int, batch: list, mine, pool, identity: Identity) -> None:
    """Converts `batch` and further records of `mine` up to `plan.chunk_size` inputs into this
    chunk's shards, then commits it: shards closed and synced, then its marker (counts, reject
    lines, the identity keys of the kept records) renamed into place last."""
    writer = ShardedWriter(plan.out_dir, num_shards=plan.num_shards, name=_chunk_name(worker, chunk),
                           write_manifest=False, check_ids=False,  # `identity` makes ids unique
                           max_parallelism=1)  # the workers are the parallelism; flat memory
    m = {"total": 0, "written": 0, "rejected": 0, "reasons": {}, "adjusted": {}, "rejects": []}
    id_keys, digests = bytearray(), bytearray()  # the identity state this chunk adds, 32 bytes a record
    try:
        while batch:
            if plan.parent_pid and os.getppid() != plan.parent_pid:
                writer.abort()  # the parent was killed: stop, so a restart never races this worker
                os._exit(1)
            for pos, rec, result in _attempt_all(plan.reader, batch, pool):
                m["total"] += 1
                try:
                    if isinstance(result, Reject):
                        raise result
                    ex, adjusted = result
                    ex, more = identity.admit(ex)
                except Reject as r:
                    rid = rec["id"] if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else None
                    m["rejects"].append({plan.reader.label: pos, "id": rid, "reason": r.reason, "detail": r.detail})
                    m["rejected"] += 1
                    _count(m["reasons"], r.reason)
                    continue
                for name in adjusted + more:
                    _count(m["adjusted"], name)
                writer.write(ex, identity.last_encoded)
                id_keys += identity.last_id_key
                digests += identity.last_digest
                m["written"] += 1
            batch = list(itertools.islice(mine, min(_CHUNK, plan.chunk_size - m["total"])))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for shard in shards["shards"]:
        _fsync(os.path.join(plan.out_dir, shard["file"]))
    m.update({k: shards[k] for k in ("shards", "sources", "num_bytes", "content_hash")})
    m.update(id_keys=base64.b64encode(id_keys).decode(), digests=base64.b64encode(digests).decode())
    _write_json_atomic(_marker_path(plan.out_dir, worker, chunk), m)
    logging.info("%s: worker %d committed chunk %d (%d records, %d rejected)", plan.out_dir, worker, chunk,
                 m["total"], m["rejected"])
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hands the heap a committed chunk freed back to the OS (glibc's malloc_trim; elsewhere
    nothing): without it fragmentation adds a MB or so per chunk to a worker's RSS."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (absent outside glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _run_worker(plan: _Plan, worker: int) -> None:
    """Worker `worker` of `plan.num_processes`: converts its records (all of them when there is
    one worker) chunk by chunk; resumes after its committed chunks, their identity state
    rebuilt from their markers; writes its done marker (its number of chunks) at the end."""
    if os.path.exists(_done_path(plan.out_dir, worker)):
        return
    records = plan.reader.records()
    identity, chunk, skip = Identity(), 0, 0
    while os.path.exists(path := _marker_path(plan.out_dir, worker, chunk)):
        marker = _read_json(path)
        identity.restore(base64.b64decode(marker["id_keys"]), base64.b64decode(marker["digests"]))
        skip += marker["total"]
        chunk += 1
    if plan.num_processes > 1:
        source = plan.reader.source
        records = (item for item in records if _owner(item, plan.num_processes, source) == worker)
    mine = itertools.islice(records, skip, None)  # committed records are parsed, not converted again
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(plan.num_threads)) \
            if plan.num_threads > 1 else None
        while batch := list(itertools.islice(mine, min(_CHUNK, plan.chunk_size))):
            _write_chunk(plan, worker, chunk, batch, mine, pool, identity)
            chunk += 1
    _write_json_atomic(_done_path(plan.out_dir, worker), {"chunks": chunk, "peak_rss_kib": peak_rss_kib()})


def _clear(out_dir: str, keep_rejects: bool = False) -> None:
    """Removes what a conversion writes in `out_dir` (other files stay)."""
    shutil.rmtree(os.path.join(out_dir, _STATE_DIR), ignore_errors=True)
    for name in os.listdir(out_dir):
        if (name == MANIFEST or _CHUNK_FILE.fullmatch(name) or _WRITER_FILE.fullmatch(name)
                or (name == REJECTS_FILE and not keep_rejects)):
            os.remove(os.path.join(out_dir, name))


def _prepare(out_dir: str, args: dict | None) -> bool:
    """Starts a conversion in `out_dir`: True to resume an unfinished one with the same `args`
    (its uncommitted chunk files removed), False for a fresh start (earlier outputs removed).
    ConversionError naming the directory if it holds an unfinished conversion of other
    input/arguments; `args` None: never resumed."""
    os.makedirs(out_dir, exist_ok=True)
    args_path = os.path.join(out_dir, _STATE_DIR, _ARGS)
    if os.path.exists(args_path) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        try:
            stored = _read_json(args_path)
        except (OSError, ValueError):
            stored = {"unreadable": args_path}
        if args is not None and stored == args:
            for name in os.listdir(out_dir):
                match = _CHUNK_FILE.fullmatch(name)
                if match and not os.path.exists(_marker_path(out_dir, int(match[1]), int(match[2]))):
                    os.remove(os.path.join(out_dir, name))  # a chunk cut short: redone
            return True
        if stored is not None or args is not None:
            differ = sorted(k for k in set(stored or {}) | set(args or {})
                            if (stored or {}).get(k) != (args or {}).get(k))
            raise ConversionError(f"{out_dir} holds an unfinished conversion of other input or arguments "
                                  f"(differing: {', '.join(differ)}; see {args_path}); rerun that conversion "
                                  "to finish it, or remove the directory")
    _clear(out_dir)
    os.makedirs(os.path.join(out_dir, _STATE_DIR))
    _write_json_atomic(args_path, args)
    return False


def _finish(plan: _Plan, input_label: str, max_reject_fraction: float) -> ConversionReport:
    """All chunks committed: merges the markers into one report, rejects.jsonl (by input
    position) and manifest.json (every chunk's shards, one round-robin group per chunk)."""
    out_dir, num_workers = plan.out_dir, plan.num_processes
    report = ConversionReport(input_label, out_dir)
    done = [_read_json(_done_path(out_dir, w)) for w in range(num_workers)]
    chunks = [d["chunks"] for d in done]
    report.peak_rss_kib = [d["peak_rss_kib"] for d in done]
    shards, groups, hashes, sources, num_bytes = [], [], [], {}, 0
    for w, n in enumerate(chunks):
        for c in range(n):
            m = _read_json(_marker_path(out_dir, w, c))
            report.total += m["total"]
            report.written += m["written"]
            report.rejected += m["rejected"]
            for key, counts in (("reasons", report.reasons), ("adjusted", report.adjusted)):
                for name, k in m[key].items():
                    counts[name] = counts.get(name, 0) + k
            if not m["written"]:  # every record of the chunk rejected: its empty files go
                for shard in m["shards"]:
                    os.remove(os.path.join(out_dir, shard["file"]))
                continue
            shards += m["shards"]
            groups.append(len(m["shards"]))
            hashes.append(m["content_hash"])
            num_bytes += m["num_bytes"]
            for name, k in m["sources"].items():
                sources[name] = sources.get(name, 0) + k

    def rejects_of(w):  # one marker in memory at a time
        for c in range(chunks[w]):
            yield from _read_json(_marker_path(out_dir, w, c))["rejects"]

    tmp = report.rejects_path + ".tmp"
    with open(tmp, "w") as f:
        label = plan.reader.label
        for line in heapq.merge(*(rejects_of(w) for w in range(num_workers)), key=lambda r: r[label]):
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, report.rejects_path)
    if report.total == 0:
        _clear(out_dir, keep_rejects=True)
        raise ConversionError(f"{input_label}: no records to convert", report)
    if report.reject_fraction > max_reject_fraction:
        _clear(out_dir, keep_rejects=True)
        raise ConversionError(
            f"{input_label}: rejected {report.rejected} of {report.total} records "
            f"(fraction {report.reject_fraction:.4f}) > max_reject_fraction {max_reject_fraction}; "
            f"reasons {dict(sorted(report.reasons.items()))}; see {report.rejects_path}. "
            "No dataset was written.", report)
    manifest = {"schema_version": SCHEMA_VERSION, "num_records": report.written, "num_bytes": num_bytes,
                "shards": shards}
    if len(groups) != 1:
        manifest["groups"] = groups
    manifest["sources"] = dict(sorted(sources.items()))
    manifest["content_hash"] = hashes[0] if len(hashes) == 1 else \
        hashlib.sha256(b"".join(bytes.fromhex(h) for h in hashes)).hexdigest()
    _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    shutil.rmtree(os.path.join(out_dir, _STATE_DIR))
    report.manifest = manifest
    return report


def run(reader: Reader, out_dir: str, *, input_label: str, num_shards: int, chunk_size: int,
        max_reject_fraction: float, num_threads: int = 1, num_processes: int = 1,
        resume_args: dict | None = None) -> ConversionReport:
    """Converts every record of `reader` into an ArrayRecord dataset in `out_dir` (module
    docstring): `num_processes` workers (spawned when more than one), each converting on
    `num_threads` threads and committing every `chunk_size` of its records as `num_shards`
    shard file(s). With `resume_args` (a JSON-able dict naming the input and every argument
    that shapes the output: `input_args`, `files_digest`) an unfinished conversion into
    `out_dir` with equal `resume_args` is resumed; without, `out_dir` is always started afresh.
    `input_label` names the input in the report and errors.

    Raises ConversionError (no records; more than `max_reject_fraction` rejected: no dataset is
    written; an unfinished conversion of another input in `out_dir`; one the reader raises for
    an unreadable input, after which `out_dir` is cleared)."""
    plan = _Plan(out_dir, reader, num_shards, chunk_size, num_threads=num_threads, num_processes=num_processes)
    if _prepare(out_dir, resume_args):
        logging.info("%s: resuming the unfinished conversion of %s", out_dir, input_label)
    try:
        if num_processes == 1:
            _run_worker(plan, 0)
        else:
            plan = dataclasses.replace(plan, parent_pid=os.getpid())
            context = multiprocessing.get_context("spawn")  # JAX may be imported here: never fork
            with concurrent.futures.ProcessPoolExecutor(num_processes, mp_context=context) as pool:
                for future in [pool.submit(_run_worker, plan, w) for w in range(num_processes)]:
                    future.result()
    except ConversionError:
        _clear(out_dir)  # the input itself is unreadable: nothing worth resuming
        raise
    return _finish(plan, input_label, max_reject_fraction)
