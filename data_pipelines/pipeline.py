"""The stage-1 / stage-2 input pipeline on Grain: mixture -> shuffle -> per-host shard ->
decode, dynamic resolution, chat template, labels -> multi-worker prefetch -> first-fit
packing -> batches. Deterministic from the seed; the iterator state is a small JSON-able
dict (`get_state` / `set_state`) saved with the training checkpoint.

    >>> pipe = build_pipeline(PipelineConfig(
    ...     sources=(SourceSpec("caption", "/data/caption", 0.5), SourceSpec("text", "/data/text", 0.5)),
    ...     tokenizer="/ckpt/qwen2.5-3b/hf_assets", seq_len=4096, batch_size=8,
    ...     tile_size=384, tokens_per_tile=196, image_mode="dynamic"))
    >>> it = iter(pipe)
    >>> batch = next(it)            # dict of numpy arrays, see data_pipelines.packing
    >>> state = it.get_state()      # save it; later: it = iter(pipe); it.set_state(state)

Per-host sharding: every source is shuffled globally with the same seed on every host,
repeated, then host i of n takes stream positions i, i + n, ...: hosts read disjoint
examples whose union is the whole stream. Each host then builds `batch_size` rows.

Packing works in windows: samples are read until they hold `packing_window_rows` rows'
worth of tokens, the window is packed with first-fit and its rows are emitted in order
(only a window's last rows can be part-filled, so larger windows pack tighter). The state is
the parent's state at the start of the current window plus the number of its rows already emitted, so restoring re-reads
and re-packs that one window (deterministically) and continues exactly.

Bad samples never stop training and are never trained with an empty loss: they become
`Rejection`s, counted per reason in `iterator.stats` and logged with their id.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging

import grain
import numpy as np

from data_pipelines import images as image_lib
from data_pipelines.chat import chat_renderer, truncate
from data_pipelines.packing import PackingSpec, Rejection, Sample, assemble_row, batch_rows, empty_row, first_fit
from data_pipelines.records import ArrayRecordExampleSource, CorruptRecord, Example
from data_pipelines.tokenizer import IMAGE_PAD, load_tokenizer

log = logging.getLogger(__name__)


# BlueLM-V-3B's stage-2 data (645M samples, public + in-house, millions), the paper's recipe:
# use as weights, e.g. `sources=mixture({"caption": "/data/caption", ...}, PAPER_STAGE2_MIXTURE)`.
PAPER_STAGE2_MIXTURE = {"caption": 316.3, "vqa": 64.7, "ocr": 197.2, "text": 66.9}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One mixture source: a converted ArrayRecord dataset directory (manifest.json +
    shards), or, with `tfds_split`, a TFDS dataset (name or prepared directory) read
    through `tfds.data_sources`."""
    name: str
    path: str
    weight: float = 1.0
    tfds_split: str | None = None
    tfds_data_dir: str | None = None

    def open(self):
        """The source as a random-access Grain data source of Examples (ArrayRecord or TFDS)."""
        if self.tfds_split is None:
            return ArrayRecordExampleSource(self.path)
        from data_pipelines.tfds_source import TfdsExampleSource
        return TfdsExampleSource(self.path, self.tfds_split, data_dir=self.tfds_data_dir)


def mixture(paths: dict[str, str], weights: dict[str, float]) -> tuple[SourceSpec, ...]:
    """SourceSpecs from {name: dataset dir} and {name: weight}; the names must agree."""
    if set(paths) != set(weights):
        raise ValueError(f"mixture: datasets {sorted(paths)} and weights {sorted(weights)} name "
                         "different sources")
    return tuple(SourceSpec(n, paths[n], float(weights[n])) for n in sorted(paths))


class RejectionStreakError(ValueError):
    """A data source whose samples are all being rejected (PipelineConfig.max_rejects_in_a_row)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything `build_pipeline` needs: sources and their weights, tokenizer, row shape,
    image handling, batch size, seed and Grain read options."""
    sources: tuple[SourceSpec, ...]
    tokenizer: str                     # tokenizer.json / .model, or a directory holding one
    seq_len: int
    batch_size: int                    # rows per host per step
    tile_size: int                    # vision tower input side, pixels
    tokens_per_tile: int              # LLM tokens per tile (196 for so400m + downsampler)
    image_mode: str = "dynamic"        # "single" (stage 1) or "dynamic" (stage 2)
    max_tiles: int = 16              # per image, dynamic mode (plus the thumbnail)
    max_tiles_per_row: int = 34      # image tiles a packed row can carry
    default_system: str | None = None
    image_token: str = IMAGE_PAD       # the placeholder's text (a recipe's "auto" is resolved before)
    # How conversations are rendered (data_pipelines.chat): "auto" (the tokenizer directory's chat
    # template, ChatML without one), "tokenizer" or "chatml"; the template's options (e.g.
    # {"enable_thinking": False}); the date a template that reads one renders ("YYYY-MM-DD"; None: today).
    chat_template: str = "auto"
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    chat_date: str | None = None
    # The LLM's embedding rows (0: unchecked). A tokenizer may be longer than the table (Gemma-3-1b's
    # <image_soft_token>, id 262144 of 262,144 rows): a sample holding such an id is rejected, by name.
    vocab_rows: int = 0
    seed: int = 0
    num_epochs: int | None = None      # None: repeat forever
    num_workers: int = 0
    # Grain's read-ahead of processed examples (grain.ReadOptions); order and checkpoints do not
    # depend on it. Grain's defaults (16 threads, 500 examples) cost ~1 ms of GIL-held Python per
    # example in grain 0.2.18: every next() scans the whole read-ahead buffer
    # (PrefetchDatasetIterator._measure_prefetch_depth), which took a fifth of the demo
    # pretraining's step time on 2 cores. 0 threads: examples are processed on demand.
    read_threads: int = 1
    read_buffer: int = 16
    packing_window_rows: int = 16     # a packing window holds >= this many rows' worth of tokens
    # A source whose samples are rejected this many times in a row is broken (every sample too
    # long, a tokenizer without the image token, ...): RejectionStreakError, not an endless loop.
    max_rejects_in_a_row: int = 1000

    def __post_init__(self):
        if not self.sources:
            raise ValueError("PipelineConfig.sources is empty")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"PipelineConfig.sources has duplicate names {names}")
        if any(s.weight <= 0 for s in self.sources):
            raise ValueError(f"PipelineConfig.sources weights must be > 0: "
                             f"{[(s.name, s.weight) for s in self.sources]}")
        if self.image_mode not in ("single", "dynamic"):
            raise ValueError(f"PipelineConfig.image_mode={self.image_mode!r}; 'single' or 'dynamic'")

    @classmethod
    def for_model(cls, mcfg, *, chat: dict | None = None, **kwargs) -> "PipelineConfig":
        """Tile size and tokens per tile taken from a `genieblue_jax.structure.MLLMConfig`; the
        chat rendering from `chat` ({"template", "template_kwargs", "date"}, as a recipe's
        `RunConfig.chat()` and `GenieBlue.chat` give it; the class defaults without)."""
        chat = chat or {}
        rendering = {field: chat[key] for field, key in (("chat_template", "template"),
                                                         ("chat_template_kwargs", "template_kwargs"),
                                                         ("chat_date", "date")) if chat.get(key) is not None}
        return cls(tile_size=mcfg.vision.image_size, tokens_per_tile=mcfg.tokens_per_tile,
                   vocab_rows=mcfg.llm.vocab_size, **rendering, **kwargs)

    @property
    def packing(self) -> PackingSpec:
        """The row shape this config packs into."""
        return PackingSpec(self.seq_len, self.max_tiles_per_row, self.tile_size,
                           tuple(s.name for s in self.sources))


class ExampleProcessor:
    """Example -> Sample (or Rejection). Picklable: the tokenizer loads lazily per worker."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self._template = None

    def __getstate__(self):
        return {"cfg": self.cfg, "_template": None}

    @property
    def template(self):
        """The chat renderer (`data_pipelines.chat.chat_renderer`; the tokenizer loaded once per
        worker process)."""
        if self._template is None:
            cfg = self.cfg
            self._template = chat_renderer(load_tokenizer(cfg.tokenizer), chat_template=cfg.chat_template,
                                           image_token=cfg.image_token, template_kwargs=cfg.chat_template_kwargs,
                                           date=cfg.chat_date, default_system=cfg.default_system)
        return self._template

    def __call__(self, ex: Example | CorruptRecord) -> Sample | Rejection:
        cfg = self.cfg
        if isinstance(ex, CorruptRecord):
            return Rejection(ex.id, ex.source, f"corrupt record: {ex.where}: {ex.reason}")
        try:
            tiles = [image_lib.to_tiles(image_lib.decode_image(b), tile=cfg.tile_size,
                                            mode=cfg.image_mode, max_tiles=cfg.max_tiles)
                       for b in ex.images]
        except image_lib.ImageDecodeError as e:
            return Rejection(ex.id, ex.source, f"undecodable image: {e}")
        try:
            chat = self.template.render(ex.turns, [len(p) * cfg.tokens_per_tile for p in tiles],
                                        example_id=ex.id)
        except ValueError as e:
            return Rejection(ex.id, ex.source, f"bad conversation: {e}")
        if cfg.vocab_rows and len(chat.tokens) and chat.tokens.max() >= cfg.vocab_rows:
            beyond = int(chat.tokens.max())
            return Rejection(ex.id, ex.source, f"token outside the LLM's embedding table: id {beyond} "
                             f"({self.template.tokenizer.piece(beyond)!r}) of {cfg.vocab_rows} rows")
        first_trained = int(np.argmax(chat.loss_mask)) if chat.loss_mask.any() else None
        chat, kept = truncate(chat, cfg.seq_len)
        if not chat.loss_mask.any():
            where = ("it trains no token" if first_trained is None else
                     f"its first trained token is token {first_trained} as rendered (a long default system turn? "
                     f"a larger data.seq_len, or the template's options, e.g. enable_thinking)")
            return Rejection(ex.id, ex.source, f"no trained token within seq_len={cfg.seq_len}: {where}")
        tiles = tiles[:kept]
        starts = [start + j * cfg.tokens_per_tile
                  for (start, _), p in zip(chat.image_spans, tiles) for j in range(len(p))]
        if len(starts) > cfg.max_tiles_per_row:
            return Rejection(ex.id, ex.source, f"{len(starts)} image tiles exceed "
                             f"max_tiles_per_row={cfg.max_tiles_per_row}")
        s = cfg.tile_size
        stacked = np.concatenate(tiles) if tiles else np.zeros((0, s, s, 3), np.uint8)
        return Sample(ex.id, ex.source, chat.tokens, chat.loss_mask, stacked,
                      np.asarray(starts, np.int32))


def as_source(name: str, record):
    """`record` (an Example or CorruptRecord) under the mixture's name for its dataset: the key of
    `data.sources` names the source (its loss, weight, rejection counts), whatever label the
    converter stored (`--source`, "llava" by default)."""
    return record if record.source == name else dataclasses.replace(record, source=name)


def source_dataset(spec: SourceSpec, seed: int, num_epochs: int | None, process_index: int,
                   process_count: int) -> grain.MapDataset:
    """One source, named by its mixture key (`as_source`), globally shuffled (reshuffled every
    epoch), repeated, this host's part."""
    ds = grain.MapDataset.source(spec.open()).map(functools.partial(as_source, spec.name))
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    return ds[process_index::process_count]


class PackedBatches(grain.IterDataset):
    """Packs a stream of Samples / Rejections into batches of rows (see module doc)."""

    def __init__(self, parent: grain.IterDataset, cfg: PipelineConfig):
        super().__init__(parent)
        self.cfg = cfg

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self._parent.__iter__(), self.cfg)


class PackedBatchIterator(grain.DatasetIterator):
    """Packs processed samples into batches of rows, window by window (module docstring);
    checkpointable through `get_state` / `set_state`."""

    def __init__(self, parent: grain.DatasetIterator, cfg: PipelineConfig):
        super().__init__(parent)
        self.cfg = cfg
        self.spec = cfg.packing
        self.stats: dict = _new_stats()
        self._window_state = self._parent.get_state()
        self._rows: list[dict] = []
        self._next_row = 0
        self._exhausted = False
        self._streaks: dict[str, collections.Counter] = {}  # source -> reasons of its current rejection streak

    def _load_window(self, count: bool = True) -> None:
        """Reads samples worth `packing_window_rows` rows of tokens and packs them into rows."""
        samples: list[Sample] = []
        budget, tokens = self.cfg.packing_window_rows * self.spec.seq_len, 0
        while tokens < budget:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(item, Rejection):
                kind = item.reason.split(":")[0]
                if count:
                    self.stats["rejected"][kind] += 1
                    log.warning("rejected sample %s (source %s): %s", item.id, item.source, item.reason)
                streak = self._streaks.setdefault(item.source, collections.Counter())
                streak[kind] += 1
                if streak.total() >= self.cfg.max_rejects_in_a_row:
                    raise RejectionStreakError(
                        f"data source {item.source!r}: {streak.total()} samples in a row rejected "
                        f"(data.max_rejects_in_a_row), by reason {dict(streak)}; the last: id {item.id!r}: "
                        f"{item.reason}")
                continue
            self._streaks.pop(item.source, None)
            samples.append(item)
            tokens += len(item)
        if count:
            self.stats["samples"] += len(samples)
            for s in samples:
                self.stats["samples_per_source"][s.source] += 1
        bins = first_fit([len(s) for s in samples], [len(s.tiles) for s in samples],
                         self.spec.seq_len, self.spec.max_tiles_per_row)
        self._rows = [assemble_row([samples[i] for i in b], self.spec) for b in bins]
        self._next_row = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.cfg.batch_size:
            if self._next_row == len(self._rows):
                if self._exhausted:
                    break
                self._window_state = self._parent.get_state()
                self._load_window()
                continue
            rows.append(self._rows[self._next_row])
            self._next_row += 1
        if not rows:
            raise StopIteration
        rows += [empty_row(self.spec)] * (self.cfg.batch_size - len(rows))  # last batch only
        batch = batch_rows(rows)
        self.stats["batches"] += 1
        self.stats["tokens"] += int(np.sum(batch["segment_ids"] > 0))
        self.stats["slots"] += batch["segment_ids"].size
        return batch

    def get_state(self) -> dict:
        """JSON-able state: {"parent": the source iterator's state at the start of the current
        packing window, "next_row": rows of that window already emitted, "exhausted": bool,
        "stats": counters}. Small (no tensors): restoring re-reads and re-packs one window."""
        return {"parent": copy.deepcopy(self._window_state), "next_row": self._next_row,
                "exhausted": self._exhausted and self._next_row == len(self._rows),
                "stats": _stats_to_json(self.stats)}

    def set_state(self, state: dict) -> None:
        """Resumes at `state` (from `get_state`): the next batch is the one that followed it."""
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._window_state = copy.deepcopy(state["parent"])
        self.stats = _stats_from_json(state["stats"])
        self._exhausted = False
        self._load_window(count=False)  # already counted before the state was taken
        self._next_row = state["next_row"]


def _new_stats() -> dict:
    return {"batches": 0, "samples": 0, "tokens": 0, "slots": 0,
            "rejected": collections.Counter(), "samples_per_source": collections.Counter()}


def _stats_to_json(stats: dict) -> dict:
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in stats.items()}


def _stats_from_json(d: dict) -> dict:
    stats = _new_stats()
    for k, v in d.items():
        stats[k] = collections.Counter(v) if isinstance(stats[k], collections.Counter) else v
    return stats


def packing_efficiency(stats: dict) -> float:
    """Fraction of non-padding tokens over everything emitted so far."""
    return stats["tokens"] / max(stats["slots"], 1)


def build_pipeline(cfg: PipelineConfig, *, process_index: int | None = None,
                   process_count: int | None = None) -> PackedBatches:
    """The whole pipeline for this host (defaults: `jax.process_index()` / `process_count()`)."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    parts = [source_dataset(s, cfg.seed + i, cfg.num_epochs, process_index, process_count)
             for i, s in enumerate(cfg.sources)]
    weights = [s.weight for s in cfg.sources]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    stream = mixed.map(ExampleProcessor(cfg)).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if cfg.num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags in every worker process
            raise RuntimeError(f"num_workers={cfg.num_workers}: Grain's worker processes read absl flags, which "
                               f"this process has not parsed; run under absl.app.run (as python -m "
                               f"experiments.run does), call absl.flags.FLAGS.mark_as_parsed() first, or use "
                               f"num_workers=0")
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return PackedBatches(stream, cfg)


class StreamBatchIterator:
    """This host's batches from its share of a global batch made of independent streams.

    The global batch of `streams` x `rows_per_stream` rows is the concatenation, in stream
    order, of what `streams` independent pipelines pack: stream j reads stream positions
    j, j + streams, ... of every source (`build_pipeline` as process j of `streams`) and packs
    its own rows. Process i of n owns streams [i k, (i + 1) k), k = streams / n, and yields
    their rows concatenated: the rows of process i are rows [i B/n, (i + 1) B/n) of the
    global batch, whatever n is. So with a fixed `streams` the global batch does not depend
    on the number of hosts (one host reading all streams gives the same batches as 2 or 64),
    and every host's state is its own streams' states.

    `get_state()` -> {"streams": {"j": <PackedBatchIterator state>, ...}}; `set_state`
    refuses a state of other streams (a resume with another process count or `streams`)
    with a ValueError naming both. `stats`: this host's data statistics, summed over its
    streams (see PackedBatchIterator).
    """

    def __init__(self, cfg: PipelineConfig, streams: int, process_index: int, process_count: int):
        if streams < 1 or streams % process_count:
            raise ValueError(f"{streams} data streams cannot be split over {process_count} processes "
                             f"(streams must be a multiple of the process count)")
        k = streams // process_count
        if cfg.batch_size % k:
            raise ValueError(f"{cfg.batch_size} rows per host cannot be split over this host's {k} data streams")
        stream_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // k)
        self.owned = tuple(range(process_index * k, (process_index + 1) * k))
        self._its = {j: iter(build_pipeline(stream_cfg, process_index=j, process_count=streams)) for j in self.owned}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self._its.values()]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    @property
    def stats(self) -> dict:
        """The counters (samples, rejects by reason, batches, tokens, slots) summed over streams."""
        total = _new_stats()
        for it in self._its.values():
            for key, value in it.stats.items():
                total[key] += value
        return total

    def get_state(self) -> dict:
        """{"streams": {stream index: that stream's `PackedBatchIterator.get_state()`}} for the
        streams this process reads (what its data checkpoint holds)."""
        return {"streams": {str(j): it.get_state() for j, it in self._its.items()}}

    def set_state(self, state: dict) -> None:
        """Resumes every stream of `state`; ValueError when it holds other streams than this
        process reads (another process count or data.streams)."""
        saved = sorted(int(j) for j in state["streams"])
        if saved != list(self.owned):
            raise ValueError(f"the data state holds streams {saved}, but this process reads streams "
                             f"{list(self.owned)}: resume with the process count and data.streams the run was "
                             f"saved with")
        for j, it in self._its.items():
            it.set_state(state["streams"][str(j)])


def build_streams(cfg: PipelineConfig, streams: int | None = None, *, process_index: int | None = None,
                  process_count: int | None = None) -> StreamBatchIterator:
    """This host's iterator over its streams (`StreamBatchIterator`); `cfg.batch_size` is this
    host's rows. `streams` defaults to one per process (each host packs one stream: the
    global batch then depends on the number of hosts, as with `build_pipeline`)."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    return StreamBatchIterator(cfg, streams or process_count, process_index, process_count)
