"""The training workdir, read by whoever needs its model: the trainer, `genieblue_jax.load`,
the exporters. A workdir holds

    config.json                 the recipe (`run_config.RunConfig.to_dict()`; `read_config`) and the
                                resolved model config under "mllm_config" (every shape: `read_model_config`)
    checkpoints/<step>/         Orbax items state (trainable params + Adam), data (each
                                process's iterator state), meta (stage, variant, base
                                fingerprint); checksums.json of every file (`verified_step`)
    metrics.jsonl, tensorboard/ written by the trainer

and the recipe says how to rebuild the frozen base (`init_params`: the init checkpoints, or a
seeded random init at demo scale), checked against the fingerprint each checkpoint recorded
(`base_fingerprint`). `load_trained` puts the two together. This module sits in the checkpoint
layer: it imports nothing of the training loop (optimizer, step, data pipeline). It takes the
typed recipe (`genieblue_jax.run_config.RunConfig`), never an ml_collections config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.tokenizer import choose_image_token, load_tokenizer, read_assets
from genieblue_jax import checkpoint as model_checkpoint
from genieblue_jax import checksums, models, paths, structure
from genieblue_jax import sharding as sharding_lib
from genieblue_jax.jsonfile import read_json
from genieblue_jax.run_config import LLM_STAGES, ConfigError, RunConfig, parse_sources  # noqa: F401 (public here)

log = logging.getLogger(__name__)


def tokenizer_path(c: RunConfig, workdir: str) -> str:
    """The recipe's tokenizer: `data.tokenizer` (workdirs of versions before 2026-11-30 trained on
    the demo data without naming it: its tokenizer inside the workdir)."""
    return c.data.tokenizer or os.path.join(workdir, "demo_data", "tokenizer.model")


def image_token(c: RunConfig, tokenizer) -> str:
    """The recipe's image placeholder (`model.image_token`; "auto" picks one of the tokenizer's
    own special tokens inside the LLM's embedding table: `tokenizer.choose_image_token`);
    ConfigError naming the key when there is none or it lies outside the table."""
    rows = model_config(c, 0).llm.vocab_size
    try:
        return choose_image_token(tokenizer, rows, c.model.image_token)
    except ValueError as e:
        raise ConfigError(f"model.image_token: {e} (model.image_token={c.model.image_token!r} chooses it)") from None


def tokenized_model_config(c: RunConfig, tokenizer: str) -> structure.MLLMConfig:
    """`model_config` with the image token (`image_token`) looked up in the tokenizer (checked
    against the vocab)."""
    tok = load_tokenizer(tokenizer)
    mcfg = model_config(c, tok.token_id(image_token(c, tok)))
    rows = mcfg.llm.vocab_size
    # Ids past the embedding table are allowed only for special tokens (text never encodes to them;
    # a record the template renders one into is rejected by the pipeline): Gemma-3-1b's tokenizer
    # has <image_soft_token> one past its 262,144 rows.
    regular = sorted(set(range(rows, tok.vocab_size)) - set(tok.special_tokens.values()))
    if regular:
        raise ConfigError(f"data.tokenizer has {tok.vocab_size} tokens but the LLM's embedding table {rows} rows, "
                          f"and ids {regular[:5]}{' ...' if len(regular) > 5 else ''} past it are not special tokens "
                          "(text would encode to them): give the tokenizer the LLM was trained with")
    return mcfg


def init_component(c: RunConfig, key: str, component: str):
    """The config of `component` ("llm" / "vision") in the checkpoint `init.<key>` names. ConfigError
    naming the key for a path that is not a genieblue_jax checkpoint, or one of another component
    (a ViT given as the LLM), with what it holds."""
    path = getattr(c.init, key)
    try:
        components = model_checkpoint.read_metadata(path)["components"]
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init.{key}={path}: {e} (a checkpoint is what tools.from_hf --out writes)") from None
    if component not in components:
        held = ", ".join(f"{n} ({type(cfg).__name__})" for n, cfg in components.items())
        other = {"llm": "init.vit_checkpoint", "vision": "init.llm_checkpoint"}[component]
        wanted = "an LLM" if component == "llm" else "a vision tower"
        raise ConfigError(f"init.{key}={path} holds {held}, not {wanted}: is it the checkpoint for {other}?")
    return components[component]


def model_config(c: RunConfig, image_token_id: int) -> structure.MLLMConfig:
    """The MLLM config of a recipe: presets (or the init checkpoints' configs), dtypes, structure."""
    llm, vit = models.get_preset(c.model.llm), models.get_preset(c.model.vit)  # presets checked by RunConfig
    if c.init.llm_checkpoint:
        llm = init_component(c, "llm_checkpoint", "llm")
    if c.init.vit_checkpoint:
        vit = init_component(c, "vit_checkpoint", "vision")
    llm = llm.replace(dtype=c.model.compute_dtype, param_dtype=c.model.base_param_dtype, remat=c.model.remat,
                      attention_chunk=c.model.attention_chunk, attention_impl=c.model.attention_impl,
                      scan_layers=c.model.scan_layers)
    if c.train.stage in LLM_STAGES:
        llm = llm.replace(param_dtype="float32")  # a trained LLM keeps float32 master weights
    vit = vit.replace(dtype=c.model.compute_dtype, param_dtype="float32", remat=c.model.remat,
                      scan_layers=c.model.scan_layers)
    return structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm, dtype=c.model.compute_dtype),
                                c.structure(), image_token_id)


def with_resolved_choices(c: RunConfig, workdir: str) -> RunConfig:
    """A copy of `c` whose "auto" choices say what they chose, as a workdir records them in its
    config.json: `model.image_token` the token (`image_token`), `data.chat_template` "tokenizer"
    (the tokenizer directory has a chat template) or "chatml" (it has none). A recipe without a
    tokenizer, or one whose choices cannot be made, is returned as it is: `trainer.resolve` names
    the culprit, after the checks that come before it."""
    c = c.copy()
    if not c.data.tokenizer:
        return c
    tokenizer = tokenizer_path(c, workdir)
    try:
        c.model.image_token = image_token(c, load_tokenizer(tokenizer))
        if c.data.chat_template == "auto":
            c.data.chat_template = "chatml" if read_assets(tokenizer).chat_template is None else "tokenizer"
    except (ConfigError, OSError, ValueError):
        pass
    return c


def preprocessing(c: RunConfig) -> dict:
    """How the recipe cuts images into tiles (inference must do the same)."""
    return {"image_mode": c.data.image_mode, "max_tiles": int(c.data.max_tiles)}


# Config keys renamed since workdirs were first written: old name -> new name. A workdir's
# config.json is read with the new names; a command line with an old one is refused
# (experiments.configs.expand_config_arg).
RENAMED_KEYS = {"data.max_patches": "data.max_tiles", "data.max_patches_per_row": "data.max_tiles_per_row"}
# Config keys added since workdirs were first written: key -> the value that says what a workdir
# without it did. Workdirs from before chat templates were read rendered ChatML, piece by piece.
ADDED_KEYS = {"data.chat_template": "chatml", "data.chat_template_kwargs": "{}", "data.chat_date": "",
              "init.from_scratch": "llm,vision,projector"}  # before it, a missing checkpoint meant random weights


MLLM_CONFIG_KEY = "mllm_config"  # config.json's record of the resolved model config (every shape)


def read_config(workdir: str) -> RunConfig:
    """The recipe a workdir was trained with (its config.json), old keys (RENAMED_KEYS) under
    their new names, keys it predates (ADDED_KEYS) with the values that say what it did.
    ConfigError naming the key and the file when it is not a recipe this version runs."""
    d = read_json(workdir, "config.json", "not a training workdir")
    d.pop(MLLM_CONFIG_KEY, None)
    for old, new in RENAMED_KEYS.items():
        (section, o), (_, n) = old.split("."), new.split(".")
        if o in d.get(section, {}):
            d[section][n] = d[section].pop(o)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        d.setdefault(section, {}).setdefault(name, value)
    return RunConfig.from_dict(d, where=f" in {paths.join(workdir, 'config.json')}")


def write_config(workdir: str, c: RunConfig, mcfg: structure.MLLMConfig) -> None:
    """WORKDIR/config.json: the recipe and, under "mllm_config", the model config it resolved to
    (the init checkpoints' shapes, the image token id), which `load_trained` reads back."""
    content = {**c.to_dict(), MLLM_CONFIG_KEY: mcfg.to_dict()}
    (paths.path(workdir) / "config.json").write_text(json.dumps(content, indent=2))


def read_model_config(workdir: str) -> structure.MLLMConfig | None:
    """The model config config.json recorded (`write_config`); None for a workdir written before
    it was recorded (its model is derived from the recipe, `tokenized_model_config`)."""
    d = read_json(workdir, "config.json", "not a training workdir").get(MLLM_CONFIG_KEY)
    if d is None:
        return None
    try:
        return structure.MLLMConfig.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{paths.join(workdir, 'config.json')}: invalid {MLLM_CONFIG_KEY}: {e}") from None


def is_workdir(path: str) -> bool:
    """A training workdir: its config.json is a recipe (model / train / data sections)."""
    try:
        d = json.loads((paths.path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and {"model", "train", "data"} <= set(d)


def _shardings(tree, mesh):
    return sharding_lib.param_shardings(tree, mesh)


def init_params(config: RunConfig, mcfg: structure.MLLMConfig, mesh) -> dict:
    """All MLLM parameters of recipe `config` ({"llm", "vision", "projector", "branch"}), each
    created or loaded straight into its sharding on `mesh`: the base from the init checkpoints
    (a NaN / Inf tensor is a ConfigError naming it) or seeded at random;
    the projector from `init.stage1_workdir` when given; the branch copied from the base. A part
    without its checkpoint starts from random weights only when `init.from_scratch` names it."""
    config.required_checkpoints()
    rng = jax.random.key(config.train.seed)
    k_llm, k_vit, k_proj, k_branch = jax.random.split(rng, 4)

    def load_or_init(component, cfg, ckpt, key):
        shardings = _shardings(models.abstract_params(cfg), mesh)
        if ckpt:
            _, params, _ = model_checkpoint.restore(ckpt, mesh=mesh)
            for name, leaf in models.flatten(params[component]).items():  # a NaN base would train nothing
                if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
                    raise ConfigError(f"init checkpoint {ckpt}: tensor {component}/{name} contains NaN or Inf")
            return jax.tree.map(lambda x, s: jax.device_put(x.astype(cfg.params_dtype), s), params[component],
                                shardings)
        log.info("%s: random initialisation (init.from_scratch)", component)
        return models.init_params(cfg, key, shardings)

    params = {"llm": load_or_init("llm", mcfg.llm, config.init.llm_checkpoint, k_llm),
              "vision": load_or_init("vision", mcfg.vision, config.init.vit_checkpoint, k_vit)}
    params["projector"] = models.init_params(mcfg.projector, k_proj,
                                             _shardings(models.abstract_params(mcfg.projector), mesh))
    if config.init.stage1_workdir:
        params["projector"] = restore_trained_part(config.init.stage1_workdir, "projector", params["projector"])
    branch = structure.init_branch(mcfg, params["llm"], k_branch, _shardings(structure.abstract_branch(mcfg), mesh))
    # Trainable weights are float32 masters even when the frozen base they copy is bfloat16.
    params["branch"] = jax.tree.map(lambda x: x.astype(jnp.float32), branch)
    return params


def abstract_params(mcfg: structure.MLLMConfig, mesh) -> dict:
    """Shapes, dtypes and shardings of all parameters as `init_params` makes them (no memory)."""
    abstract = structure.abstract_mllm(mcfg)
    abstract["branch"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), abstract["branch"])
    shardings = _shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _leaf_hash(x, i):
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
    idx = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    return jnp.sum(bits * (idx * jnp.uint32(2654435761) + i.astype(jnp.uint32)), dtype=jnp.uint32)


def base_fingerprint(tree) -> str:
    """A checksum of the frozen parameters (bit patterns, order-sensitive; computed on device,
    jitted, so that it runs on arrays spread over several processes: every process gets the
    same replicated scalar per leaf)."""
    total = np.uint64(0)
    leaf_hash = jax.jit(_leaf_hash)
    for i, (name, x) in enumerate(sorted(models.flatten(tree).items())):
        h = int(leaf_hash(x, np.uint32(i + 1)))
        total = np.uint64((int(total) * 1000003 + h + len(name)) % (1 << 64))
    return f"{int(total):016x}"


def checkpoint_manager(workdir: str, keep: int, *, checksummer=None, training: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager of WORKDIR/checkpoints (items state, data, meta); with `checksummer`,
    every step it saves records its files' checksums (only the training loop saves). `training`:
    the run that owns the workdir (re)starts, so the `STEP.orbax-checkpoint-tmp-*` directories
    of saves a killed run never finished are removed (Orbax's `cleanup_tmp_directories`); a
    reader (load, chat, evaluate) never removes them, as they may be a live run's save."""
    async_options = ocp.AsyncOptions(post_finalization_callback=checksummer) if checksummer else None
    return ocp.CheckpointManager(
        paths.path(workdir) / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             async_options=async_options, cleanup_tmp_directories=training),
        item_names=("state", "data", "meta"))


def step_damage(workdir: str, step: int) -> list[str] | None:
    """Files of checkpoint `step` that differ from what was written (checksums.json), on every
    process as process 0 found them; [] if intact, None if the step has no checksums (written
    by an older genieblue_jax: unverifiable)."""
    step_dir = paths.path(workdir) / "checkpoints" / str(step)
    return checksums.checked_by_primary(lambda: checksums.manifest_damage(step_dir))


def warn_unverified(workdir: str, step: int) -> None:
    """Logs that checkpoint `step` carries no checksums (an older version wrote it)."""
    log.warning("%s/checkpoints/%d has no checksums.json (saved by an older version): not verified", workdir, step)


def verified_step(workdir: str, step: int) -> None:
    """Raises `checksums.CorruptCheckpointError` naming the damaged files of checkpoint `step`."""
    problems = step_damage(workdir, step)
    if problems:
        raise checksums.CorruptCheckpointError(os.path.join(workdir, "checkpoints", str(step)), problems)
    if problems is None:
        warn_unverified(workdir, step)


def abstract_like(tree) -> dict:
    """ShapeDtypeStructs (with the shardings) of the arrays of `tree`: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_step(mngr: ocp.CheckpointManager, step: int, *, state=None, partial: bool = False, data=None) -> dict:
    """The one way a checkpoint of a workdir is read (trainer resume, `load_trained`, the stage-1
    projector): the items of `step` through `mngr`, in one Orbax restore.

    Always `meta` (dict: stage, variant, base fingerprint, packages). With `state`, an abstract
    tree (`abstract_like`) of the state item ({"trainable", "opt_state", "step", "bad_steps"}):
    its arrays restored straight into its shardings and dtypes; with `partial`, only the leaves
    `state` names (e.g. {"trainable": ...} without Adam's moments: nothing else is read). With
    `data`, Grain's `CheckpointRestore` args: this process's data-iterator state.
    Returns {"meta": ..., "state": ..., "data": ...} (the items asked for).

    Raises ValueError naming the leaves of `state` the checkpoint does not hold (Orbax's partial
    restore would return their ShapeDtypeStructs in place of arrays, silently).
    """
    args = {"meta": ocp.args.JsonRestore()}
    if state is not None:
        args["state"] = ocp.args.PyTreeRestore(
            item=state, restore_args=ocp.checkpoint_utils.construct_restore_args(state), partial_restore=partial)
    if data is not None:
        args["data"] = data
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    if state is not None:
        missing = [n for n, x in models.flatten(out["state"]).items() if isinstance(x, jax.ShapeDtypeStruct)]
        if missing:
            raise ValueError(f"checkpoint step {step} holds no {', '.join(missing[:6])}"
                             f"{f' (+{len(missing) - 6} more)' if len(missing) > 6 else ''}")
    return out


def restore_trained_part(workdir: str, component: str, like: dict) -> dict:
    """One trained component (e.g. the stage-1 projector) from another run's latest checkpoint,
    into the shardings and dtypes of `like` (only that component is read). ConfigError when the
    workdir has no checkpoint or its stage did not train `component`."""
    recorded = read_model_config(workdir) if is_workdir(workdir) else None
    if recorded is not None:  # compared before any read: Orbax's own message is a page of TensorStore spec
        theirs = models.flatten(models.abstract_params(getattr(recorded, component)))
        ours = models.flatten(like)
        for name in sorted(set(theirs) | set(ours)):
            there = tuple(theirs[name].shape) if name in theirs else None
            here = tuple(ours[name].shape) if name in ours else None
            if there != here:
                raise ConfigError(
                    f"init.stage1_workdir={workdir} trained the {component} of another model: {component}/{name} is "
                    f"{there} there, {here} here (its LLM {recorded.llm.family} hidden size "
                    f"{recorded.llm.hidden_size}, its ViT width {recorded.vision.hidden_size}); run stage 1 with this "
                    f"run's init.llm_checkpoint and init.vit_checkpoint")
    mngr = checkpoint_manager(workdir, keep=1)
    try:
        step = mngr.latest_step()
        if step is None:
            raise ConfigError(f"init.stage1_workdir={workdir}: no checkpoint found")
        verified_step(workdir, step)
        try:
            restored = restore_step(mngr, step, state={"trainable": {component: abstract_like(like)}}, partial=True)
        except (ValueError, KeyError) as e:  # the stage, for the message: read only on this path
            stage = restore_step(mngr, step)["meta"].get("stage")
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"init.stage1_workdir={workdir} (stage {stage}) has no trained {component} "
                              f"of these shapes: {first}") from None
        return restored["state"]["trainable"][component]
    finally:
        mngr.close()


@dataclasses.dataclass
class Trained:
    """A trained model read back from a workdir (`load_trained`)."""
    mcfg: structure.MLLMConfig
    params: dict          # {"llm", "vision", "projector", "branch"}: frozen base + trained parts
    config: RunConfig     # the recipe it was trained with
    tokenizer: str        # tokenizer file path
    step: int
    meta: dict            # the checkpoint's meta (stage, variant, base fingerprint and source)


def load_trained(workdir: str, *, step: int | None = None, mesh=None) -> Trained:
    """The model of a training workdir at `step` (default: the latest checkpoint).

    The model config is the one config.json recorded (every shape, the image token id), or for
    a workdir written before it was recorded, derived from the recipe as training derived it.
    The frozen base is rebuilt exactly as training built it (from `init.llm_checkpoint` /
    `init.vit_checkpoint`, or the seeded random init of the demo) and checked against the
    fingerprint the checkpoint recorded; the trainable parts are read from the checkpoint
    (Adam's moments are not read). `mesh` defaults to the first device alone.
    """
    workdir = os.fspath(paths.path(workdir))
    config = read_config(workdir)
    tokenizer = tokenizer_path(config, workdir)
    if not paths.path(tokenizer).exists():
        raise FileNotFoundError(f"{workdir}: the tokenizer it was trained with ({tokenizer}) is missing")
    mcfg = read_model_config(workdir) or tokenized_model_config(config, tokenizer)
    mcfg = mcfg.replace(llm=mcfg.llm.replace(remat=False), vision=mcfg.vision.replace(remat=False))
    mesh = mesh if mesh is not None else sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    mngr = checkpoint_manager(workdir, keep=1)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint (has the run saved one yet?)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{workdir}/checkpoints: no step {step}; saved steps {sorted(steps)}")
        verified_step(workdir, step)
        meta = restore_step(mngr, step)["meta"]
        said = {config.structure().name, mcfg.structure.name}  # the recipe's and the recorded model's
        if said != {meta.get("variant")} or meta.get("stage") != config.train.stage:
            raise ValueError(f"{workdir}: checkpoint step {step} is {meta.get('stage')} / {meta.get('variant')}, "
                             f"but config.json says {config.train.stage} / {config.structure().name}"
                             + ("" if len(said) == 1 else f" (its {MLLM_CONFIG_KEY}: {mcfg.structure.name})"))
        params = init_params(config, mcfg, mesh)
        trainable, frozen = structure.partition(params, config.train.stage)
        fingerprint = base_fingerprint(frozen)
        if meta["base_fingerprint"] != fingerprint:
            raise ValueError(f"{workdir}: checkpoint step {step} was trained on a frozen base with fingerprint "
                             f"{meta['base_fingerprint']} ({meta['base_source']}); the base rebuilt from "
                             f"config.json has {fingerprint}. Was an init checkpoint changed or moved?")
        try:  # the trainable parameters only: Adam's moments are not read
            restored = restore_step(mngr, step, state={"trainable": abstract_like(trainable)}, partial=True)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"{workdir}/checkpoints/{step}/state: does not hold the trainable parameters of "
                             f"{mcfg.structure.name} ({config.train.stage}) that config.json describes: "
                             f"{str(e)[:400]}") from e
    finally:
        mngr.close()
    params = structure.combine(restored["state"]["trainable"], frozen)
    return Trained(mcfg, params, config, tokenizer, int(step), meta)
