"""A GenieBlue model -> PyTorch / Hugging Face directories (`python -m tools.to_torch`).

    >>> from genieblue_jax.export.to_torch import export_torch
    >>> export_torch(genieblue_jax.load("workdirs/stage2_skip"), "/export/mllm")   # doctest: +SKIP

What OUT holds (a whole multimodal model; `OUT/README.md` says the same for the user):

    base_llm/             the frozen base LLM in its family's class (Qwen2 / Llama / Qwen3 / Gemma3 /
                          SmolLM3 ForCausalLM; `hf_writer.llm_config_to_hf`) (config.json +
                          safetensors) + the tokenizer files; runs every text-only request
    multimodal_llm/       the LLM of image requests: the base with the replicated blocks swapped
                          in (genieblue), the base itself (lora), the trained LLM (full);
                          LoRA folded in with merge_lora=True; the tokenizer files too

Each LLM directory is what `transformers` needs to chat and stop as genieblue_jax does: the
tokenizer (tokenizer.json / .model, tokenizer_config.json, ...), `chat_template.jinja` (the
template the model renders with: its own, or `data_pipelines.chat.CHATML_JINJA` for a model
rendered in ChatML; tokenizer_config.json's copy of a template is dropped, so there is one),
`generation_config.json` (the source's, with `eos_token_id` = every token generation stops at:
`GenieBlue.requests.stop_tokens`) and config.json's `eos_token_id` / `bos_token_id` /
`pad_token_id` (from the tokenizer's named tokens, else generation_config.json's).
    lora_adapter/         PEFT LoRA adapter for multimodal_llm (absent when merged or when no
                          block has LoRA): adapter_config.json + adapter_model.safetensors
    vision_tower/         SiglipVisionModel (select_layer in genieblue_export.json + the manifest)
    projector/            projector.safetensors (VilaProjector's names) + config.json
    genieblue_torch.json  the manifest: structure, routing, image tokens, which parts exist
    README.md             how to load each part (transformers, PEFT, `load_torch_mllm`)

Nothing here imports torch: the files are written by safetensors' numpy API, so a TPU
host without torch can export. Loading them needs torch (`torch_modules.load_torch_mllm`).

The adapter reproduces our LoRA exactly: ours is y = x W + b + (x A) B * alpha / r with A
(in, r), B (r, out); PEFT's is y = W x + b + B' (A' x) * lora_alpha / r with
lora_A.weight A' = A^T (r, in) and lora_B.weight B' = B^T (out, r), on the layers of
`layers_to_transform`:

    >>> from genieblue_jax import structure
    >>> mcfg = structure.MLLMConfig.from_presets("tiny-qwen2", "tiny-siglip",
    ...     structure.StructureConfig(variant="genieblue", placement="post", interval=2, lora_rank=4))
    >>> lora_layers(mcfg), mcfg.structure.selected_layers(4)      # 4 layers: 2 replicated, 2 LoRA
    ((0, 1), (2, 3))
    >>> cfg = adapter_config(mcfg)
    >>> cfg["r"], cfg["lora_alpha"], cfg["layers_to_transform"], cfg["target_modules"][:2]
    (4, 16, [0, 1], ['q_proj', 'k_proj'])
    >>> adapter_tensor_name("layers_1/mlp/down_proj/lora_b", mcfg.llm)
    'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'

CogVLM is not exportable: its visual experts route image tokens to their own weights inside
a block, which no transformers / PEFT architecture expresses (`UnsupportedVariantError`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np

import genieblue_jax
from data_pipelines.tokenizer import ASSET_FILES, read_assets
from genieblue_jax import models, paths, structure
from genieblue_jax.api import GenieBlue
from genieblue_jax.export.hf_writer import hf_names, save_llm, save_vision, write_safetensors
from genieblue_jax.hf.tables import PROJECTOR_TABLE, resolve
from genieblue_jax.models.configs import DTYPES

MANIFEST_FILE = "genieblue_torch.json"
README_FILE = "README.md"
FORMAT_VERSION = 2   # 2: "tokens_per_tile", preprocessing "max_tiles" (were *_patch*)
PARTS = ("base_llm", "multimodal_llm", "lora_adapter", "vision_tower", "projector")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PROJECTOR_WEIGHTS_FILE = "projector.safetensors"
PROJECTOR_CONFIG_FILE = "config.json"
SUPPORTED_VARIANTS = ("genieblue", "lora", "full")
# PEFT's PeftModelForCausalLM keeps the transformers model under `base_model.model.`.
PEFT_PREFIX = "base_model.model."
# Tokenizer files copied from the model's tokenizer directory when present (the chat template and
# generation_config.json are written from what the model renders and stops at: `_write_chat_files`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
# SigLIP input normalisation (data_pipelines.images.normalize): pixels / 255, then (x - mean) / std.
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


class UnsupportedVariantError(ValueError):
    """The model's structure has no PyTorch / Hugging Face equivalent (CogVLM's experts)."""


# --- the pieces ----------------------------------------------------------------------------

def lora_layers(mcfg) -> tuple[int, ...]:
    """Indices of the multimodal decoder's LoRA blocks (PEFT's `layers_to_transform`)."""
    return tuple(i for i, kind in enumerate(mcfg.layer_kinds) if kind == "lora")


def _alpha(alpha: float):
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def adapter_config(mcfg) -> dict[str, Any]:
    """PEFT's adapter_config.json for the model's LoRA (`peft.LoraConfig` fields; the ones
    left out keep PEFT's defaults: no DoRA, no rsLoRA, no rank / alpha patterns)."""
    s = mcfg.structure
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": int(s.lora_rank), "lora_alpha": _alpha(s.lora_alpha),
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(s.lora_targets),
        "layers_to_transform": list(lora_layers(mcfg)), "layers_pattern": "layers",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_tensor_name(path: str, llm_cfg) -> str:
    """PEFT's tensor name of one of our LoRA leaves (`layers_{j}/.../lora_a` or `lora_b`)."""
    stem, leaf = path.rsplit("/", 1)
    if leaf not in ("lora_a", "lora_b"):
        raise ValueError(f"{path!r} is not a LoRA leaf (lora_a / lora_b)")
    weight = hf_names(llm_cfg.family, llm_cfg)[stem + "/kernel"]  # model.layers.{j}....q_proj.weight
    return f"{PEFT_PREFIX}{weight[: -len('.weight')]}.lora_{leaf[-1].upper()}.weight"


def _check_branch(mcfg, branch) -> dict:
    """The branch, flat, checked leaf by leaf against the structure's layout."""
    flat = models.flatten(dict(branch or {}))
    want = models.flatten(structure.abstract_branch(mcfg))
    problems = [f"missing branch leaf {p!r}" for p in sorted(set(want) - set(flat))]
    problems += [f"unexpected branch leaf {p!r}" for p in sorted(set(flat) - set(want))]
    problems += [f"branch leaf {p!r} has shape {tuple(np.shape(flat[p]))}, the structure needs "
                 f"{tuple(want[p].shape)}" for p in sorted(set(want) & set(flat))
                 if tuple(np.shape(flat[p])) != tuple(want[p].shape)]
    if problems:
        raise ValueError(f"the branch does not match the {mcfg.structure.name} structure: " + "; ".join(problems[:8])
                         + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return flat


def adapter_tensors(mcfg, branch) -> dict[str, np.ndarray]:
    """{PEFT name: array} of every LoRA leaf of the branch: lora_A.weight = lora_a^T (r, in),
    lora_B.weight = lora_b^T (out, r). Empty when no block has LoRA."""
    flat = _check_branch(mcfg, branch)
    return {adapter_tensor_name(p, mcfg.llm): np.asarray(v).T for p, v in flat.items()
            if p.endswith(("/lora_a", "/lora_b"))}


def multimodal_llm_params(mcfg, base_llm, branch, *, merge_lora: bool) -> dict:
    """The dense LLM tree of the multimodal path: the base with the branch's blocks swapped
    in; LoRA folded in (`structure.fold_lora`) or left out (it goes to the adapter)."""
    _check_branch(mcfg, branch)
    if merge_lora:
        return structure.fold_lora(mcfg, base_llm, branch or {})[0]
    flat = models.flatten(structure.multimodal_llm_params(base_llm, branch or {}))
    return models.unflatten({p: v for p, v in flat.items() if not p.endswith(("/lora_a", "/lora_b"))})


def projector_tensors(cfg, params) -> dict[str, np.ndarray]:
    """Our projector parameters (nested or flat) -> {torch name: numpy array} (kernels
    transposed to torch's (out, in)); every parameter exactly once, shapes checked."""
    flat = models.flatten(dict(params))
    abstract = models.flatten(models.abstract_params(cfg))
    if set(flat) != set(abstract):
        raise ValueError(f"projector parameters {sorted(flat)} do not match the config's {sorted(abstract)}")
    out = {}
    for path, (name, transform) in resolve(PROJECTOR_TABLE, abstract).items():
        if tuple(np.shape(flat[path])) != tuple(abstract[path].shape):
            raise ValueError(f"projector parameter {path!r} has shape {np.shape(flat[path])}, "
                             f"the config needs {tuple(abstract[path].shape)}")
        out[name] = transform.to_hf(np.asarray(flat[path]))
    return out


# --- the export ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TorchExport:
    """What `export_torch` wrote: OUT, {part: its directory}, every file, the manifest."""
    out_dir: str
    parts: dict
    files: tuple[str, ...]
    manifest: dict

    def sizes(self) -> dict[str, int]:
        """Bytes stored per part (and the manifest + README as "metadata"), local or gs://."""
        out: dict[str, int] = {}
        for f in self.files:
            rel = f[len(self.out_dir.rstrip("/")) + 1:].split("/")
            key = rel[0] if len(rel) > 1 else "metadata"
            out[key] = out.get(key, 0) + paths.path(f).stat().length
        return out


def check_exportable(model) -> None:
    """Raises, naming the culprit, if `model` cannot be exported (before anything is written)."""
    if not isinstance(model, GenieBlue):
        raise TypeError(f"export_torch needs a genieblue_jax.GenieBlue (genieblue_jax.load(path)), "
                        f"got {type(model).__name__}")
    if model.is_mllm:
        variant = model.mcfg.structure.variant
        if variant not in SUPPORTED_VARIANTS:
            raise UnsupportedVariantError(
                f"{model.path or 'this model'} is a {model.mcfg.structure.name} model: variant {variant!r} cannot "
                f"be exported to PyTorch. Its visual experts route image tokens to their own weights inside "
                f"each expert block, which no transformers / PEFT architecture expresses. Supported variants: "
                f"{', '.join(SUPPORTED_VARIANTS)}")
        return
    unknown = sorted(set(model.configs) - {"llm", "vision"})
    if unknown or not model.configs:
        raise ValueError(f"{model.path or 'this model'} holds components {sorted(model.configs)}; a model that is "
                         f"not a multimodal one can be exported only as 'llm' (-> base_llm) and 'vision' "
                         f"(-> vision_tower), not {unknown or 'nothing'}")


def _prepare_out(out_dir: str, overwrite: bool) -> str:
    out_dir = paths.local_dir(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"--out {out_dir} already exists and is not empty ({sorted(os.listdir(out_dir))[:6]}); "
                              f"pass --overwrite (overwrite=True) to replace the export in it")
    return out_dir


def copy_tokenizer(src: str | None, dst_dir: str) -> list[str]:
    """Copies the tokenizer file(s) of `src` (a file or a directory, local or gs://) into the
    local dst_dir; a SentencePiece model of any name becomes tokenizer.model. A file comes with
    the `TOKENIZER_FILES` beside it (its tokenizer_config.json, ...), as a directory does."""
    if not src:
        return []
    source = paths.path(src)

    def copy(f, name: str) -> str:  # epath's copy, as checkpoint assets are copied
        dst = os.path.join(dst_dir, name)
        f.copy(paths.path(dst), overwrite=True)
        return dst

    if source.is_file():
        if src.endswith(".json"):
            name = "tokenizer.json"
        elif src.endswith(".model"):
            name = "tokenizer.model"
        else:
            raise ValueError(f"tokenizer {src}: unknown format (expected tokenizer.json or a SentencePiece .model)")
        beside = [n for n in TOKENIZER_FILES if n in ASSET_FILES and (source.parent / n).is_file()]
        return [copy(source, name)] + [copy(source.parent / n, n) for n in beside]
    if not source.is_dir():
        raise FileNotFoundError(f"the model's tokenizer {src} does not exist")
    copied = [copy(source / name, name) for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(os.path.basename(f) in ("tokenizer.json", "tokenizer.model") for f in copied):
        spm = sorted(f.name for f in source.iterdir() if f.name.endswith(".model"))
        if len(spm) != 1:
            raise FileNotFoundError(f"the model's tokenizer directory {src} holds no tokenizer.json / tokenizer.model"
                                    + (f" and several .model files {spm}" if spm else ""))
        copied.append(copy(source / spm[0], "tokenizer.model"))
    return copied


def _absolute(p: str) -> str:
    return p if paths.is_remote(p) else os.path.abspath(p)  # abspath would make gs://b/x "CWD/gs:/b/x"


def _write_json(path: str, content) -> str:
    with open(path, "w") as f:
        json.dump(content, f, indent=2, default=str)  # default: e.g. a workdir's metadata values
        f.write("\n")
    return path


def export_torch(model, out_dir: str, *, merge_lora: bool = False, dtype: str = "float32",
                 overwrite: bool = False) -> TorchExport:
    """Writes `model` (a `GenieBlue`, or a path `genieblue_jax.load` reads) as PyTorch /
    Hugging Face directories under `out_dir` (layout in the module docstring), a local
    directory or a gs:// one.

    `merge_lora` folds the LoRA into multimodal_llm (no lora_adapter/); `dtype` ("float32",
    "bfloat16", "float16") is the storage dtype of every tensor. A model that is not a
    multimodal one (an LLM import) exports its components alone: base_llm (and/or
    vision_tower), with `"multimodal": false` in the manifest. Everything is written into a
    temporary directory next to OUT and moved in at the end, so a failed export leaves OUT
    as it was; with `overwrite`, only the parts an export writes are replaced in OUT. A gs://
    OUT is made in a local temporary directory first (the system's TMPDIR), then copied.
    """
    if isinstance(model, (str, os.PathLike)):
        model = genieblue_jax.load(os.fspath(model))
    check_exportable(model)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {DTYPES}")
    if paths.is_remote(out_dir):
        return _export_to_remote(model, os.fspath(out_dir), merge_lora=merge_lora, dtype=dtype, overwrite=overwrite)
    out_dir = _prepare_out(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 mode would become OUT's when the stage is renamed
    stage = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(stage)
    try:
        parts, tokenizer = _write_parts(model, stage, merge_lora=merge_lora, dtype=dtype)
        manifest = _manifest(model, parts, tokenizer, merge_lora=merge_lora, dtype=dtype)
        _write_json(os.path.join(stage, MANIFEST_FILE), manifest)
        with open(os.path.join(stage, README_FILE), "w") as f:
            f.write(readme(manifest))
        entries = sorted(os.listdir(stage))
        if os.path.isdir(out_dir):
            for name in (*PARTS, MANIFEST_FILE, README_FILE):  # an earlier export's parts, e.g. its adapter
                old = os.path.join(out_dir, name)
                if os.path.isdir(old):
                    shutil.rmtree(old)
                elif os.path.exists(old):
                    os.remove(old)
            for name in entries:
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
            os.rmdir(stage)
        else:
            os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    files = []
    for name in entries:
        full = os.path.join(out_dir, name)
        if os.path.isdir(full):
            files += sorted(os.path.join(full, f) for f in os.listdir(full))
        else:
            files.append(full)
    return TorchExport(out_dir, {p: os.path.join(out_dir, p) for p, d in manifest["parts"].items() if d},
                       tuple(files), manifest)


def _export_to_remote(model, out_dir: str, *, merge_lora: bool, dtype: str, overwrite: bool) -> TorchExport:
    """export_torch to a gs:// (any remote) OUT: made in a local temporary directory, then
    copied (`paths.written_locally`); OUT's earlier parts are replaced, with `overwrite` only,
    once the new export exists in full."""
    with paths.written_locally(out_dir, replace=(*PARTS, MANIFEST_FILE, README_FILE), overwrite=overwrite,
                               prefix="genieblue_torch_") as local_dir:
        local = export_torch(model, local_dir, merge_lora=merge_lora, dtype=dtype)
        names = [os.path.relpath(os.path.join(root, f), local_dir) for root, _, fs in os.walk(local_dir) for f in fs]
    out = paths.path(out_dir)
    files = [os.fspath(out.joinpath(*name.split(os.sep))) for name in names]
    return TorchExport(os.fspath(out), {p: os.fspath(out / p) for p in local.parts}, tuple(sorted(files)),
                       local.manifest)


def _token_ids(model) -> dict[str, Any]:
    """{"eos_token_id", "bos_token_id", "pad_token_id"} of the model's tokenizer: eos = every token
    generation stops at (`requests.stop_tokens`; an int when one), bos / pad = the tokenizer's named
    tokens (tokenizer_config.json), else generation_config.json's; None where neither says."""
    assets = read_assets(model.tokenizer_path)
    generation = assets.generation_config or {}
    out: dict[str, Any] = {}
    for key in ("bos", "pad"):
        name = assets.special_tokens.get(f"{key}_token")
        try:
            out[f"{key}_token_id"] = model.tokenizer.token_id(name) if name else generation.get(f"{key}_token_id")
        except KeyError:
            out[f"{key}_token_id"] = generation.get(f"{key}_token_id")
    stops = [int(i) for i in model.requests.stop_tokens]
    out["eos_token_id"] = stops[0] if len(stops) == 1 else (stops or None)
    return out


def _write_chat_files(model, llm_dir: str, token_ids: dict) -> list[str]:
    """What transformers needs to chat with and stop an exported LLM as genieblue_jax does (module
    docstring), beside the config.json `save_llm` wrote with `token_ids` (`_token_ids`): the
    tokenizer, chat_template.jinja, generation_config.json."""
    if not model.tokenizer_path:
        return []
    written = copy_tokenizer(model.tokenizer_path, llm_dir)
    renderer = model.requests.template
    tokenizer_config = os.path.join(llm_dir, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):  # one template in the export: the one the model renders with
        with open(tokenizer_config) as f:
            config = json.load(f)
        if config.pop("chat_template", None) is not None:
            _write_json(tokenizer_config, config)
    if renderer is not None:
        with open(os.path.join(llm_dir, CHAT_TEMPLATE_FILE), "w") as f:
            f.write(renderer.template_source)
        written.append(os.path.join(llm_dir, CHAT_TEMPLATE_FILE))
    generation = {**(read_assets(model.tokenizer_path).generation_config or {}),
                  **{k: v for k, v in token_ids.items() if v is not None}}
    if generation:
        written.append(_write_json(os.path.join(llm_dir, GENERATION_CONFIG_FILE), generation))
    return written


def _write_parts(model, stage: str, *, merge_lora: bool, dtype: str):
    parts = dict.fromkeys(PARTS)
    llm_cfg = model.configs.get("llm")
    token_ids = _token_ids(model) if model.tokenizer_path else {}
    if llm_cfg is not None:
        save_llm(os.path.join(stage, "base_llm"), llm_cfg, model.params["llm"], dtype, token_ids=token_ids)
        parts["base_llm"] = "base_llm"
    tokenizer = _write_chat_files(model, os.path.join(stage, "base_llm"), token_ids) if llm_cfg else []
    if not model.is_mllm:
        if "vision" in model.configs:
            save_vision(os.path.join(stage, "vision_tower"), model.configs["vision"], model.params["vision"], dtype)
            parts["vision_tower"] = "vision_tower"
        return parts, tokenizer
    mcfg, params = model.mcfg, model.params
    branch = params.get("branch") or {}
    save_llm(os.path.join(stage, "multimodal_llm"), mcfg.llm,
             multimodal_llm_params(mcfg, params["llm"], branch, merge_lora=merge_lora), dtype, token_ids=token_ids)
    _write_chat_files(model, os.path.join(stage, "multimodal_llm"), token_ids)
    parts["multimodal_llm"] = "multimodal_llm"
    adapter = {} if merge_lora else adapter_tensors(mcfg, branch)
    if adapter:
        d = os.path.join(stage, "lora_adapter")
        os.makedirs(d)
        write_safetensors(os.path.join(d, ADAPTER_WEIGHTS_FILE), adapter, {"format": "pt"}, dtype=dtype,
                          check_finite=True)
        _write_json(os.path.join(d, ADAPTER_CONFIG_FILE), adapter_config(mcfg))
        parts["lora_adapter"] = "lora_adapter"
    save_vision(os.path.join(stage, "vision_tower"), mcfg.vision, params["vision"], dtype)
    parts["vision_tower"] = "vision_tower"
    d = os.path.join(stage, "projector")
    os.makedirs(d)
    write_safetensors(os.path.join(d, PROJECTOR_WEIGHTS_FILE), projector_tensors(mcfg.projector, params["projector"]),
                      {"format": "pt"}, dtype=dtype, check_finite=True)
    _write_json(os.path.join(d, PROJECTOR_CONFIG_FILE), mcfg.projector.to_dict())
    parts["projector"] = "projector"
    return parts, tokenizer


def _manifest(model, parts: dict, tokenizer: list[str], *, merge_lora: bool, dtype: str) -> dict:
    tok = next((f"base_llm/{os.path.basename(f)}" for f in tokenizer
                if os.path.basename(f) in ("tokenizer.json", "tokenizer.model")), None)
    renderer = model.requests.template if tok else None
    m: dict[str, Any] = {
        "format": "genieblue_torch", "format_version": FORMAT_VERSION,
        "genieblue_jax_version": genieblue_jax.__version__, "multimodal": model.is_mllm,
        "parts": parts, "tokenizer": tok, "merge_lora": bool(merge_lora), "dtype": dtype,
        "chat": {"template": CHAT_TEMPLATE_FILE if renderer is not None else None,
                 "rendering": renderer.kind if renderer is not None else None,
                 "template_kwargs": dict(model.chat["template_kwargs"]),
                 "stop_token_ids": [int(i) for i in model.requests.stop_tokens] if tok else []},
        "source": {"path": _absolute(model.path) if model.path else None, **model.source},
    }
    if not model.is_mllm:
        if "vision" in model.configs:
            m["select_layer"] = int(model.configs["vision"].select_layer)
        return m
    mcfg = model.mcfg
    vision = mcfg.vision
    s = mcfg.structure
    images_run = "multimodal_llm" + (" + lora_adapter" if parts["lora_adapter"] else "")
    m.update({
        "structure": {**s.to_dict(), "name": s.name}, "variant": s.variant,
        "replicated_layers": list(s.selected_layers(mcfg.llm.num_layers)) if s.variant == "genieblue" else [],
        "lora_layers": list(lora_layers(mcfg)) if s.variant in ("genieblue", "lora") else [],
        "lora_scale": s.lora_alpha / s.lora_rank,
        "image_token_id": int(mcfg.image_token_id), "tokens_per_tile": int(mcfg.tokens_per_tile),
        "image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
        "select_layer": int(vision.select_layer), "vision_use_head": bool(vision.use_head),
        "image_normalisation": {"scale": 1 / 255, "mean": IMAGE_MEAN, "std": IMAGE_STD,
                                "formula": "(pixels / 255 - 0.5) / 0.5", "layout": "NHWC tiles (b, P, S, S, 3); "
                                "SiglipVisionModel takes NCHW"},
        "preprocessing": dict(model.preprocessing),
        "routing": {"text": "base_llm", "images": images_run, "shared_mode": images_run},
    })
    return m


# --- README --------------------------------------------------------------------------------

def readme(manifest: dict) -> str:
    """The export's README.md: what each part is and how to load it."""
    m = manifest
    tok = m["tokenizer"]
    if tok and tok.endswith(".json"):
        tok_text = (f"`{tok}` (a Hugging Face `tokenizers` file): "
                    f"`transformers.PreTrainedTokenizerFast(tokenizer_file=\"OUT/{tok}\")`, "
                    f"`tokenizers.Tokenizer.from_file(...)`, or genieblue_jax's "
                    f"`data_pipelines.tokenizer.load_tokenizer(\"OUT/base_llm\")` (chat special tokens atomic).")
    elif tok:
        tok_text = (f"`{tok}` (SentencePiece): `sentencepiece.SentencePieceProcessor(model_file=\"OUT/{tok}\")` "
                    f"or genieblue_jax's `data_pipelines.tokenizer.load_tokenizer(\"OUT/base_llm\")` "
                    f"(chat special tokens atomic). transformers' AutoTokenizer does not read it for this "
                    f"architecture.")
    else:
        tok_text = "none: the model carried no tokenizer; use the one it was trained with."
    chat = m.get("chat") or {}
    if chat.get("template"):
        tok_text += (f" Each LLM directory holds `{chat['template']}`, the chat template the model renders with "
                     f"({'its own' if chat['rendering'] == 'template' else 'ChatML'}): "
                     "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives its prompt"
                     + (f" (options used in training: {chat['template_kwargs']})" if chat["template_kwargs"] else "")
                     + ".")
    if chat.get("stop_token_ids"):
        tok_text += (f" `generate` stops at every id of generation_config.json's `eos_token_id` "
                     f"{chat['stop_token_ids']}, where genieblue_jax stops.")
    lines = ["# GenieBlue model exported for PyTorch / Hugging Face",
             "",
             f"Written by genieblue_jax {m['genieblue_jax_version']} (`python -m tools.to_torch`), "
             f"tensors stored as {m['dtype']}. `genieblue_torch.json` is the machine-readable version of this file.",
             ""]
    if not m["multimodal"]:
        lines += ["This is **not a multimodal model** (an LLM / vision tower import): only its components were "
                  "exported.", ""]
        if m["parts"]["base_llm"]:
            lines += ["- `base_llm/`: the LLM. `transformers.AutoModelForCausalLM.from_pretrained(\"OUT/base_llm\")`.",
                      f"- tokenizer: {tok_text}"]
        if m["parts"]["vision_tower"]:
            lines += [f"- `vision_tower/`: `transformers.SiglipVisionModel.from_pretrained(\"OUT/vision_tower\")`; "
                      f"select_layer {m['select_layer']} (see below)."]
        return "\n".join(lines) + "\n"
    s = m["structure"]
    adapter = m["parts"]["lora_adapter"]
    what_mm = {"genieblue": f"the base LLM with the replicated blocks {m['replicated_layers']} swapped in "
                            f"(trained copies)",
               "lora": "the base LLM's weights (the multimodal path differs from it only by the LoRA)",
               "full": "the fully trained LLM (identical to base_llm: the full variant trains the LLM itself)"}
    what_mm = what_mm[m["variant"]] + ("; the LoRA is folded into its weights (`--merge_lora`)"
                                       if m["merge_lora"] and m["lora_layers"] else "")
    sel = m["select_layer"]
    sel_text = ("`last_hidden_state` (after `post_layernorm`)" if sel == -1 else
                f"`hidden_states[{sel}]` of `SiglipVisionModel(..., output_hidden_states=True)` (raw, no post "
                f"LayerNorm); the later layers{' and the pooling head' if m['vision_use_head'] else ''} are unused")
    where = f", placement `{s['placement']}`, interval {s['interval']}" if m["variant"] == "genieblue" else ""
    lora = (f", LoRA rank {s['lora_rank']}, alpha {_alpha(s['lora_alpha'])}, targets {s['lora_targets']}"
            if m["lora_layers"] else "")
    base_what = ("the frozen base LLM; every text-only request runs it" if m["variant"] != "full" else
                 "the LLM (trained: the full variant fine-tunes the LLM itself); text-only requests run it")
    lines += [
        f"Structure: **{s['name']}** (variant `{s['variant']}`{where}{lora}).",
        "",
        "## Parts",
        "",
        "| part | what | load with |",
        "|---|---|---|",
        f"| `base_llm/` | {base_what} | "
        f"`transformers.AutoModelForCausalLM.from_pretrained(\"OUT/base_llm\")` |",
        f"| `multimodal_llm/` | {what_mm} | `AutoModelForCausalLM.from_pretrained(\"OUT/multimodal_llm\")` |",
    ]
    if adapter:
        lines.append(f"| `lora_adapter/` | PEFT LoRA (r {s['lora_rank']}, lora_alpha {_alpha(s['lora_alpha'])}, scale "
                     f"{m['lora_scale']:g}) on layers {m['lora_layers']} of multimodal_llm | "
                     f"`peft.PeftModel.from_pretrained(multimodal_llm, \"OUT/lora_adapter\")` |")
    lines += [
        f"| `vision_tower/` | SigLIP; the projector reads {sel_text} | "
        f"`transformers.SiglipVisionModel.from_pretrained(\"OUT/vision_tower\")` |",
        f"| `projector/` | VILA mlp_downsample: 2x2 token merge, LayerNorm, Linear, GELU (erf), Linear; "
        f"{m['tokens_per_tile']} LLM tokens per tile | `genieblue_jax.export.torch_modules.VilaProjector` "
        f"(tensors layer_norm / linear_1 / linear_2) |",
        "",
        f"Tokenizer: {tok_text}",
        "",
        "## Routing (GenieBlue's non-shared base)",
        "",
        "- A request **without images** runs `base_llm` alone: the untouched base weights, so text quality is "
        "the original LLM's.",
        f"- A request **with images** runs `{m['routing']['images']}`: each image tile (SigLIP-normalised "
        f"`(pixels / 255 - 0.5) / 0.5`, {m['image_size']} x {m['image_size']}, cut as in training: "
        f"{m['preprocessing']}) goes through `vision_tower` and `projector` to {m['tokens_per_tile']} "
        f"embeddings, which replace the input embeddings of the prompt's image tokens (id {m['image_token_id']}, "
        f"{m['tokens_per_tile']} per tile), in reading order: the i-th image token of a row gets the i-th "
        f"feature of that row's tiles.",
        "- Positions come from the attention mask (`cumsum(mask) - 1`), so left-padded batches work.",
        "",
        "## Loading",
        "",
        "Everything assembled (needs torch, transformers, peft and genieblue_jax for the projector):",
        "",
        "```python",
        "from genieblue_jax.export.torch_modules import load_torch_mllm",
        "model = load_torch_mllm(\"OUT\")                 # LoRA merged into multimodal_llm (merge_and_unload)",
        "logits = model.logits(input_ids, attention_mask)                 # text: base_llm",
        "logits = model.logits(input_ids, attention_mask, images=tiles)  # (b, P, S, S, 3) normalised NHWC",
        "tokens = model.generate(input_ids, images=tiles, max_new_tokens=32)  # greedy, reference speed",
        "```",
        "",
        "By hand (transformers + PEFT):",
        "",
        "```python",
        "import transformers, peft",
        "text_llm = transformers.AutoModelForCausalLM.from_pretrained(\"OUT/base_llm\")",
        "mm_llm = transformers.AutoModelForCausalLM.from_pretrained(\"OUT/multimodal_llm\")",
    ]
    if adapter:
        lines += ["mm_llm = peft.PeftModel.from_pretrained(mm_llm, \"OUT/lora_adapter\").merge_and_unload()"]
    lines += [
        "vision = transformers.SiglipVisionModel.from_pretrained(\"OUT/vision_tower\")",
        ("# features = projector(vision(pixel_values=nchw).last_hidden_state)" if sel == -1 else
         f"# features = projector(vision(pixel_values=nchw, output_hidden_states=True).hidden_states[{sel}])"),
        "# embeds = mm_llm.get_input_embeddings()(ids); embeds[ids == IMAGE_TOKEN] = features (reading order)",
        "# mm_llm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))",
        "```",
        "",
    ]
    if m["variant"] == "lora" or m["variant"] == "full":
        lines += [f"Note: for the `{m['variant']}` variant `multimodal_llm/` repeats "
                  + ("the base weights" if m["variant"] == "lora" else "base_llm")
                  + " so that every export has the same layout.", ""]
    return "\n".join(lines)


__all__ = ["export_torch", "TorchExport", "UnsupportedVariantError", "adapter_config", "adapter_tensors",
           "adapter_tensor_name", "lora_layers", "multimodal_llm_params", "projector_tensors", "check_exportable",
           "readme", "MANIFEST_FILE", "PARTS", "SUPPORTED_VARIANTS"]
