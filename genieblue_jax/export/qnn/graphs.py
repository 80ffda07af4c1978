"""ONNX-friendly PyTorch graphs built from our parameters (numpy): the vision tower +
projector, and the decoder (base or multimodal) with an explicit KV cache at a fixed
context, in the Qualcomm AI-Hub / Genie style.

Every graph has static shapes. Weights are float32 tensors that the graphs *share*: a
`TensorStore` hands out one `torch.Tensor` per canonical name, so the base decoder and the
multimodal decoder reference the same base-block tensors (nothing is copied), and the ONNX
export writes each canonical tensor once (`onnx_export`).

Canonical tensor names are our parameter paths with the component in front and dots for
slashes, e.g. `llm.layers_3.self_attn.q_proj.kernel` (a base weight),
`branch.layers_0.mlp.down_proj.kernel` (a replicated block), `branch.layers_3.mlp.up_proj.lora_a`.
Layouts are ours: MatMul kernels stay (in, out) (so `y = x @ kernel`, no transpose in the
graph); exceptions, each a transformed copy under its own name:

    llm.lm_head.kernel          (hidden, vocab); with tied embeddings a transposed copy of
                                llm.embed_tokens.embedding (AIMET refuses one initializer
                                feeding both a Gather and a MatMul, and QNN quantizes the two
                                uses differently anyway)
    branch.*.lora_b             B * alpha / r: the LoRA scale folded into B, so the adapter is
                                two plain MatMuls (y = x W + (x A) B')
    vision.embeddings.patch_embedding.kernel   torch's Conv layout (out, in, kh, kw)
    *.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.scale,
    *.self_attn.{q,k}_norm.scale  Gemma 3 only: 1 + weight (Gemma3RMSNorm's unit offset
                                folded in, so every RMSNorm of every family is x_normed * scale)

Tensors that are not parameters:

    llm.rope.cos / llm.rope.sin (context, head_dim) tables, looked up by position_ids (no
                                Sin/Cos on the NPU: a 16-bit angle would lose the high
                                frequencies); the RoPE of the full-attention layers
                                (`models.llm.rope_inv_freq`: llama3 / linear scaling included)
    llm.rope_local.cos / .sin   a second pair where sliding-window layers rotate with their own
                                base (Gemma 3's rope_local_base_freq); NoPE layers (SmolLM3)
                                read no table (`rope_table_keys`)

Decoder graph (`DecoderGraph`), AR = tokens per call (prefill_len, or 1 for decode),
C = context, L layers, K KV heads, d head_dim:

    inputs   input_ids       int32   (1, AR)
             position_ids    int32   (1, AR)        RoPE position of each token (< C)
             attention_mask  float32 (1, 1, AR, C)  additive: 0 = visible, MASK_VALUE = hidden
             sliding_attention_mask   (1, 1, AR, C)  models with sliding-window layers only: the
                                                    mask of those layers (older slots hidden too)
             image_embeds    float32 (1, AR, hidden) multimodal prefill only: the projected image
             image_mask      float32 (1, AR)         features at image-token positions, 1.0 there
             past_key_i      float32 (1, K, d, C - AR)   keys after RoPE, transposed (K^T layout,
             past_value_i    float32 (1, K, C - AR, d)   so QK^T is a plain MatMul), i = 0..L-1
    outputs  logits          float32 (1, AR, vocab)
             present_key_i   float32 (1, K, d, AR)   the AR new keys / values only;
             present_value_i float32 (1, K, AR, d)   the host appends them to its cache

Attention runs over the C slots [past (C - AR) | new (AR)]; which slots a query sees is the
host's mask alone (`runtime.attention_mask`). The G = H / K query heads sharing a KV head
are folded into the rows of one (1, K, G * AR, C) product (all tensors 4-d, no KV repeat).

The block is the family's, as `models.llm.DecoderBlock` computes it (`LLMConfig` says
which): q / k RMSNorm per head before RoPE (Qwen3, Gemma 3); per layer its RoPE table or
none (NoPE) and its mask (full or sliding window); scores times `attention_scale` (Gemma 3:
query_pre_attn_scalar ** -0.5); Gemma 3's norms after attention and around the MLP, GeGLU
with tanh GELU, and embeddings times sqrt(hidden) (rounded to float32; image features
replace the scaled embeddings, as in `structure`).

Sliding-window layers keep a full C-slot cache like every other layer (the JAX generator
keeps a ring of `sliding_window` slots for them): one static cache layout for all layers,
and the window is the host's `sliding_attention_mask`, which also hides slots older than
the window. The price is cache memory: Gemma 3 1B at C = 2048 holds 26 full caches instead
of 4 full ones and 22 of 512 slots (float32: 109 MB instead of 40 MB).

The multimodal decode graph takes no image inputs (generated tokens are never image
tokens). CogVLM expert layers route each token by `image_mask` in prefill (vision_* weights
for image tokens, the original ones for text) and run the text weights in decode.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from genieblue_jax import models
from genieblue_jax.export.torch_modules import vila_downsample
from genieblue_jax.models.configs import LLMConfig, ProjectorConfig, VisionConfig
from genieblue_jax.models.llm import rope_inv_freq
from genieblue_jax.models.projector import downsampled_grid

# Additive mask value for hidden slots. Not -inf / finfo.min: the mask and the masked scores
# are 16-bit quantized activations on the NPU, and a range of [-1e38, 30] would leave no
# resolution for the real scores. exp(-100) is 4e-44, far below float32 epsilon.
MASK_VALUE = -100.0
_FINITE_CHUNK = 1 << 24  # elements per finiteness check (Gemma 3's 262k x 1152 table: 18 chunks)


def canonical(component: str, path: str) -> str:
    """Tensor name of parameter `path` of `component`.

        >>> canonical("branch", "layers_3/self_attn/q_proj/lora_a")
        'branch.layers_3.self_attn.q_proj.lora_a'
    """
    return f"{component}.{path.replace('/', '.')}"


class TensorStore:
    """One float32 torch tensor per canonical name, shared by every graph that uses it.

    `get(name, array, transpose=, scale=)` registers `array` (numpy or jax; transposed /
    scaled on the way) under `name`, or returns the tensor already registered. With
    `meta=True` the tensors live on torch's "meta" device (shapes only, no memory: what the
    ONNX export traces, so a 3B model never exists as float32 torch tensors) and
    `materialize(name)` computes one float32 array when the exporter writes it.
    `name_of(tensor)` inverts `get`, which is how an exported graph's initializers get their
    canonical names back.

        >>> store = TensorStore(meta=True)
        >>> t = store.get("llm.lm_head.kernel", np.ones((4, 2), np.float32), transpose=(1, 0))
        >>> t.shape, t.device.type, store.materialize("llm.lm_head.kernel").shape
        (torch.Size([2, 4]), 'meta', (2, 4))
    """

    def __init__(self, meta: bool = False):
        self.meta = meta
        self.tensors: dict[str, nn.Parameter] = {}
        self._sources: dict[str, tuple] = {}
        self._names: dict[int, str] = {}

    @property
    def device(self) -> str:
        """"meta" when building graphs without weights (shapes only), else "cpu"."""
        return "meta" if self.meta else "cpu"

    def get(self, name: str, array, *, transpose: tuple[int, ...] | None = None,
            scale: float | None = None, offset: float | None = None) -> nn.Parameter:
        """`array` (one of our parameters) as a frozen torch Parameter registered under `name`
        (its ONNX initializer name), optionally transposed, scaled (e.g. LoRA's alpha / r) and
        offset (Gemma 3's `1 + weight` norms), in that order, in float32. ValueError when
        `name` is registered with another shape."""
        shape = tuple(np.shape(array))
        if transpose is not None:
            shape = tuple(shape[a] for a in transpose)
        if name in self.tensors:
            t = self.tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"tensor {name!r} registered with shape {tuple(t.shape)}, now {shape}")
            return t
        self._sources[name] = (array, transpose, scale, offset)
        if self.meta:
            data = torch.empty(shape, dtype=torch.float32, device="meta")
        else:
            with warnings.catch_warnings():  # read-only numpy views of jax arrays: never written
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(self.materialize(name))
        t = nn.Parameter(data, requires_grad=False)
        self.tensors[name] = t
        self._names[id(t)] = name
        return t

    def materialize(self, name: str) -> np.ndarray:
        """The float32 (C-contiguous) array of tensor `name`; NaN / Inf are refused."""
        array, transpose, scale, offset = self._sources[name]
        out = np.asarray(array, np.float32)
        if transpose is not None:
            out = out.transpose(transpose)
        if scale is not None:
            out = out * np.float32(scale)
        if offset is not None:
            out = out + np.float32(offset)
        out = np.ascontiguousarray(out)
        flat = out.reshape(-1)
        for lo in range(0, flat.size, _FINITE_CHUNK):  # a chunk at a time: no table-sized bool array
            if not np.isfinite(flat[lo:lo + _FINITE_CHUNK]).all():
                raise ValueError(f"tensor {name!r} holds NaN or Inf")
        return out

    def name_of(self, tensor) -> str | None:
        """The registered name of a Parameter from `get`, or None."""
        return self._names.get(id(tensor))

    def names_in(self, module: nn.Module) -> dict[str, str]:
        """{parameter FQN in `module`: canonical name}; every parameter must come from this store."""
        out = {}
        for fqn, p in module.named_parameters(remove_duplicate=False):
            name = self.name_of(p)
            if name is None:
                raise ValueError(f"parameter {fqn} of {type(module).__name__} was not made by this TensorStore")
            out[fqn] = name
        return out


ROPE_TABLES = ("rope", "rope_local")  # canonical names llm.{key}.cos / llm.{key}.sin


def rope_table_keys(cfg: LLMConfig) -> tuple[str | None, ...]:
    """Per layer, the RoPE table it reads: "rope" (canonical `llm.rope.cos` / `.sin`),
    "rope_local" (`llm.rope_local.*`) or None (a NoPE layer). Layers with equal
    `LLMConfig.rope_for` share a table; the full-attention layers' RoPE is "rope", a second
    one (Gemma 3's sliding layers) "rope_local". ValueError for a third.

        >>> from genieblue_jax.models import get_preset
        >>> rope_table_keys(get_preset("gemma-3-1b"))[4:7], rope_table_keys(get_preset("smollm3-3b"))[2:4]
        (('rope_local', 'rope', 'rope_local'), ('rope', None))
    """
    keys: dict = {}
    full_first = sorted(range(cfg.num_layers), key=lambda i: cfg.layer_type(i) != "full_attention")
    for i in full_first:
        rope = cfg.rope_for(i)
        if rope is not None and rope not in keys:
            if len(keys) == len(ROPE_TABLES):
                raise ValueError(f"more than {len(ROPE_TABLES)} distinct RoPEs: {list(keys)} and {rope}")
            keys[rope] = ROPE_TABLES[len(keys)]
    return tuple(None if cfg.rope_for(i) is None else keys[cfg.rope_for(i)] for i in range(cfg.num_layers))


def rope_tables(cfg: LLMConfig, layer: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin tables (length, head_dim) float32 of layer `layer`'s RoPE for positions
    0 .. length - 1, in the "rotate half" layout, computed as `models.llm.apply_rope` does:
    angles = position * `rope_inv_freq(cfg, layer)` in float32. ValueError for a NoPE layer.

        >>> from genieblue_jax.models import get_preset
        >>> cos, sin = rope_tables(get_preset("tiny-qwen2"), 0, 8)
        >>> cos.shape, cos.dtype, float(cos[0, 0]), float(sin[1, 0]) == float(np.sin(np.float32(1)))
        ((8, 16), dtype('float32'), 1.0, True)
    """
    inv_freq = rope_inv_freq(cfg, layer, np)
    if inv_freq is None:
        raise ValueError(f"layer {layer} applies no RoPE (nope_layers={cfg.nope_layers})")
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def sliding_window(cfg: LLMConfig) -> int:
    """The window of the model's sliding-window layers, 0 when it has none (then its decoder
    graphs take no `sliding_attention_mask`)."""
    return cfg.sliding_window if any(cfg.window(i) is not None for i in range(cfg.num_layers)) else 0


def _rms_norm(x, scale, eps: float):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def _rotate(x, cos, sin):
    """x (1, heads, AR, d); cos / sin (1, 1, AR, d): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Linear(nn.Module):
    """y = x @ kernel (+ bias) (+ (x @ lora_a) @ lora_b, the LoRA scale already in lora_b)."""

    def __init__(self, kernel, bias=None, lora_a=None, lora_b=None):
        super().__init__()
        self.kernel = kernel
        self.bias = bias
        self.lora_a, self.lora_b = lora_a, lora_b

    def forward(self, x):
        """x (..., in) @ kernel (in, out) (+ bias): our Dense layout, no transpose in the graph."""
        y = torch.matmul(x, self.kernel)
        if self.bias is not None:
            y = y + self.bias
        if self.lora_a is not None:
            y = y + torch.matmul(torch.matmul(x, self.lora_a), self.lora_b)
        return y


class _Leaves:
    """Looks up the leaves of one parameter tree (flat {path: array}) and registers them in
    the store under their canonical names; remembers which leaves were used, so nothing
    is dropped silently (`ModelGraphs.unused`)."""

    def __init__(self, store: TensorStore, flat: Mapping[str, np.ndarray], names: Mapping[str, str]):
        self.store, self.flat, self.names = store, flat, names
        self.used: set[str] = set()

    def has(self, path: str) -> bool:
        """Whether the tree has leaf `path` ("layers_0/self_attn/q_proj/bias"); does not mark it used."""
        return path in self.flat

    def get(self, path: str, *, transpose: tuple[int, ...] | None = None, scale: float | None = None,
            offset: float | None = None, name: str | None = None):
        """The tensor of leaf `path` (registered under its canonical name, or `name` for a
        transformed copy); KeyError naming a missing leaf."""
        if path not in self.flat:
            raise KeyError(f"parameter {path!r} is missing (have e.g. {sorted(self.flat)[:5]})")
        self.used.add(path)
        return self.store.get(name or self.names[path], self.flat[path], transpose=transpose, scale=scale,
                              offset=offset)

    def linear(self, prefix: str, lora_scale: float | None = None) -> Linear:
        """The `Linear` of the Dense layer at `prefix`: its kernel, its bias if the tree has one,
        and its LoRA pair if it has one, with `lora_scale` (alpha / rank) folded into lora_b.
        KeyError when the kernel (or lora_b beside a lora_a) is missing."""
        bias = self.get(f"{prefix}/bias") if self.has(f"{prefix}/bias") else None
        a = b = None
        if self.has(f"{prefix}/lora_a"):
            a = self.get(f"{prefix}/lora_a")
            b = self.get(f"{prefix}/lora_b", scale=lora_scale)
        return Linear(self.get(f"{prefix}/kernel"), bias, a, b)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class _DecoderBlock(nn.Module):
    """Block `i` of the family (`models.llm.DecoderBlock`), on the graph's cache layout."""

    def __init__(self, cfg: LLMConfig, leaves: _Leaves, i: int, kind: str, lora_scale: float, routed: bool):
        super().__init__()
        p = f"layers_{i}"
        self.cfg = cfg
        self.sliding = cfg.window(i) is not None   # which of the two masks this layer reads
        self.rope = rope_table_keys(cfg)[i]        # which RoPE table, None: no rotation
        # Gemma3RMSNorm scales by 1 + weight: folded into the stored tensor (module docstring).
        offset = 1.0 if cfg.gemma_block else None
        norms = ("input_layernorm", "post_attention_layernorm")
        if cfg.gemma_block:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        self.norms = nn.ParameterDict({n: leaves.get(f"{p}/{n}/scale", offset=offset) for n in norms})
        self.qk_norms = None
        if cfg.qk_norm:
            self.qk_norms = nn.ParameterDict({n: leaves.get(f"{p}/self_attn/{n}_norm/scale", offset=offset)
                                              for n in "qk"})
        scale = lora_scale if kind == "lora" else None
        names = {"q": "self_attn/q_proj", "k": "self_attn/k_proj", "v": "self_attn/v_proj", "o": "self_attn/o_proj",
                 "gate": "mlp/gate_proj", "up": "mlp/up_proj", "down": "mlp/down_proj"}
        self.proj = nn.ModuleDict({k: leaves.linear(f"{p}/{v}", scale) for k, v in names.items()})
        # CogVLM visual experts, only where image tokens can occur (the prefill graph).
        self.expert = None
        if kind == "expert" and routed:
            self.expert = nn.ModuleDict({k: leaves.linear(f"{p}/{v.replace('/', '/vision_')}")
                                         for k, v in names.items()})

    def _p(self, name, x, is_image):
        out = self.proj[name](x)
        if self.expert is not None:
            out = torch.where(is_image, self.expert[name](x), out)
        return out

    def _norm(self, x, name):
        return _rms_norm(x, self.norms[name], self.cfg.rms_norm_eps)

    def forward(self, x, ropes, masks, past_k, past_v, is_image):
        """x (1, AR, hidden); ropes {table key: (cos, sin) (1, 1, AR, d)}; masks (full, sliding)
        additive (1, 1, G * AR, C) (sliding None without sliding layers); past_k (1, K, d, C - AR),
        past_v (1, K, C - AR, d) -> (x, new keys (1, K, d, AR), new values (1, K, AR, d))."""
        cfg = self.cfg
        ar = x.shape[1]
        kv, d = cfg.num_kv_heads, cfg.head_dim
        groups = cfg.num_heads // kv
        h = self._norm(x, "input_layernorm")
        q = self._p("q", h, is_image).reshape(1, ar, cfg.num_heads, d)
        k = self._p("k", h, is_image).reshape(1, ar, kv, d)
        v = self._p("v", h, is_image).reshape(1, ar, kv, d).transpose(1, 2)              # (1, K, AR, d)
        if self.qk_norms is not None:  # per head, before RoPE
            q = _rms_norm(q, self.qk_norms["q"], cfg.rms_norm_eps)
            k = _rms_norm(k, self.qk_norms["k"], cfg.rms_norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                      # (1, H | K, AR, d)
        if self.rope is not None:
            cos, sin = ropes[self.rope]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_t = k.transpose(2, 3)                                                          # (1, K, d, AR)
        keys = torch.cat([past_k, k_t], dim=3)                                           # (1, K, d, C)
        values = torch.cat([past_v, v], dim=2)                                           # (1, K, C, d)
        # Heads h = kv * G + g share KV head kv: rows (g, t) of one (1, K, G * AR, C) product.
        scores = torch.matmul(q.reshape(1, kv, groups * ar, d) * cfg.attention_scale, keys)
        scores = scores + masks[1 if self.sliding else 0]
        out = torch.matmul(torch.softmax(scores, dim=-1), values)                        # (1, K, G * AR, d)
        out = out.reshape(1, cfg.num_heads, ar, d).transpose(1, 2).reshape(1, ar, cfg.num_heads * d)
        attn = self._p("o", out, is_image)
        if cfg.gemma_block:
            x = x + self._norm(attn, "post_attention_layernorm")
            x = x + self._norm(self._mlp(self._norm(x, "pre_feedforward_layernorm"), is_image),
                               "post_feedforward_layernorm")
        else:
            x = x + attn
            x = x + self._mlp(self._norm(x, "post_attention_layernorm"), is_image)
        return x, k_t, v

    def _mlp(self, h, is_image):
        """SwiGLU, or GeGLU with tanh GELU (Gemma 3)."""
        gate = self._p("gate", h, is_image)
        act = F.gelu(gate, approximate="tanh") if self.cfg.gemma_block else F.silu(gate)
        return self._p("down", act * self._p("up", h, is_image), is_image)


class DecoderGraph(nn.Module):
    """The decoder as one static-shape graph (module docstring for inputs / outputs).

    `forward(input_ids, position_ids, attention_mask, [sliding_attention_mask],
    [image_embeds, image_mask], past_key_0, past_value_0, ...)` -> (logits, present_key_0,
    present_value_0, ...). `ropes`: {table key: (cos, sin) Parameters} of
    `rope_table_keys(cfg)` (built once by `ModelGraphs`, shared by every decoder)."""

    def __init__(self, cfg: LLMConfig, leaves: _Leaves, kinds: tuple[str, ...], lora_scale: float, *,
                 context: int, with_images: bool, ropes: Mapping[str, tuple[nn.Parameter, nn.Parameter]]):
        super().__init__()
        self.cfg, self.context, self.with_images = cfg, context, with_images
        self.sliding = sliding_window(cfg) > 0
        self.embed = leaves.get("embed_tokens/embedding")
        # Gemma3TextScaledWordEmbedding: times sqrt(hidden) rounded to the compute dtype (float32).
        self.embed_scale = float(np.float32(cfg.hidden_size ** 0.5)) if cfg.gemma_block else None
        self.layers = nn.ModuleList([_DecoderBlock(cfg, leaves, i, kind, lora_scale, with_images)
                                     for i, kind in enumerate(kinds)])
        self.norm = leaves.get("norm/scale", offset=1.0 if cfg.gemma_block else None)
        if cfg.tie_embeddings:
            component = leaves.names["embed_tokens/embedding"].split(".", 1)[0]
            self.lm_head = leaves.get("embed_tokens/embedding", transpose=(1, 0),
                                      name=canonical(component, "lm_head/kernel"))
        else:
            self.lm_head = leaves.get("lm_head/kernel")
        used = {key for key in rope_table_keys(cfg) if key is not None}
        self.ropes = nn.ParameterDict({f"{key}_{part}": table for key in sorted(used)
                                       for part, table in zip(("cos", "sin"), ropes[key])})

    def input_names(self) -> list[str]:
        """ONNX input names, in `forward`'s order."""
        return [n for n, _, _ in self.input_shapes(1)]

    def output_names(self) -> list[str]:
        """ONNX output names: logits, then the new key / value cache entries per layer."""
        return [n for n, _, _ in self.output_shapes(1)]

    def input_shapes(self, ar: int) -> list[tuple[str, tuple[int, ...], str]]:
        """[(name, shape, dtype)] of the inputs for AR tokens per call."""
        cfg, c = self.cfg, self.context
        past = c - ar
        shapes = [("input_ids", (1, ar), "int32"), ("position_ids", (1, ar), "int32"),
                  ("attention_mask", (1, 1, ar, c), "float32")]
        if self.sliding:
            shapes += [("sliding_attention_mask", (1, 1, ar, c), "float32")]
        if self.with_images:
            shapes += [("image_embeds", (1, ar, cfg.hidden_size), "float32"), ("image_mask", (1, ar), "float32")]
        for i in range(cfg.num_layers):
            shapes += [(f"past_key_{i}", (1, cfg.num_kv_heads, cfg.head_dim, past), "float32"),
                       (f"past_value_{i}", (1, cfg.num_kv_heads, past, cfg.head_dim), "float32")]
        return shapes

    def output_shapes(self, ar: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every output for `ar` tokens per call."""
        cfg = self.cfg
        shapes = [("logits", (1, ar, cfg.vocab_size), "float32")]
        for i in range(cfg.num_layers):
            shapes += [(f"present_key_{i}", (1, cfg.num_kv_heads, cfg.head_dim, ar), "float32"),
                       (f"present_value_{i}", (1, cfg.num_kv_heads, ar, cfg.head_dim), "float32")]
        return shapes

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        """One prefill chunk or decode step of `ar` tokens (`input_shapes` gives every input:
        `rest` is sliding_attention_mask for models with sliding layers, image_embeds and
        image_mask when `with_images`, then past key / value per layer); returns logits and the
        new cache entries (`output_shapes`). ValueError for a wrong number of cache tensors."""
        cfg = self.cfg
        ar = input_ids.shape[1]
        groups = cfg.num_heads // cfg.num_kv_heads
        x = F.embedding(input_ids, self.embed)                                           # (1, AR, hidden)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        masks = [attention_mask.repeat(1, 1, groups, 1), None]                           # (1, 1, G * AR, C)
        if self.sliding:
            sliding_mask, *rest = rest
            masks[1] = sliding_mask.repeat(1, 1, groups, 1)
        is_image = None
        if self.with_images:
            image_embeds, image_mask, *rest = rest
            is_image = (image_mask > 0.5)[..., None]                                     # (1, AR, 1)
            x = torch.where(is_image, image_embeds, x)
        if len(rest) != 2 * cfg.num_layers:
            raise ValueError(f"expected {2 * cfg.num_layers} past key / value tensors, got {len(rest)}")
        ropes = {key: (F.embedding(position_ids, self.ropes[f"{key}_cos"])[:, None],     # (1, 1, AR, d)
                       F.embedding(position_ids, self.ropes[f"{key}_sin"])[:, None])
                 for key in ROPE_TABLES if f"{key}_cos" in self.ropes}
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, ropes, masks, rest[2 * i], rest[2 * i + 1], is_image)
            presents += [k, v]
        logits = torch.matmul(_rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head)
        return (logits.reshape(1, ar, cfg.vocab_size), *presents)


# ---------------------------------------------------------------------------------------------
# Vision tower + projector
# ---------------------------------------------------------------------------------------------


class VisionGraph(nn.Module):
    """pixels (n, S, S, 3) NHWC, normalised -> image features (n, tokens_per_tile, llm_hidden).

    SigLIP up to `select_layer` (post-LayerNorm only for -1, as `models.siglip`), then the
    VILA projector with its exact token order (`torch_modules.vila_downsample`)."""

    def __init__(self, vcfg: VisionConfig, pcfg: ProjectorConfig, vision: _Leaves, projector: _Leaves):
        super().__init__()
        self.vcfg, self.pcfg = vcfg, pcfg
        self.patch_kernel = vision.get("embeddings/patch_embedding/kernel", transpose=(3, 2, 0, 1))
        self.patch_bias = vision.get("embeddings/patch_embedding/bias")
        self.position = vision.get("embeddings/position_embedding/embedding")
        select = vcfg.num_layers if vcfg.select_layer == -1 else vcfg.select_layer % (vcfg.num_layers + 1)
        self.layers = nn.ModuleList()
        for i in range(select):
            p = f"encoder/layers_{i}"
            layer = nn.Module()
            layer.ln1 = nn.ParameterList([vision.get(f"{p}/layer_norm1/scale"), vision.get(f"{p}/layer_norm1/bias")])
            layer.ln2 = nn.ParameterList([vision.get(f"{p}/layer_norm2/scale"), vision.get(f"{p}/layer_norm2/bias")])
            layer.proj = nn.ModuleDict({n: vision.linear(f"{p}/self_attn/{n}_proj") for n in ("q", "k", "v", "out")})
            layer.fc1, layer.fc2 = vision.linear(f"{p}/mlp/fc1"), vision.linear(f"{p}/mlp/fc2")
            self.layers.append(layer)
        self.post_ln = None
        if vcfg.select_layer == -1:
            self.post_ln = nn.ParameterList([vision.get("post_layernorm/scale"), vision.get("post_layernorm/bias")])
        self.proj_ln = nn.ParameterList([projector.get("layer_norm/scale"), projector.get("layer_norm/bias")])
        self.linear_1, self.linear_2 = projector.linear("linear_1"), projector.linear("linear_2")

    def _ln(self, x, params, eps):
        return F.layer_norm(x, (x.shape[-1],), params[0], params[1], eps)

    def forward(self, pixels):
        """pixel_values (n, S, S, 3) float32 normalised -> image_features (n, tokens, llm_hidden)."""
        vcfg = self.vcfg
        n = pixels.shape[0]
        x = F.conv2d(pixels.permute(0, 3, 1, 2), self.patch_kernel, self.patch_bias, stride=vcfg.patch_size)
        x = x.reshape(n, vcfg.hidden_size, vcfg.num_patches).transpose(1, 2) + self.position
        heads, d = vcfg.num_heads, vcfg.hidden_size // vcfg.num_heads
        t = vcfg.num_patches
        for layer in self.layers:
            h = self._ln(x, layer.ln1, vcfg.layer_norm_eps)
            q, k, v = (layer.proj[c](h).reshape(n, t, heads, d).transpose(1, 2) for c in "qkv")
            probs = torch.softmax(torch.matmul(q * (d ** -0.5), k.transpose(2, 3)), dim=-1)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(n, t, vcfg.hidden_size)
            x = x + layer.proj["out"](out)
            h = self._ln(x, layer.ln2, vcfg.layer_norm_eps)
            x = x + layer.fc2(F.gelu(layer.fc1(h), approximate="tanh"))
        if self.post_ln is not None:
            x = self._ln(x, self.post_ln, vcfg.layer_norm_eps)
        x = self._ln(vila_downsample(x), self.proj_ln, self.pcfg.layer_norm_eps)
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU, as VILA

    def input_shapes(self, n: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of the input for `n` tiles."""
        s = self.vcfg.image_size
        return [("pixel_values", (n, s, s, self.vcfg.num_channels), "float32")]

    def output_shapes(self, n: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of the output for `n` tiles."""
        tokens = downsampled_grid(self.vcfg.num_patches) ** 2
        return [("image_features", (n, tokens, self.pcfg.llm_hidden_size), "float32")]

    def input_names(self) -> list[str]:
        """["pixel_values"]."""
        return ["pixel_values"]

    def output_names(self) -> list[str]:
        """["image_features"]."""
        return ["image_features"]


# ---------------------------------------------------------------------------------------------
# Building the graphs of a model
# ---------------------------------------------------------------------------------------------


def example_inputs(shapes, device: str) -> tuple[torch.Tensor, ...]:
    """Zero tensors for `input_shapes(...)` (on the store's device: "meta" traces for free)."""
    dtypes = {"int32": torch.int32, "float32": torch.float32}
    return tuple(torch.zeros(shape, dtype=dtypes[dtype], device=device) for _, shape, dtype in shapes)


class ModelGraphs:
    """Every graph of one multimodal model, over one shared `TensorStore`.

        >>> graphs = ModelGraphs(model.mcfg, model.params, context=2048)   # doctest: +SKIP
        >>> graphs.base, graphs.multimodal(with_images=True), graphs.vision   # doctest: +SKIP

    `unused` lists the parameters no graph uses (the SigLIP pooling head, layers after
    `select_layer`), by canonical name: they are not deployed, and the report says so.
    """

    def __init__(self, mcfg, params: dict, *, context: int, meta: bool = True):
        variant = mcfg.structure.variant
        if variant not in ("genieblue", "cogvlm", "lora", "full"):
            raise ValueError(f"structure variant {variant!r} has no QNN export")
        self.mcfg, self.context = mcfg, context
        self.store = TensorStore(meta=meta)
        llm_flat, branch_flat = models.flatten(params["llm"]), models.flatten(params.get("branch", {}))
        merged = dict(llm_flat)
        merged.update(branch_flat)
        llm_names = {p: canonical("llm", p) for p in llm_flat}
        mm_names = dict(llm_names)
        mm_names.update({p: canonical("branch", p) for p in branch_flat})
        self._llm = _Leaves(self.store, llm_flat, llm_names)
        self._mm = _Leaves(self.store, merged, mm_names)
        vision_flat, projector_flat = models.flatten(params["vision"]), models.flatten(params["projector"])
        self._vision = _Leaves(self.store, vision_flat, {p: canonical("vision", p) for p in vision_flat})
        self._projector = _Leaves(self.store, projector_flat, {p: canonical("projector", p) for p in projector_flat})
        # One pair of cos / sin tables per distinct RoPE (`rope_table_keys`), from its first layer.
        keys = rope_table_keys(mcfg.llm)
        self.ropes = {}
        for key in ROPE_TABLES:
            if key in keys:
                cos, sin = rope_tables(mcfg.llm, keys.index(key), context)
                self.ropes[key] = (self.store.get(f"llm.{key}.cos", cos), self.store.get(f"llm.{key}.sin", sin))
        self.lora_scale = mcfg.structure.lora_spec.scale
        self.base = DecoderGraph(mcfg.llm, self._llm, ("base",) * mcfg.llm.num_layers, self.lora_scale,
                                 context=context, with_images=False, ropes=self.ropes)
        self._multimodal = {w: DecoderGraph(mcfg.llm, self._mm, mcfg.layer_kinds, self.lora_scale,
                                            context=context, with_images=w, ropes=self.ropes) for w in (True, False)}
        self.vision = VisionGraph(mcfg.vision, mcfg.projector, self._vision, self._projector)

    def multimodal(self, with_images: bool) -> DecoderGraph:
        """The multimodal decoder graph with (prefill of image prompts) or without image inputs."""
        return self._multimodal[with_images]

    def unused(self) -> dict[str, int]:
        """{canonical name: element count} of parameters no graph uses."""
        all_leaves = (self._llm, self._mm, self._vision, self._projector)
        used = {leaves.names[p] for leaves in all_leaves for p in leaves.used}
        return {leaves.names[p]: math.prod(np.shape(leaves.flat[p]))
                for leaves in all_leaves for p in sorted(leaves.flat) if leaves.names[p] not in used}


def check_sizes(mcfg, context: int, prefill_len: int) -> None:
    """Errors naming the setting when the context cannot hold the graphs' shapes."""
    if prefill_len < 1:
        raise ValueError(f"prefill_len={prefill_len} must be >= 1")
    if context <= prefill_len:
        raise ValueError(f"context={context} must be longer than prefill_len={prefill_len} (the prefill graph "
                         f"keeps context - prefill_len past slots)")
    if context > mcfg.llm.max_position_embeddings:
        raise ValueError(f"context={context} exceeds the LLM's max_position_embeddings="
                         f"{mcfg.llm.max_position_embeddings}")
