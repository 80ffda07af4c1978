"""The trainer: one linear file, big_vision style. `train(config, workdir)` runs a recipe.

Sections: 1 config -> model / data / mesh; 2 optimizer and the jitted step; 3 checkpoints
(saving, resuming); 4 the loop (metrics, SIGTERM, resume). What a workdir holds and how its
model is rebuilt (the recipe's model config, the frozen base, the checkpoint layout,
`load_trained`) is `genieblue_jax.workdir`, shared with inference and export.

The step differentiates w.r.t. the trainable tree only (`structure.partition`), so the
frozen base gets no weight gradient and no optimizer state. The loss is the next-token
cross-entropy over the trained tokens of the whole global batch: micro-batches add their
summed NLL divided by the global count of trained tokens, so accumulation over k
micro-batches equals one batch k times larger.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import signal
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines.chat import chat_renderer
from data_pipelines.pipeline import PipelineConfig, SourceSpec, build_streams
from data_pipelines.tokenizer import load_tokenizer
from genieblue_jax import checksums, models, paths, structure, versions
from genieblue_jax import sharding as sharding_lib
from genieblue_jax.run_config import RunConfig
from genieblue_jax.train import metrics as metrics_lib
from genieblue_jax.train.losses import token_nll
from genieblue_jax.train.optimizer import make_optimizer, schedule
from genieblue_jax.train.workdir_lock import WorkdirInUseError, WorkdirLock  # noqa: F401 (public here)
from genieblue_jax.workdir import (
    ConfigError,
    abstract_like,
    base_fingerprint,
    checkpoint_manager,
    image_token,
    init_params,
    parse_sources,
    read_config,
    restore_step,
    step_damage,
    tokenized_model_config,
    tokenizer_path,
    warn_unverified,
    with_resolved_choices,
    write_config,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# 1. Config -> model, data, mesh
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What `resolve` builds from a recipe: model config, pipeline config, mesh, batch plan."""
    mcfg: structure.MLLMConfig
    pipeline: "object"            # data_pipelines.pipeline.PipelineConfig
    mesh: jax.sharding.Mesh
    per_host_batch: int
    streams: int = 1              # data streams making the global batch (StreamBatchIterator)
    batch: dict | None = None     # batch_plan(): rows per device, micro-steps, global rows / tokens


def make_mesh(c: RunConfig) -> jax.sharding.Mesh:
    """The recipe's mesh; a fixed mesh smaller than the machine uses the first devices (warned)."""
    axes = dataclasses.asdict(c.mesh)
    devices = jax.devices()
    if -1 not in axes.values() and np.prod(list(axes.values())) < len(devices):
        log.warning("mesh %s uses %d of %d devices", axes, np.prod(list(axes.values())), len(devices))
        devices = devices[:int(np.prod(list(axes.values())))]
    try:
        return sharding_lib.make_mesh(axes, devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None


def resolve(config: RunConfig, workdir: str) -> Setup:
    """Validates the config (`RunConfig.validate`; errors name the key) and builds model, data
    and mesh configs (what needs the tokenizer, the init checkpoints' metadata and the devices)."""
    c = config
    c.validate()
    c.required_for_training()
    c.check_data_sources()
    sources = parse_sources(c.data.sources)
    chat = c.chat()
    tokenizer = tokenizer_path(c, workdir)
    mcfg = tokenized_model_config(c, tokenizer)
    mesh = make_mesh(c)
    plan = batch_plan(c, mesh)
    gb = plan["global_rows"]
    if gb % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by {jax.process_count()} processes")
    per_host = gb // jax.process_count()
    streams = c.data.streams or jax.process_count()
    if c.data.streams < 0 or streams % jax.process_count() or per_host % (streams // jax.process_count()):
        raise ConfigError(f"data.streams={c.data.streams}: {streams} streams must be a multiple of the "
                          f"{jax.process_count()} processes and split each one's {per_host} rows evenly")
    tok = load_tokenizer(tokenizer)
    try:  # the renderer every data worker builds, built once here so that a recipe it refuses stops now
        chat_renderer(tok, chat_template=chat["template"], image_token=image_token(c, tok),
                      template_kwargs=chat["template_kwargs"], date=chat["date"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.chat_template={c.data.chat_template!r} with data.tokenizer={tokenizer}: "
                          f"{e.args[0]}") from None
    pipe = PipelineConfig.for_model(
        mcfg, sources=tuple(SourceSpec(n, s["path"], float(s.get("weight", 1.0))) for n, s in sorted(sources.items())),
        tokenizer=tokenizer, seq_len=c.data.seq_len, batch_size=per_host, image_mode=c.data.image_mode,
        max_tiles=c.data.max_tiles, max_tiles_per_row=c.data.max_tiles_per_row,
        image_token=image_token(c, tok), chat=chat, seed=c.train.seed,
        num_workers=c.data.num_workers,
        read_threads=c.data.read_threads, read_buffer=c.data.read_buffer,
        max_rejects_in_a_row=c.data.max_rejects_in_a_row)
    return Setup(mcfg, pipe, mesh, per_host, streams, plan)


def batch_plan(c: RunConfig, mesh) -> dict:
    """The global batch of a step on `mesh`: rows per device per micro-step x the batch shards
    (mesh data x fsdp) x micro-steps (gradient accumulation), in rows and tokens.

    A recipe states either `train.rows_per_device` (the batch then grows with the mesh, as a
    pod recipe should) or `train.global_batch_size` (checked to split into micro-steps of whole
    rows per device). Raises ConfigError naming the keys when neither or both disagree.

        {"rows_per_device": 1, "batch_shards": 128, "micro_batches": 10, "global_rows": 1280,
         "tokens_per_step": 5242880}
    """
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    micro, per_device, gb = c.train.micro_batches, c.train.rows_per_device, c.train.global_batch_size
    if micro < 1 or per_device < 0 or gb < 0:
        raise ConfigError(f"train.micro_batches={micro}, train.rows_per_device={per_device}, "
                          f"train.global_batch_size={gb}: must be >= 1, >= 0, >= 0")
    if per_device:
        if gb and gb != per_device * shards * micro:
            raise ConfigError(f"train.global_batch_size={gb} disagrees with train.rows_per_device={per_device} x "
                              f"{shards} batch shards (mesh data x fsdp) x train.micro_batches={micro} = "
                              f"{per_device * shards * micro}; set one of them (0 leaves it to the other)")
        gb = per_device * shards * micro
    elif not gb or gb % micro or (gb // micro) % shards:
        raise ConfigError(f"train.global_batch_size={gb} with train.micro_batches={micro} gives micro-batches of "
                          f"{gb / micro:g} rows, not a whole number of rows for each of the mesh's data x fsdp = "
                          f"{shards} batch shards; state train.rows_per_device instead (the global batch is then "
                          f"rows_per_device x {shards} x {micro})")
    return {"rows_per_device": gb // micro // shards, "batch_shards": shards, "micro_batches": micro,
            "global_rows": gb, "tokens_per_step": gb * c.data.seq_len}


# ---------------------------------------------------------------------------------------------
# 2. Optimizer and the jitted train step
# ---------------------------------------------------------------------------------------------

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "source_ids", "images")


def _micro_loss(mcfg, num_sources, loss_chunk, trainable, frozen, mb, total_tokens):
    hidden, unembed = structure.forward_hidden(mcfg, structure.combine(trainable, frozen), mb["tokens"],
                                               mb["positions"], mb["segment_ids"], mb["images"])
    nll = token_nll(hidden[:, :-1], mb["tokens"][:, 1:], unembed, loss_chunk)
    mask = mb["loss_mask"][:, 1:].astype(jnp.float32)
    onehot = jax.nn.one_hot(mb["source_ids"][:, 1:], num_sources) * mask[..., None]
    per_source = (jnp.einsum("bt,bts->s", nll, onehot), jnp.sum(onehot, axis=(0, 1)))
    return jnp.sum(nll * mask) / total_tokens, per_source


def _all_finite(tree) -> jax.Array:
    """True iff no floating-point leaf of `tree` holds a NaN or an Inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all() if leaves else jnp.bool_(True)


def make_train_step(mcfg, tx, num_sources: int, micro_batches: int, loss_chunk: int = 0, mesh=None):
    """state = {trainable, opt_state, step, bad_steps}; returns (state, metrics).
    `loss_chunk` > 0: the LM head and cross-entropy run that many positions at a time.
    `mesh`: traced under it, so the models pin activations to the batch axes (`shard_batch`)."""

    def step_fn(state, frozen, batch):
        if mesh is None:
            return _step(state, frozen, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _step(state, frozen, batch)

    def _step(state, frozen, batch):
        trained = jnp.sum(batch["loss_mask"][:, 1:])  # tokens with a target in the whole global batch
        total = jnp.maximum(trained.astype(jnp.float32), 1.0)
        # Micro-batch j is rows j, j + k, j + 2k, ... (k micro-batches): each device's contiguous
        # rows hold a share of every micro-batch, so each micro-step runs on all devices and the
        # batch is never moved between devices (a contiguous split would put micro-batch 0 on
        # the first devices only and make XLA shuffle rows across the mesh).
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
                             .swapaxes(0, 1), batch)
        grad_fn = jax.value_and_grad(_micro_loss, argnums=3, has_aux=True)

        def accumulate(carry, mb):
            loss, grads, src_nll, src_cnt = carry
            (mb_loss, (s_nll, s_cnt)), g = grad_fn(mcfg, num_sources, loss_chunk, state["trainable"], frozen, mb, total)
            return (loss + mb_loss, jax.tree.map(jnp.add, grads, g), src_nll + s_nll, src_cnt + s_cnt), None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        init = (jnp.zeros((), jnp.float32), zeros, jnp.zeros(num_sources), jnp.zeros(num_sources))
        (loss, grads, src_nll, src_cnt), _ = jax.lax.scan(accumulate, init, micro)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["trainable"])
        new_params = jax.tree.map(lambda p, u: p + u, state["trainable"], updates)
        # Accepted only if what the step would store is finite too: a finite loss and gradient
        # can still give a NaN update (e.g. from a damaged Adam moment).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((new_params, new_opt))
        # A batch with no trained token (every loss mask zero) changes nothing: no weight decay,
        # no Adam state update; counted by the loop, not a bad step.
        ok = finite & (trained > 0)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        bad = state["bad_steps"]
        new_state = {"trainable": keep(new_params, state["trainable"]), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1,
                     "bad_steps": jnp.where(finite, jnp.where(trained > 0, jnp.zeros_like(bad), bad), bad + 1)}
        # The global batch's non-padding tokens (for tokens/s and MFU), counted where the whole
        # batch is: no host-side all-gather of per-host counts.
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "trained_tokens": trained,
                   "seq_tokens": jnp.sum(batch["segment_ids"] > 0),
                   "source_nll": src_nll, "source_tokens": src_cnt, "bad_steps": new_state["bad_steps"],
                   "tiles": jnp.sum(batch["tokens"] == mcfg.image_token_id) // mcfg.tokens_per_tile}
        return new_state, metrics

    return step_fn


def _is_mllm(x) -> bool:
    return isinstance(x, dict) and bool(set(structure.LLM_COMPONENTS) & set(x))


def _layer_axis(sharding, add: bool):
    """A stacked leaf's sharding from its layers' (add) or the reverse: the layer axis unsharded."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, P(None, *spec) if add else P(*spec[1:]))


@functools.lru_cache(maxsize=None)
def _stacker(out_sharding, n: int, donate: bool):  # one jitted function per layout, compiled per shape
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out_sharding,
                   donate_argnums=tuple(range(n)) if donate else ())


@functools.lru_cache(maxsize=None)
def _unstacker(out_sharding):
    return jax.jit(lambda x: tuple(x), out_shardings=out_sharding)


def to_step_layout(mcfg, tree, *, donate: bool = True):
    """`tree` (the frozen parameters, the train state: any pytree whose MLLM parameter dicts
    have `llm` / `branch` components, optimizer moments included) in the layout the step
    reads: with `model.scan_layers` the LLM's and the branch's layers stacked
    (`structure.stack_layers`), so the step's scan loops read weights, gradients and Adam
    moments in place instead of stacking copies every step; unchanged otherwise.

    Each stacked leaf is built on its devices with its layers' sharding plus a leading
    unsharded layer axis. `donate`: the per-layer buffers are freed leaf by leaf, so the
    conversion holds at most one leaf twice. ShapeDtypeStructs are converted too (AOT
    planning: `tools.aot_memory`). Inverse: `to_named_layout`."""

    def stack(leaves):
        first = leaves[0]
        out = _layer_axis(getattr(first, "sharding", None), add=True)
        if isinstance(first, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=out)
        with warnings.catch_warnings():  # a stacked leaf cannot reuse the donated buffers; they are freed
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return _stacker(out, len(leaves), donate)(*leaves)

    return jax.tree.map(lambda x: structure.stack_layers(mcfg, x, stack) if _is_mllm(x) else x, tree,
                        is_leaf=_is_mllm)


def to_named_layout(tree):
    """Inverse of `to_step_layout` (the arguments are kept): the `layers_{i}` layout that
    checkpoints, export and inference use, each layer sharded as before stacking."""

    def unstack(leaf):
        out = _layer_axis(getattr(leaf, "sharding", None), add=False)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=out)] * leaf.shape[0]
        return list(_unstacker(out)(leaf))

    return jax.tree.map(lambda x: structure.unstack_layers(x, unstack) if _is_mllm(x) else x, tree,
                        is_leaf=_is_mllm)


def opt_state_shardings(tx, trainable, mesh):
    """Each optimizer-state copy of the parameters (Adam's mu, nu) sharded like them; counts
    and other scalars replicated. (`jax.jit(tx.init)` alone leaves the zeros replicated:
    9 GB per device instead of 1.1 GB for stage 2 at paper scale on 8 devices.)"""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, trainable),
                                 jax.tree.map(lambda x: x.sharding, trainable),
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def build_optimizer(config, mcfg, trainable):
    """`make_optimizer` with the recipe's `optim.*` and `train.steps`."""
    o = config.optim
    return make_optimizer(trainable, lr=o.lr, warmup_steps=o.warmup_steps, steps=config.train.steps, b1=o.b1,
                          b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                          vit_layer_decay=o.vit_layer_decay, num_vit_layers=mcfg.vision.num_layers,
                          vit_lr_scale=o.vit_lr_scale)


def on_mesh(sharding, mesh):
    """`sharding` if it is a mesh sharding, else replicated over the mesh (e.g. optimizer counts)."""
    return sharding if isinstance(sharding, NamedSharding) else NamedSharding(mesh, P())


def batch_sharding(mesh):
    """Rows split over the mesh's batch axes (data x fsdp), the rest replicated."""
    return NamedSharding(mesh, P(models.BATCH_AXES))


def to_global(batch: dict, mesh) -> dict:
    """This host's rows (its data streams' batches) -> global arrays sharded over the batch axes:
    process i's rows are rows [i B/n, (i + 1) B/n) of the global batch."""
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k])) for k in BATCH_KEYS}


class BatchPrefetcher:
    """The next global batch, prepared while the current step runs: host assembly (`next` of
    the data iterator) and the host->device copy (`to_global`) in a background thread, `depth`
    batches ahead (0: in the caller's thread, nothing ahead). Each item is (device batch, the
    iterator's state after that batch, its statistics then), so a checkpoint records
    the position of the last batch trained, not of the one prepared ahead. An error of the
    iterator (e.g. `RejectionStreakError`) is raised by the `next` that would have returned
    its batch."""

    def __init__(self, data_iter, mesh, depth: int):
        self._it, self._mesh, self._stop = data_iter, mesh, threading.Event()
        self._queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = threading.Thread(target=self._fill, daemon=True, name="batch-prefetch") if depth else None
        if self._thread is not None:
            self._thread.start()

    def _item(self):
        rows = next(self._it)
        return to_global(rows, self._mesh), self._it.get_state(), self._it.stats  # stats: a fresh dict

    def _fill(self):
        while not self._stop.is_set():
            try:
                item = self._item()
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self):
        item = self._queue.get() if self._thread is not None else self._item()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stops the background thread (a batch it prepared is dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def any_host_stops(requested: bool) -> bool:
    """Whether any process was asked to stop (SIGTERM), agreed by all: every host then saves
    and stops after the same step. A SIGTERM reaches the hosts of a pod at different times;
    hosts that each followed their own flag would enter different collectives (save vs step)
    and hang. One all-gather of one integer per step (none with one process)."""
    if jax.process_count() == 1:
        return requested
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.array(int(requested), np.int32))).any())


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints: trainable state + optimizer + step + data-iterator state; base by fingerprint
# ---------------------------------------------------------------------------------------------


# Files Orbax writes into a step directory after `_StepChecksums` has run (its commit).
_WRITTEN_AT_COMMIT = {"_CHECKPOINT_METADATA", "commit_success.txt"}
_DAMAGED_DIR = "damaged_checkpoints"


class _StepChecksums:
    """Orbax's post-finalization callback: once every process has written step `step` and
    before Orbax commits it (renames the temporary directory, or writes commit_success.txt on
    gs://), the primary process records the step's files in its checksums.json, so that a
    committed step always carries them. `step` is set by `save_checkpoint`."""

    def __init__(self, workdir: str):
        self.directory, self.step = paths.path(workdir) / "checkpoints", None

    def __call__(self) -> None:
        if jax.process_index() != 0 or self.step is None:
            return
        # Local disk: Orbax writes into STEP.orbax-checkpoint-tmp*, renamed at the commit; gs://: STEP.
        pending = sorted(self.directory.glob(f"{self.step}.orbax-checkpoint-tmp*"))
        step_dir = pending[-1] if pending else self.directory / str(self.step)
        try:
            checksums.write_manifest(step_dir, exclude=_WRITTEN_AT_COMMIT)
        except OSError as e:  # the step is still committed, unverifiable; training goes on
            log.error("checkpoint step %d: could not record checksums in %s: %s", self.step, step_dir, e)


def newest_intact_step(mngr: ocp.CheckpointManager, workdir: str) -> int | None:
    """The newest checkpoint step whose files are what was written, or None. Each damaged newer
    step is reported by path and moved to WORKDIR/damaged_checkpoints/ (kept for inspection;
    the run saves that step again), so a resume falls back to the newest intact step."""
    while (step := mngr.latest_step()) is not None:
        problems = step_damage(workdir, step)
        if problems is None:
            warn_unverified(workdir, step)
        if not problems:
            return step
        damaged = paths.path(workdir) / _DAMAGED_DIR / str(step)
        if jax.process_index() == 0:  # moves it; the others wait, then list the steps again
            damaged.parent.mkdir(parents=True, exist_ok=True)
            n = 1
            while damaged.exists():
                damaged, n = paths.path(workdir) / _DAMAGED_DIR / f"{step}.{n}", n + 1
            (paths.path(workdir) / "checkpoints" / str(step)).rename(damaged)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"genieblue_jax damaged step {step} moved")
        mngr.reload()
        if jax.process_index() == 0:
            older = mngr.latest_step()
            print(f"checkpoint step {step} is damaged ({checksums.summary(problems, 3)}): moved to {damaged}; "
                  f"resuming from {'scratch' if older is None else f'step {older}'}", flush=True)
    return None


class _DataState:
    """A data-iterator state for Grain's Orbax checkpoint handler, which writes one file per
    process (`data/process_{i}-of-{n}.json`): each host saves and restores its own streams.
    Saving takes a snapshot, so the iterator can move on while the checkpoint is written."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        """The snapshot as UTF-8 JSON bytes, what the handler writes to this process's file."""
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        """Takes the bytes the handler read from this process's file back as the state dict."""
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Nothing to start: the handler calls it after `set_state`, and this holds no iterator."""
        pass


def save_checkpoint(mngr, checksummer: _StepChecksums, step: int, state, data_state: dict, meta: dict) -> None:
    """Starts the async save of step `step` (state, this process's data state, meta); the step's
    checksums.json is written before Orbax commits it (`_StepChecksums`)."""
    from grain.checkpoint import CheckpointSave
    mngr.wait_until_finished()  # the previous step's checksums are written before `step` is set
    checksummer.step = step
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                            data=CheckpointSave(_DataState(data_state)),
                                            meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(mngr, step: int, abstract_state):
    """(state, this process's data-iterator state, meta) of checkpoint `step`."""
    from grain.checkpoint import CheckpointRestore
    out = restore_step(mngr, step, state=abstract_state, data=CheckpointRestore(_DataState()))
    return out["state"], out["data"].state, out["meta"]


# ---------------------------------------------------------------------------------------------
# 4. The loop
# ---------------------------------------------------------------------------------------------


# Fields a resumed run may change: how long it trains and how it logs, checkpoints and reads
# (nothing that changes what a step computes, nor the form of the checkpointed data position).
# Any other difference from the config a workdir's checkpoints were trained with is an error
# naming the keys (check_resumable). Not data.num_workers: Grain checkpoints the position of
# worker processes in another form than its in-process iterator's, and a state of one form
# does not restore into the other (a resume 0 -> 2 workers would fail inside Grain).
RESUMABLE = ("train.steps", "train.log_every", "train.max_bad_steps", "train.peak_flops_per_device",
             "checkpoint.every_steps", "checkpoint.keep", "data.read_threads", "data.read_buffer",
             "data.max_rejects_in_a_row", "data.prefetch", "demo.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(config: RunConfig, workdir: str) -> None:
    """Raises ConfigError naming every differing key when `workdir` holds checkpoints trained
    with a config that differs from `config` in anything but `RESUMABLE` fields (a second
    trainer with another learning rate would otherwise resume the first one's run and overwrite
    its config.json). Nothing to check in a workdir without checkpoints."""
    ckpts = paths.path(workdir) / "checkpoints"
    if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        return
    saved = _flat(read_config(workdir).to_dict())
    now = _flat(with_resolved_choices(config, workdir).to_dict())  # "auto" as recorded

    def same(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN

    differing = sorted(k for k in set(saved) | set(now)
                       if not same(saved.get(k, "<absent>"), now.get(k, "<absent>")) and not k.startswith(RESUMABLE))
    if differing:
        shown = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now"
                          for k in differing[:8])
        raise ConfigError(f"{workdir} holds checkpoints trained with another config ({shown}"
                          f"{f'; +{len(differing) - 8} more' if len(differing) > 8 else ''}); a resumed run may "
                          f"change only {', '.join(RESUMABLE)}*. Use another --workdir for a new run")


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and exits
    cleanly. A second SIGTERM before that (a step or a data read that does not end) stops the
    process at once (KeyboardInterrupt out of train(); the last checkpoint stays the newest)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt("a second SIGTERM: stopping now, without a checkpoint of this step")
        log.warning("SIGTERM received: saving a checkpoint and stopping (a second SIGTERM stops at once)")
        self.requested = True

    def restore(self):
        """Reinstalls the SIGTERM handler that was in place before this one (call when the run ends)."""
        signal.signal(signal.SIGTERM, self._previous)


def train(config: RunConfig, workdir: str, *, step_hooks=()) -> dict:
    """Runs (or resumes) a recipe; returns the final metrics.

    Metrics: every step's row (loss, grad norm, LR, throughput, per-source losses) updates the
    progress bar; `metrics.jsonl` and TensorBoard get the row of every `train.log_every`-th step
    and of the run's last step (the final step, or the step a SIGTERM stopped at). Where stderr
    is no terminal (pod workers, CI, `nohup`) there is no bar: every host prints one plain line
    per such row, tagged with its process index (`MetricsWriter.plain_line`). The
    non-finite check runs on every step.

    `step_hooks`: callables, each called as `hook(step, row)` after every step on every process
    (`step` counts completed steps, from 1; `row` is that step's metrics dict, the keys of a
    metrics.jsonl row, whether or not the row is written), before the step's checkpoint is
    considered, like CLU's periodic actions: profiling, evaluation, early stopping (raise).

    The host waits for the device only at log steps (`train.log_every`), checkpoint steps and
    the last step; there the metrics of every step since are fetched and checked in order
    (hooks run then), and a SIGTERM is agreed on by all hosts and honoured. Meanwhile the next
    batch is prepared `data.prefetch` batches ahead (`BatchPrefetcher`).

    The workdir is held for the run (`WorkdirLock`: a flock on local disk, a renewed lease on
    gs://): a second trainer on it gets WorkdirInUseError naming the holder.

    `config` is the typed recipe (`run_config.RunConfig`; an ml_collections recipe becomes one
    with `RunConfig.from_dict(recipe.to_dict())`, as `experiments.run` does).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"train() takes a genieblue_jax.run_config.RunConfig, got {type(config).__name__}; "
                        "an ml_collections recipe becomes one with RunConfig.from_dict(recipe.to_dict())")
    with WorkdirLock(workdir):
        return _train(config, workdir, step_hooks)


def _train(config: RunConfig, workdir: str, step_hooks) -> dict:
    workdir_path = paths.path(workdir)
    config = with_resolved_choices(config, workdir)  # config.json records what "auto" chose
    check_resumable(config, workdir)  # on every process, before config.json is replaced
    setup = resolve(config, workdir)
    if jax.process_index() == 0:  # the recipe and the model config it resolved to (every shape)
        workdir_path.mkdir(parents=True, exist_ok=True)
        write_config(workdir, config, setup.mcfg)
    mcfg, mesh = setup.mcfg, setup.mesh
    b = setup.batch
    if jax.process_index() == 0:
        print(f"batch: {b['rows_per_device']} rows/device x {b['batch_shards']} batch shards x {b['micro_batches']} "
              f"micro-steps = {b['global_rows']} rows ({b['tokens_per_step']} token slots) per step, read as "
              f"{setup.streams} data streams by {jax.process_count()} processes", flush=True)
    params = init_params(config, setup.mcfg, setup.mesh)
    trainable, frozen = structure.partition(params, config.train.stage)
    del params
    fingerprint = base_fingerprint(frozen)  # of the named layout, as `workdir.load_trained` computes it
    # From here on parameters and Adam moments are in the step's layout (`to_step_layout`);
    # checkpoints and the result are in the named one.
    trainable, frozen = to_step_layout(mcfg, (trainable, frozen))
    tx = build_optimizer(config, mcfg, trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    state = {"trainable": trainable, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
             "bad_steps": jnp.zeros((), jnp.int32)}
    # Everything on the mesh (scalars replicated), so the step's outputs match its inputs.
    state = jax.device_put(state, jax.tree.map(lambda x: on_mesh(x.sharding, mesh), state))
    meta = {"stage": config.train.stage, "variant": mcfg.structure.name, "base_fingerprint": fingerprint,
            "base_source": {"llm": config.init.llm_checkpoint or f"random(seed={config.train.seed})",
                            "vision": config.init.vit_checkpoint or f"random(seed={config.train.seed})"},
            "packages": versions.package_versions()}
    data_iter = build_streams(setup.pipeline, setup.streams)
    checksummer = _StepChecksums(workdir)
    mngr = checkpoint_manager(workdir, config.checkpoint.keep, checksummer=checksummer, training=True)
    start = newest_intact_step(mngr, workdir)
    if start is not None:
        state, data_state, saved_meta = restore_checkpoint(mngr, start, to_named_layout(abstract_like(state)))
        state = to_step_layout(mcfg, state)
        if saved_meta["base_fingerprint"] != fingerprint:
            raise ConfigError(f"{workdir}: checkpoint at step {start} was trained on another frozen base "
                              f"({saved_meta['base_source']}, fingerprint {saved_meta['base_fingerprint']}); this "
                              f"run's base ({meta['base_source']}) has fingerprint {fingerprint}")
        changed = versions.changed_versions(saved_meta.get("packages", {}), meta["packages"])
        if changed:  # results after the resume may differ from an uninterrupted run's
            log.warning("resuming step %d with other package versions than it was saved with "
                        "(name: (saved, installed)): %s", start, changed)
        data_iter.set_state(data_state)
        print(f"resuming from step {start} ({os.path.join(workdir, 'checkpoints')})", flush=True)
    step_fn = make_train_step(mcfg, tx, len(setup.pipeline.packing.sources), config.train.micro_batches,
                              config.train.loss_chunk, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    jit_step = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.train.peak_flops_per_device)
    writer = metrics_lib.MetricsWriter(workdir, setup.pipeline.packing.sources,
                                       step_flops=metrics_lib.step_flops(
                                           mcfg, config.train.stage, rows=setup.batch["global_rows"],
                                           seq_len=config.data.seq_len, attention_chunk=config.model.attention_chunk),
                                       peak_flops=peak * jax.device_count(), start_step=int(state["step"]))
    preemption = _Preemption()
    lr_schedule = schedule(config.optim.lr, config.optim.warmup_steps, config.train.steps)  # for logging
    total_steps = config.train.steps
    every, ckpt_every = config.train.log_every, config.checkpoint.every_steps
    batches = BatchPrefetcher(data_iter, mesh, config.data.prefetch)
    last, data_state = {}, None
    try:
        step = int(state["step"])
        writer.start(step, total_steps, desc=f"{config.train.stage} {mcfg.structure.name}")
        pending, t_window = [], time.perf_counter()  # steps dispatched, their metrics still on device
        while step < total_steps:
            batch, data_state, data_stats = next(batches)
            state, m = jit_step(state, frozen, batch)
            step += 1
            pending.append((step, m, data_stats))
            # The host waits for the device only at log, checkpoint and last steps (the same steps
            # on every host: the preemption check there is a collective), so the next batch is
            # assembled while this step runs. Every step's metrics are checked there, in order.
            if step % every and step % ckpt_every and step < total_steps:
                continue
            fetched = jax.device_get([m for _, m, _ in pending])
            step_time, t_window = (time.perf_counter() - t_window) / len(pending), time.perf_counter()
            for (s, _, stats), m in zip(pending, fetched):
                if not m["ok"] and m["trained_tokens"] == 0:
                    writer.skipped += 1
                    log.warning("step %d: the batch has no trained token (every loss mask is zero); nothing updated", s)
                elif not m["ok"]:
                    writer.skipped += 1
                    log.warning("step %d: non-finite loss, gradient or update; update skipped", s)
                    if int(m["bad_steps"]) >= config.train.max_bad_steps:
                        mngr.wait_until_finished()
                        good = mngr.latest_step()
                        raise FloatingPointError(
                            f"{int(m['bad_steps'])} non-finite steps in a row at step {s}; stopping. " +
                            (f"The last good checkpoint is step {good} in {workdir}/checkpoints" if good is not None
                             else "No checkpoint was saved (no step was finite since the start)"))
                last = writer.row(s, m, lr=float(lr_schedule(s)), step_time=step_time, data_stats=stats)
                for hook in step_hooks:
                    hook(s, last)
                if s % every == 0 or s == total_steps:
                    writer.write(last)
            pending = []
            stop = any_host_stops(preemption.requested)
            if stop and step % every and step < total_steps:
                writer.write(last)
            # Never during a run of non-finite steps: a bad step's checkpoint would rotate a good
            # one out (checkpoint.keep), and the stop message points at the last good one.
            in_bad_streak = int(fetched[-1]["bad_steps"]) > 0  # an accepted step resets it to 0
            if (step % ckpt_every == 0 or step == total_steps or stop) and not in_bad_streak:
                save_checkpoint(mngr, checksummer, step, to_named_layout(state), data_state, meta)
            elif in_bad_streak and (step % ckpt_every == 0 or stop):
                log.warning("step %d: no checkpoint written during non-finite steps", step)
            if stop:
                mngr.wait_until_finished()
                print(f"stopped by SIGTERM after step {step}; checkpoint saved. Run the same command to resume.",
                      flush=True)
                break
    finally:
        batches.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        preemption.restore()
    return {"step": step, **last, "workdir": workdir, "base_fingerprint": fingerprint,
            "state": to_named_layout(state), "frozen": to_named_layout(frozen)}
