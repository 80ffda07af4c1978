"""The typed run config: a recipe as one validated tree of dataclasses, what the library takes.

Recipes stay `ml_collections` configs for users (`experiments/configs/NAME.py`: `get_config(arg)`,
`--config.a.b=value` on the command line); an entry point turns one into a `RunConfig` with
`RunConfig.from_dict(config.to_dict())`, which refuses, naming the key, every unknown or
missing key, every value of the wrong type and every value outside its range or choices,
before any data, model or compile work starts (Levanter's `TrainLmConfig`, big_vision's
configs). The trainer, the workdir and the demo read only this tree.

    >>> from experiments.configs import stage2_skip
    >>> run = RunConfig.from_dict(stage2_skip.get_config("demo").to_dict())
    >>> run.model.placement, run.train.steps, run.data.seq_len
    ('skip', 150, 256)
    >>> d = stage2_skip.get_config("demo").to_dict()
    >>> d["train"]["stpes"] = 3
    >>> RunConfig.from_dict(d)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ConfigError: train.stpes: no such key (did you mean train.steps?)

Sections mirror the recipe's (`model` holds the GenieBlue structure's fields too, as users
type them: `model.variant`, `model.placement`; `RunConfig.structure()` builds the
`structure.StructureConfig`). The tree is mutable, as a recipe is before it runs; the
trainer validates it again when it starts (`validate`). `to_dict` is what a workdir's
config.json holds.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing

from data_pipelines.chat import CHAT_TEMPLATE_CHOICES, checked_template_kwargs, parse_date
from data_pipelines.images import MODES as IMAGE_MODES
from data_pipelines.records import read_manifest
from genieblue_jax import models, structure
from genieblue_jax.models.configs import DTYPES


class ConfigError(ValueError):
    """A recipe (config) the framework cannot run; the message names the config key."""


SCALES = ("demo", "paper")
FROM_SCRATCH = ("llm", "vision", "projector")  # what init.from_scratch may name
LLM_STAGES = ("full", "pretrain")  # stages that train the LLM itself (float32 masters, variant "full")
ATTENTION_IMPLS = ("auto", "xla")


@dataclasses.dataclass
class ModelConfig:
    """`model.*`: the presets (shapes) of the LLM and the ViT (an init checkpoint's shapes win),
    the GenieBlue structure, the image token, dtypes and memory / kernel settings."""
    llm: str
    vit: str
    variant: str
    placement: str
    interval: int
    lora_rank: int
    lora_alpha: float
    image_token: str
    compute_dtype: str
    base_param_dtype: str
    remat: bool
    scan_layers: bool
    attention_chunk: int
    attention_impl: str


@dataclasses.dataclass
class InitConfig:
    """`init.*`: where the frozen base comes from (`tools.from_hf` checkpoints) and the stage-1 run."""
    llm_checkpoint: str | None
    vit_checkpoint: str | None
    stage1_workdir: str | None
    from_scratch: str  # components that start from random weights, by name (FROM_SCRATCH); "" for none


@dataclasses.dataclass
class DataConfig:
    """`data.*`: sources, tokenizer and chat rendering, row shape, images, input-pipeline settings."""
    sources: str
    tokenizer: str | None
    seq_len: int
    image_mode: str
    max_tiles: int
    max_tiles_per_row: int
    num_workers: int
    read_threads: int
    read_buffer: int
    prefetch: int
    max_rejects_in_a_row: int
    demo_examples: int
    streams: int
    chat_template: str
    chat_template_kwargs: str  # a JSON object, as a command line gives it
    chat_date: str


@dataclasses.dataclass
class TrainConfig:
    """`train.*`: stage, length, batch, loss chunking, seed, logging."""
    stage: str
    steps: int
    rows_per_device: int
    global_batch_size: int
    micro_batches: int
    loss_chunk: int
    seed: int
    log_every: int
    max_bad_steps: int
    peak_flops_per_device: float


@dataclasses.dataclass
class OptimConfig:
    """`optim.*`: AdamW and its schedule, weight decay, clipping, the ViT's layer-wise decay."""
    lr: float
    warmup_steps: int
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    vit_layer_decay: float
    vit_lr_scale: float


@dataclasses.dataclass
class MeshConfig:
    """`mesh.*`: devices per axis (-1: the rest)."""
    data: int
    fsdp: int
    tensor: int


@dataclasses.dataclass
class CheckpointConfig:
    """`checkpoint.*`: how often to save and how many to keep."""
    every_steps: int
    keep: int


@dataclasses.dataclass
class DemoConfig:
    """`demo.*`: the embedded demo's assets (experiments/demo.py); demo scale only."""
    enabled: bool
    cache_dir: str
    train_examples: int
    eval_examples: int
    pretrain_examples: int
    scene: str
    pretrain_steps: int
    vision_steps: int
    stage1_steps: int
    evaluate: bool


SECTIONS = {"model": ModelConfig, "init": InitConfig, "data": DataConfig, "train": TrainConfig,
            "optim": OptimConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig, "demo": DemoConfig}

# The numeric fields' valid ranges: key -> (lowest, lowest allowed?, highest or None, highest
# allowed?). A value outside is a ConfigError naming the key (train.steps=-1 would train nothing
# and exit 0, checkpoint.keep=0 keep no checkpoint, optim.lr=-1 train uphill, data.seq_len=0 loop
# forever on rows that hold no sample). A NaN passes: the step's non-finite guard stops a run it poisons.
RANGES = {
    "train.steps": (1, True, None, False), "train.log_every": (1, True, None, False),
    "train.max_bad_steps": (1, True, None, False), "checkpoint.every_steps": (1, True, None, False),
    "checkpoint.keep": (1, True, None, False), "data.seq_len": (1, True, None, False),
    "data.max_tiles": (1, True, None, False), "data.max_tiles_per_row": (0, True, None, False),
    "data.num_workers": (0, True, None, False), "data.read_threads": (0, True, None, False),
    "data.read_buffer": (0, True, None, False), "data.max_rejects_in_a_row": (1, True, None, False),
    "data.prefetch": (0, True, None, False), "data.streams": (0, True, None, False),
    "data.demo_examples": (1, True, None, False),
    "train.loss_chunk": (0, True, None, False), "train.micro_batches": (1, True, None, False),
    "train.rows_per_device": (0, True, None, False), "train.global_batch_size": (0, True, None, False),
    "model.attention_chunk": (0, True, None, False), "model.lora_alpha": (0, False, None, False),
    "model.lora_rank": (1, True, None, False), "model.interval": (1, True, None, False),
    "optim.lr": (0, True, None, False), "optim.warmup_steps": (0, True, None, False),
    "optim.b1": (0, True, 1, False), "optim.b2": (0, True, 1, False), "optim.eps": (0, False, None, False),
    "optim.weight_decay": (0, True, None, False), "optim.clip_norm": (0, False, None, False),
    "optim.vit_layer_decay": (0, False, 1, True), "optim.vit_lr_scale": (0, True, None, False),
    "train.peak_flops_per_device": (0, True, None, False),
    "demo.train_examples": (1, True, None, False), "demo.eval_examples": (1, True, None, False),
    "demo.pretrain_examples": (1, True, None, False), "demo.pretrain_steps": (1, True, None, False),
    "demo.vision_steps": (1, True, None, False), "demo.stage1_steps": (1, True, None, False),
}
# Fields with a fixed set of values: key -> the choices.
CHOICES = {
    "model.variant": structure.VARIANTS, "model.placement": structure.PLACEMENTS,
    "model.compute_dtype": DTYPES, "model.base_param_dtype": DTYPES, "model.attention_impl": ATTENTION_IMPLS,
    "data.image_mode": IMAGE_MODES, "data.chat_template": CHAT_TEMPLATE_CHOICES,
    "train.stage": tuple(sorted(structure.STAGES)),
}


def _did_you_mean(name: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {sorted(known)}"


def _checked_value(key: str, value, kind):
    """`value` as field `key` of type `kind` holds it (an int is a float too), else ConfigError."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key}={value!r}: must be {names}, got {type(value).__name__}")


def _section(name: str, cls, d, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{name}: must be a section of keys{where}, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: no such key{where}{_did_you_mean(unknown[0], fields, name + '.')}")
    missing = [f for f in fields if f not in d]
    if missing:
        raise ConfigError(f"{name}.{missing[0]}: missing{where}")
    return cls(**{f: _checked_value(f"{name}.{f}", d[f], hints[f]) for f in fields})


@dataclasses.dataclass
class RunConfig:
    """A whole recipe: `scale` ("demo" / "paper") and its sections (the module docstring)."""
    scale: str
    model: ModelConfig
    init: InitConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    demo: DemoConfig

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "") -> "RunConfig":
        """The validated tree of a recipe as a plain dict (`ConfigDict.to_dict()`, a workdir's
        config.json). ConfigError naming the key for an unknown, missing, mistyped or
        out-of-range value; `where` (e.g. " in WORKDIR/config.json") is said after the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"a recipe is a dict of sections{where}, got {type(d).__name__}")
        top = ["scale", *SECTIONS]
        unknown = sorted(set(d) - set(top))
        if unknown:
            raise ConfigError(f"{unknown[0]}: no such key{where}{_did_you_mean(unknown[0], top, '')}")
        if "scale" not in d:
            raise ConfigError(f"scale: missing{where}")
        run = cls(scale=_checked_value("scale", d["scale"], str),
                  **{name: _section(name, sec, d.get(name, {}), where) for name, sec in SECTIONS.items()})
        run.validate()
        return run

    def to_dict(self) -> dict:
        """The tree as a JSON-able dict (what `from_dict` reads back; a workdir's config.json)."""
        return dataclasses.asdict(self)

    def copy(self) -> "RunConfig":
        """An independent copy (sections included), to change without touching this one."""
        return RunConfig.from_dict(self.to_dict())

    def get(self, key: str):
        """The value of a dotted key, e.g. `run.get("train.steps")`."""
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def structure(self) -> structure.StructureConfig:
        """The GenieBlue structure of `model.*` (variant, placement, interval, LoRA)."""
        m = self.model
        try:
            return structure.StructureConfig(m.variant, m.placement, m.interval, m.lora_rank, m.lora_alpha)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    def chat(self) -> dict:
        """How the recipe renders chats, as `GenieBlue.chat` and the pipeline take it:
        {"template", "template_kwargs" (data.chat_template_kwargs parsed), "date" (or None)}."""
        d = self.data
        return {"template": d.chat_template, "template_kwargs": _template_kwargs(d.chat_template_kwargs),
                "date": _date(d.chat_date)}

    def validate(self) -> None:
        """Every check of the recipe's own values, which needs no file, device or data: types
        (`from_dict`), ranges, choices, presets, the chat settings, the stage / variant pairing and
        data.sources' syntax. ConfigError naming the first key that fails. (What a run needs
        besides, such as the init checkpoints of a paper-scale run, `required_for_training`.)"""
        if self.scale not in SCALES:
            raise ConfigError(f"scale={self.scale!r}: choose one of {SCALES} (e.g. --config=stage2_skip:paper)")
        for key, (low, low_ok, high, high_ok) in RANGES.items():
            v = self.get(key)
            if (v < low if low_ok else v <= low) or (high is not None and (v > high if high_ok else v >= high)):
                rule = (f">= {low}" if low_ok else f"> {low}") + \
                    (f" and {'<=' if high_ok else '<'} {high}" if high is not None else "")
                raise ConfigError(f"{key}={v!r}: must be {rule}")
        for key, choices in CHOICES.items():
            if self.get(key) not in choices:
                raise ConfigError(f"{key}={self.get(key)!r}: choose one of {tuple(choices)}")
        for key in ("model.llm", "model.vit"):
            name = self.get(key)
            if name not in models.PRESETS:
                raise ConfigError(f"{key}={name!r}: no such preset{_did_you_mean(name, models.PRESETS, '')}")
        for axis, size in dataclasses.asdict(self.mesh).items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{axis}={size}: a number of devices >= 1, or -1 for the rest")
        self.structure()
        self.chat()
        if self.data.chat_template == "chatml" and _template_kwargs(self.data.chat_template_kwargs):
            raise ConfigError(f"data.chat_template_kwargs={self.data.chat_template_kwargs!r}: "
                              "data.chat_template='chatml' has no options")
        if (self.train.stage in LLM_STAGES) != (self.model.variant == "full"):
            raise ConfigError(f"train.stage={self.train.stage!r} with model.variant={self.model.variant!r}: stages "
                              f"{LLM_STAGES} (which train the LLM itself) go with variant 'full' and only with it")
        if self.data.sources:
            parse_sources(self.data.sources)
        self.from_scratch()

    def from_scratch(self) -> set[str]:
        """The components `init.from_scratch` names ("llm,vision" -> {"llm", "vision"}); ConfigError
        for a name outside FROM_SCRATCH."""
        names = {n.strip() for n in self.init.from_scratch.split(",") if n.strip()}
        unknown = sorted(names - set(FROM_SCRATCH))
        if unknown:
            raise ConfigError(f"init.from_scratch={self.init.from_scratch!r}: {unknown[0]!r} is not a component; "
                              f"name some of {FROM_SCRATCH}, comma-separated")
        return names

    def required_checkpoints(self) -> None:
        """ConfigError naming the init key a run lacks: the pretrained LLM and ViT (`tools.from_hf`
        outputs) and, for the stages after stage 1, the stage-1 workdir holding the projector,
        unless `init.from_scratch` names that component (random weights are asked for by name,
        never a silent default). Checks no file; the embedded demo fills these keys itself."""
        scratch = self.from_scratch()
        needs = [("llm", "llm_checkpoint", "a pretrained LLM (the output of tools.from_hf)"),
                 ("vision", "vit_checkpoint", "a pretrained vision tower (the output of tools.from_hf)")]
        if self.train.stage not in ("stage1", *LLM_STAGES):
            needs.append(("projector", "stage1_workdir", "the projector a stage-1 run trained (its workdir)"))
        for component, key, what in needs:
            if not getattr(self.init, key) and component not in scratch:
                raise ConfigError(f"init.{key} is not set: stage {self.train.stage!r} starts from {what}; set "
                                  f"--config.init.{key}=PATH, or ask for random weights by name: "
                                  f"--config.init.from_scratch={component}")

    def check_data_sources(self) -> None:
        """ConfigError naming the source of `data.sources` that is not a readable converted dataset
        (no such directory, a raw LLaVA JSON / chat JSONL given where its conversion belongs, a
        conversion that did not finish), with the fix; reads each manifest.json, no records."""
        for name, s in parse_sources(self.data.sources).items() if self.data.sources else ():
            if "://" in s["path"]:
                continue  # object storage: the pipeline's reader says what it takes
            try:
                read_manifest(s["path"])
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.sources: {name}={s['path']}: {e}") from None

    def required_for_training(self) -> None:
        """ConfigError naming what a training run of this recipe lacks: its init checkpoints and
        stage-1 workdir (`required_checkpoints`), data.sources and data.tokenizer (a recipe without
        them is still a valid plan, e.g. for `tools.aot_memory`)."""
        self.required_checkpoints()
        if not self.data.sources:
            raise ConfigError("data.sources is empty: give 'name=DIR:weight,name=DIR:weight,...' (python -m "
                              "experiments.run writes the demo datasets for a demo-scale run that names none)")
        if not self.data.tokenizer:
            raise ConfigError("data.tokenizer is required with data.sources")


def _template_kwargs(text: str) -> dict:
    try:
        return checked_template_kwargs(json.loads(text or "{}"))
    except ValueError as e:  # json.JSONDecodeError is one
        raise ConfigError(f"data.chat_template_kwargs={text!r}: {e}; give a JSON object, "
                          "e.g. '{\"enable_thinking\": false}'") from None


def _date(text: str) -> str | None:
    try:
        date = parse_date(text)
    except ValueError as e:
        raise ConfigError(f"data.chat_date: {e}") from None
    return date.isoformat() if date else None


def parse_sources(spec: str) -> dict[str, dict]:
    """`data.sources`, one string so that it can be given on the command line: comma-separated
    `name=DIR[:weight]` (weight 1 when left out). The text after the last colon is the weight and
    must be a number > 0, unless that colon is a URL scheme's (followed by `//`, as in
    `gs://bucket/x`): then the whole text is the path and the weight is 1. Anything else after a
    colon (`vqa=/d:6O.7`, `a=/x/y:`) is a ConfigError naming the source and the text.

        >>> parse_sources("caption=/data/caption:316.3, vqa=/data/vqa:64.7,text=/data/text")
        {'caption': {'path': '/data/caption', 'weight': 316.3}, 'vqa': {'path': '/data/vqa', 'weight': 64.7}, \
'text': {'path': '/data/text', 'weight': 1.0}}
        >>> parse_sources("vqa=gs://b/d:2,ocr=gs://b/e")
        {'vqa': {'path': 'gs://b/d', 'weight': 2.0}, 'ocr': {'path': 'gs://b/e', 'weight': 1.0}}
    """
    out: dict[str, dict] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        name, eq, rest = part.partition("=")
        name = name.strip()
        if not part or not eq or not name or not rest:
            raise ConfigError(f"data.sources={spec!r}: {part!r} is not name=DIR[:weight]")
        path, weight = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and not tail.startswith("//"):  # a weight (a URL scheme's colon is followed by //)
            try:
                path, weight = head, float(tail)
            except ValueError:
                raise ConfigError(f"data.sources={spec!r}: source {name!r} has weight {tail!r}, not a number "
                                  f"(name=DIR[:weight])") from None
            if not path:
                raise ConfigError(f"data.sources={spec!r}: source {name!r} has no DIR (name=DIR[:weight])")
        if name in out:
            raise ConfigError(f"data.sources={spec!r}: source {name!r} given twice")
        if not (weight > 0 and math.isfinite(weight)):
            raise ConfigError(f"data.sources={spec!r}: source {name!r} has weight {weight}; weights must be finite "
                              f"and > 0")
        out[name] = {"path": path, "weight": weight}
    return out
