"""PyTorch modules for the parts of a GenieBlue model that have no transformers class.

The VILA projector (2x2 token downsampler + LayerNorm -> Linear -> GELU -> Linear), with
the exact token and channel order of `genieblue_jax.models.projector.vila_downsample`, so
weights exported from JAX give the same features in PyTorch:

    >>> proj = VilaProjector.from_params(projector_cfg, params["projector"])   # doctest: +SKIP
    >>> feats = proj(vision_tokens)     # (b, g*g, vision_hidden) -> (b, ceil(g/2)^2, llm_hidden)

Tensor names (`PROJECTOR_TABLE` in `genieblue_jax.hf.tables`): layer_norm.{weight,bias},
linear_1.{weight,bias}, linear_2.{weight,bias}. Needs torch (the `export` extra).

And the whole model of a `tools.to_torch` export, assembled from its transformers / PEFT
parts (`load_torch_mllm` -> `GenieBlueTorch`), with the routing and the image-token
writing of `genieblue_jax.GenieBlue`:

    >>> model = load_torch_mllm("/export/mllm")                       # doctest: +SKIP
    >>> model.logits(ids, mask)                       # text: the base LLM     # doctest: +SKIP
    >>> model.logits(ids, mask, images=tiles)       # multimodal LLM (+ LoRA) # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np
import torch
from torch import nn

from data_pipelines import images as image_lib
from genieblue_jax import models
from genieblue_jax.export import to_torch
from genieblue_jax.export.to_torch import FORMAT_VERSION, MANIFEST_FILE, projector_tensors
from genieblue_jax.hf.tables import PROJECTOR_TABLE, resolve
from genieblue_jax.inference.requests import checked_tiles
from genieblue_jax.jsonfile import read_json
from genieblue_jax.models.configs import ProjectorConfig


def vila_downsample(tokens: torch.Tensor) -> torch.Tensor:
    """(b, g*g, c) -> (b, ceil(g/2)^2, 4c), as `genieblue_jax.models.projector.vila_downsample`
    (see its docstring for the worked example: the output grid is transposed, VILA's quirk)."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} vision tokens do not form a square grid")
    x = tokens.reshape(b, g, g, c)
    pad = g % 2
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
    h = (g + pad) // 2
    x = x.reshape(b, 2 * h, h, 2 * c).transpose(1, 2).reshape(b, h, h, 4 * c)
    return x.reshape(b, h * h, 4 * c)


def place_image_features(embeds: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Input embeddings (b, t, d) with their image-token slots (`is_image` (b, t) bool) filled by
    `features` (..., d), in row-major order: the i-th image token of the batch gets the i-th
    feature vector (as `structure.mllm` places them in JAX). ValueError when the counts differ."""
    flat = features.reshape(-1, features.shape[-1])
    if int(is_image.sum()) != flat.shape[0]:
        raise ValueError(f"{int(is_image.sum())} image tokens but {flat.shape[0]} image features")
    return embeds.masked_scatter(is_image[..., None], flat.to(embeds.dtype))


class VilaProjector(nn.Module):
    """`forward(vision_tokens (b, g*g, vision_hidden)) -> (b, ceil(g/2)^2, llm_hidden)`."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_norm = nn.LayerNorm(cfg.in_features, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(cfg.in_features, cfg.llm_hidden_size)
        self.linear_2 = nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """(b, g*g, vision_hidden) -> (b, ceil(g/2)^2, llm_hidden)."""
        x = self.layer_norm(vila_downsample(vision_tokens))
        return self.linear_2(nn.functional.gelu(self.linear_1(x)))  # exact erf GELU, as VILA

    @classmethod
    def from_params(cls, cfg: ProjectorConfig, params) -> "VilaProjector":
        """The projector with our (JAX) parameters `params` loaded, in eval mode."""
        module = cls(cfg)
        module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                                for k, v in projector_state_dict(cfg, params).items()})
        return module.eval()


def projector_state_dict(cfg: ProjectorConfig, params) -> dict[str, np.ndarray]:
    """Our projector parameters (nested or flat) -> {torch name: numpy array} (kernels
    transposed to torch's (out, in)); every parameter exactly once, shapes checked.
    (`export.to_torch.projector_tensors`, which needs no torch.)"""
    return projector_tensors(cfg, params)


def projector_params_from_state_dict(cfg: ProjectorConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """The inverse of `projector_state_dict` (e.g. to read a projector.safetensors back)."""
    abstract = models.flatten(models.abstract_params(cfg))
    mapping = resolve(PROJECTOR_TABLE, abstract)
    missing = sorted(name for name, _ in mapping.values() if name not in tensors)
    extra = sorted(set(tensors) - {name for name, _ in mapping.values()})
    if missing or extra:
        raise ValueError(f"projector tensors: missing {missing}, unexpected {extra}")
    return models.unflatten({path: transform.to_ours(np.asarray(tensors[name]))
                             for path, (name, transform) in mapping.items()})


# --- the assembled model of a `tools.to_torch` export --------------------------------------

MODES = ("text", "multimodal", "shared")


def _long(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"token ids / attention mask must be integers, got {t.dtype}")
    return t.long()


class GenieBlueTorch(nn.Module):
    """A GenieBlue MLLM in PyTorch: `base_llm` (text requests), `multimodal_llm` (image
    requests; a transformers model, or a `peft.PeftModel` when the LoRA is kept apart),
    `vision` (SiglipVisionModel) and `projector` (VilaProjector). Made by `load_torch_mllm`.

    `logits` / `forward` / `generate` mirror `genieblue_jax.GenieBlue`: ids (b, t), an HF
    attention mask (1 = token, 0 = pad; left or right), images (b, P, S, S, 3) NHWC tiles
    (uint8 as `data_pipelines.images.to_tiles` cuts them, or normalised float pixel values),
    each row's in the order of its image tokens, all of them used (P * 16 image tokens per
    row for a 16-token tile). Positions restart at the first token of
    every row: mask [0, 0, 1, 1, 1] gives positions [0, 0, 0, 1, 2].
    """

    def __init__(self, base_llm: nn.Module, multimodal_llm: nn.Module, vision: nn.Module, projector: VilaProjector,
                 manifest: dict):
        super().__init__()
        self.base_llm, self.multimodal_llm, self.vision, self.projector = base_llm, multimodal_llm, vision, projector
        self.manifest = dict(manifest)
        self.image_token_id = int(manifest["image_token_id"])
        self.tokens_per_tile = int(manifest["tokens_per_tile"])
        self.select_layer = int(manifest["select_layer"])
        self.image_size = int(manifest["image_size"])

    def image_features(self, tiles) -> torch.Tensor:
        """(b, P, S, S, 3) NHWC tiles -> (b, P * tokens_per_tile, llm_hidden): SigLIP's
        `select_layer` hidden state -> projector, each tile's tokens in tile order. uint8 tiles
        are normalised as HF's `SiglipImageProcessor` does (`images.normalize`); float tiles
        are taken as normalised pixel values."""
        x = tiles.cpu().numpy() if isinstance(tiles, torch.Tensor) and tiles.dtype == torch.uint8 else tiles
        if not isinstance(x, torch.Tensor):
            x = checked_tiles(x)
            x = torch.as_tensor(image_lib.normalize(x) if x.dtype == np.uint8 else x)
        s = self.image_size
        if x.dim() != 5 or tuple(x.shape[2:]) != (s, s, 3):
            raise ValueError(f"images must be (batch, P, {s}, {s}, 3) normalised NHWC tiles, got shape "
                             f"{tuple(x.shape)}")
        b, p = x.shape[:2]
        param = next(self.vision.parameters())
        pixels = x.reshape(b * p, s, s, 3).permute(0, 3, 1, 2).to(param.device, param.dtype)
        if self.select_layer == -1:
            tokens = self.vision(pixel_values=pixels).last_hidden_state
        else:  # the raw hidden state, as genieblue_jax's VisionConfig.select_layer
            tokens = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer]
        feats = self.projector(tokens.to(next(self.projector.parameters()).dtype))
        return feats.reshape(b, p * feats.shape[1], feats.shape[2])

    def _mode(self, mode: str | None, has_images: bool) -> str:
        mode = mode or ("multimodal" if has_images else "text")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {MODES}")
        if mode == "text" and has_images:
            raise ValueError("mode='text' runs the base LLM alone and takes no images; use mode='multimodal'")
        return mode

    def _inputs(self, input_ids, attention_mask, images, mode):
        """(llm, input embeddings, mask, positions) of a request batch."""
        ids = _long(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else _long(attention_mask).reshape(ids.shape)
        mode = self._mode(mode, images is not None)
        llm = self.base_llm if mode == "text" else self.multimodal_llm
        device = llm.get_input_embeddings().weight.device
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = llm.get_input_embeddings()(ids)
        is_image = (ids == self.image_token_id) & (mask != 0)
        if images is not None:
            feats = self.image_features(images)
            if feats.shape[0] != ids.shape[0]:
                raise ValueError(f"images hold {feats.shape[0]} rows, input_ids {ids.shape[0]}")
            counts = is_image.sum(-1)
            for row in torch.nonzero(counts != feats.shape[1]).flatten().tolist():
                raise ValueError(f"row {row}: the input has {int(counts[row])} image tokens (id {self.image_token_id}) "
                                 f"but its images give {feats.shape[1]} features "
                                 f"({feats.shape[1] // self.tokens_per_tile} tiles x "
                                 f"{self.tokens_per_tile} tokens)")
            embeds = place_image_features(embeds, is_image, feats)  # row r's i-th image token gets feats[r, i]
        elif mode != "text" and bool(is_image.any()):
            raise ValueError(f"input_ids hold image tokens (id {self.image_token_id}) but no images were given")
        return llm, embeds, mask, positions

    def forward(self, input_ids, attention_mask=None, images=None, mode: str | None = None) -> torch.Tensor:
        """Logits (b, t, vocab) float32, with autograd (use `logits` for inference)."""
        llm, embeds, mask, positions = self._inputs(input_ids, attention_mask, images, mode)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.logits.float()

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None, images=None, mode: str | None = None) -> torch.Tensor:
        """Next-token logits (b, t, vocab) float32. `mode` defaults to "multimodal" with
        images and "text" (the base LLM alone) without; "shared" runs the multimodal LLM on
        text. Logits at padding positions are meaningless."""
        return self.forward(input_ids, attention_mask, images, mode)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, images=None, mode: str | None = None, *,
                 max_new_tokens: int = 32, stop_tokens=()) -> list[list[int]]:
        """Greedy decoding with transformers' KV cache; a reference, not a fast server.
        Rows must be left-padded (their last column a token). Returns each row's new tokens,
        up to and including its first stop token."""
        llm, embeds, mask, positions = self._inputs(input_ids, attention_mask, images, mode)
        if not bool((mask[:, -1] != 0).all()):
            raise ValueError("generate needs left padding: every row's last column must be a token "
                             "(attention_mask[:, -1] == 1)")
        stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=mask.device)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        rows: list[list[int]] = [[] for _ in range(mask.shape[0])]
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for r in torch.nonzero(~done).flatten().tolist():
                rows[r].append(int(nxt[r]))
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                      past_key_values=out.past_key_values, use_cache=True)
        return rows


def _read_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST_FILE)
    manifest = read_json(out_dir, MANIFEST_FILE, "not a tools.to_torch export")
    if manifest.get("format") != "genieblue_torch" or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                         f"this genieblue_jax reads genieblue_torch version {FORMAT_VERSION}")
    return manifest


def _from_pretrained(cls, path: str, torch_dtype, **kw):
    """`cls.from_pretrained` that fails on any missing / unexpected / misshapen tensor."""
    model, info = cls.from_pretrained(path, dtype=torch_dtype, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"{path}: transformers loaded it with {problems}")
    return model.eval()


def load_torch_mllm(out_dir: str, *, merge_lora: bool = True, torch_dtype=torch.float32,
                    attn_implementation: str | None = None) -> GenieBlueTorch:
    """Assembles a `tools.to_torch` export as a `GenieBlueTorch`.

    The LoRA adapter (if the export kept one) is loaded with PEFT; with `merge_lora` it is
    folded in (`merge_and_unload`), otherwise `multimodal_llm` stays a `peft.PeftModel`.
    The adapter file must hold exactly the LoRA tensors PEFT creates from its config
    (`layers_to_transform`, `target_modules`), or this raises naming the difference.
    """
    import safetensors.torch
    import transformers

    manifest = _read_manifest(out_dir)
    parts = manifest["parts"]
    if not manifest.get("multimodal"):
        have = sorted(p for p, d in parts.items() if d)
        raise ValueError(f"{out_dir} is an export of a model that is not multimodal (parts {have}); load "
                         f"base_llm with transformers.AutoModelForCausalLM.from_pretrained")
    for name in ("base_llm", "multimodal_llm", "vision_tower", "projector"):
        if not parts.get(name) or not os.path.isdir(os.path.join(out_dir, parts[name])):
            raise FileNotFoundError(f"{out_dir}: part {name!r} is missing (manifest: {parts.get(name)!r})")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    auto = transformers.AutoModelForCausalLM
    base = _from_pretrained(auto, os.path.join(out_dir, parts["base_llm"]), torch_dtype, **kw)
    mm = _from_pretrained(auto, os.path.join(out_dir, parts["multimodal_llm"]), torch_dtype, **kw)
    if parts.get("lora_adapter"):
        import peft
        adapter_dir = os.path.join(out_dir, parts["lora_adapter"])
        mm = peft.PeftModel.from_pretrained(mm, adapter_dir).eval()
        stored = set(safetensors.torch.load_file(os.path.join(adapter_dir, to_torch.ADAPTER_WEIGHTS_FILE)))
        created = set(peft.get_peft_model_state_dict(mm))
        if stored != created:
            raise ValueError(f"{adapter_dir}: PEFT's adapter config creates LoRA tensors "
                             f"{sorted(created - stored)[:4]} that the file lacks, and the file holds "
                             f"{sorted(stored - created)[:4]} it does not use")
        if merge_lora:
            mm = mm.merge_and_unload().eval()
    elif manifest.get("lora_layers") and not manifest.get("merge_lora"):
        raise FileNotFoundError(f"{out_dir}: the manifest lists LoRA layers {manifest['lora_layers']} but the export "
                                "has no lora_adapter/")
    vision = _from_pretrained(transformers.SiglipVisionModel, os.path.join(out_dir, parts["vision_tower"]),
                              torch_dtype)
    proj_dir = os.path.join(out_dir, parts["projector"])
    with open(os.path.join(proj_dir, to_torch.PROJECTOR_CONFIG_FILE)) as f:
        cfg = models.config_from_dict(json.load(f))
    projector = VilaProjector(cfg)
    projector.load_state_dict(safetensors.torch.load_file(os.path.join(proj_dir, to_torch.PROJECTOR_WEIGHTS_FILE)))
    projector = projector.to(torch_dtype).eval()
    return GenieBlueTorch(base, mm, vision, projector, manifest).eval()
