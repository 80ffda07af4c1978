"""Model configurations and named presets.

Configs are frozen dataclasses so they hash (jit static args) and round-trip through JSON
(`to_dict` / `from_dict`, used by checkpoints). Field names follow our modules, not Hugging
Face; `genieblue_jax.hf.configs` translates HF `config.json` files into these.

Presets carry the exact numbers of SPEC.md. Tiny presets exist for tests and the demo.

    >>> cfg = get_preset("qwen2.5-3b")
    >>> cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    (2048, 36, 2, 128)
    >>> get_preset("tiny-qwen2").replace(num_layers=2).num_layers
    2
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{name}={value!r} is not a supported dtype; choose one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class _Config:
    kind: ClassVar[str]

    def __post_init__(self):
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)
        self._validate()

    def _validate(self) -> None:
        pass

    @property
    def compute_dtype(self):
        """`dtype` ("float32", "bfloat16", "float16") as a jnp.dtype: activations and matmuls."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        """`param_dtype` as a jnp.dtype: the dtype the parameters are stored in."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes):
        """A copy with `changes` applied, validated as any construction (ValueError for a bad value).

            >>> get_preset("tiny-qwen2").replace(dtype="bfloat16").compute_dtype
            dtype(bfloat16)
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus "kind" (the config's class: "llm", ...); JSON-able, `from_dict` inverts it."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config of `to_dict`'s dict (or of its JSON); ValueError for another class's "kind" or
        a field this class lacks (naming it and the known ones), and for values the class refuses.

            >>> cfg = get_preset("tiny-qwen2")
            >>> type(cfg).from_dict(cfg.to_dict()) == cfg
            True
        """
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"config kind {kind!r} given to {cls.__name__} (expects {cls.kind!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


FAMILIES = ("qwen2", "llama", "qwen3", "gemma3", "smollm3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' `layer_types` values
ROPE_TYPES = ("default", "linear", "llama3")            # transformers' `rope_type` values we implement


@dataclasses.dataclass(frozen=True)
class LLMConfig(_Config):
    """Decoder-only LLM of the Qwen2 / Llama 3 / Qwen3 / Gemma 3 / SmolLM3 families.

    `family` names the Hugging Face architecture (`Qwen2ForCausalLM`, `LlamaForCausalLM`,
    `Qwen3ForCausalLM`, `Gemma3ForCausalLM`, `SmolLM3ForCausalLM`) and fixes what the
    architecture hard-codes (the properties below): per-head q/k RMSNorm (Qwen3, Gemma 3),
    and Gemma 3's block (RMSNorm scaled by `1 + weight`, a norm after attention and after
    the MLP as well as before each, GeGLU with tanh-GELU, embeddings scaled by
    sqrt(hidden_size)). The fields are what `config.json` sets per model:

    - RoPE: `rope_theta` with transformers' `rope_type` ("default", "linear": positions
      divided by `rope_factor`; "llama3": Llama 3.1's frequency-dependent scaling with
      `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`,
      `rope_original_max_position`) on the full-attention layers. Sliding-window layers
      use `local_rope_theta` without scaling when it is set (Gemma 3's
      `rope_local_base_freq`), else the same RoPE. `nope_layers`: layers without RoPE
      (SmolLM3's `no_rope_layers` zeros).
    - Attention pattern: `layer_types` gives each layer "full_attention" or
      "sliding_attention" (empty: all full); a sliding layer's query at index q sees keys
      k with q - sliding_window < k <= q (transformers' `sliding_window_overlay`).
      `query_pre_attn_scalar` > 0 scales scores by its inverse square root (Gemma 3),
      else by head_dim ** -0.5.

        >>> cfg = get_preset("gemma-3-1b")
        >>> cfg.layer_types[4:6], cfg.sliding_window, cfg.window(0), cfg.window(5)
        (('sliding_attention', 'full_attention'), 512, 512, None)
        >>> cfg.rope_for(0), cfg.rope_for(5)
        ((10000.0, 'default', 1.0), (1000000.0, 'default', 1.0))
    """

    kind: ClassVar[str] = "llm"
    family: str  # one of FAMILIES: which Hugging Face architecture it maps to
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rope_type: str = "default"             # ROPE_TYPES, on full-attention layers
    rope_factor: float = 1.0               # "linear" / "llama3"
    rope_low_freq_factor: float = 1.0      # "llama3"
    rope_high_freq_factor: float = 4.0     # "llama3"
    rope_original_max_position: int = 8192  # "llama3": the pre-training context
    local_rope_theta: float = 0.0          # > 0: sliding layers' RoPE base, unscaled (Gemma 3)
    nope_layers: tuple[int, ...] = ()      # layers that apply no RoPE (SmolLM3)
    layer_types: tuple[str, ...] = ()      # per layer, LAYER_TYPES; () = all "full_attention"
    sliding_window: int = 0                # keys a sliding layer's query sees, itself included
    query_pre_attn_scalar: float = 0.0     # > 0: scores scaled by its ** -0.5 (Gemma 3)
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    attention_chunk: int = 0  # > 0: attention runs this many queries at a time (long rows' memory)
    # "auto": the backend's fused attention kernel (splash on TPU, cuDNN on GPU; XLA on CPU);
    # "xla": plain XLA ops everywhere (models/attention.py)
    attention_impl: str = "auto"
    scan_layers: bool = False  # run the blocks as lax.scan loops (models/scan.py); names unchanged
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable (a jit static argument)
        object.__setattr__(self, "nope_layers", tuple(int(i) for i in self.nope_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()

    def _validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: supported families are {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_impl not in ("auto", "xla"):
            raise ValueError(f"attention_impl={self.attention_impl!r}: choose 'auto' or 'xla'")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: choose one of {ROPE_TYPES}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor={self.rope_factor} must be > 0 for rope_type={self.rope_type!r}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"llama3 RoPE needs rope_high_freq_factor ({self.rope_high_freq_factor}) > "
                             f"rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the {self.num_layers} "
                                 f"layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window < 1:
                raise ValueError(f"sliding_window={self.sliding_window}: sliding_attention layers need a window >= 1")
        bad = [i for i in self.nope_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"nope_layers {bad} outside [0, {self.num_layers})")

    # What the family's architecture hard-codes.
    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)."""
        return self.family in ("qwen3", "gemma3")

    @property
    def gemma_block(self) -> bool:
        """Gemma 3's block: `(1 + weight)` RMSNorms, four per block, GeGLU (tanh GELU), scaled embeddings."""
        return self.family == "gemma3"

    @property
    def attention_scale(self) -> float:
        """The factor the attention scores are multiplied by."""
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar > 0 else self.head_dim) ** -0.5

    def layer_type(self, i: int) -> str:
        """"full_attention" or "sliding_attention" for layer i."""
        return self.layer_types[i] if self.layer_types else "full_attention"

    def window(self, i: int) -> int | None:
        """The sliding window of layer i (keys per query, itself included), None for full attention."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    def rope_for(self, i: int) -> tuple[float, str, float] | None:
        """(theta, rope_type, factor) of layer i's RoPE, None for a NoPE layer (llama3's other
        parameters are the config's)."""
        if i in self.nope_layers:
            return None
        if self.local_rope_theta > 0 and self.layer_type(i) == "sliding_attention":
            return (float(self.local_rope_theta), "default", 1.0)
        return (float(self.rope_theta), self.rope_type, float(self.rope_factor))


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Config):
    """SigLIP vision tower.

    `select_layer` picks the features handed to the projector, with Hugging Face's
    `hidden_states` indexing: -1 is `last_hidden_state` (post-LayerNorm applied); any other
    index k is the raw `hidden_states[k]` (0 = patch + position embeddings, i = after
    encoder layer i, -2 = the penultimate layer as LLaVA uses). Layers after the selected
    one are not run.
    """

    kind: ClassVar[str] = "vision"
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    use_head: bool = True
    select_layer: int = -1
    initializer_range: float = 0.02
    remat: bool = False  # recompute each encoder layer's activations in the backward pass
    scan_layers: bool = False  # run the encoder layers as a lax.scan loop (models/scan.py)
    # Tile slots the tower runs per call and per batch shard: the multimodal model runs it in
    # calls of this many real tiles and skips the calls past the last one
    # (`structure.embed_image_tokens`); larger = fewer, fuller calls, more padding computed.
    tiles_per_call: int = 4
    dtype: str = "float32"
    param_dtype: str = "float32"

    def _validate(self) -> None:
        if self.tiles_per_call < 1:
            raise ValueError(f"tiles_per_call={self.tiles_per_call} must be >= 1")
        # No divisibility check: the patch conv is VALID, so 384 px / 14 gives 27 x 27 patches
        # and the last 6 pixel rows/columns are ignored, exactly as in SigLIP.
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer={self.select_layer} outside [-{self.num_layers + 1}, {self.num_layers}]")

    @property
    def grid_size(self) -> int:
        """ViT patches per side of one image tile: image_size // patch_size (27 for so400m-384)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """ViT patches (tokens) per image tile: grid_size ** 2 (729 for so400m-384)."""
        return self.grid_size ** 2


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(_Config):
    """VILA `mlp_downsample` projector: 2x2 token downsampler, LayerNorm, Linear, GELU, Linear."""

    kind: ClassVar[str] = "projector"
    vision_hidden_size: int
    llm_hidden_size: int
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default, as VILA builds it
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def in_features(self) -> int:
        """Input width of the projector's MLP: 4 x the ViT width (after the 2x2 downsampler)."""
        return 4 * self.vision_hidden_size

    @staticmethod
    def between(vision: VisionConfig, llm: LLMConfig, **kw) -> "ProjectorConfig":
        """The projector from `vision`'s width to `llm`'s (other fields from `kw`)."""
        return ProjectorConfig(vision_hidden_size=vision.hidden_size, llm_hidden_size=llm.hidden_size, **kw)


CONFIG_CLASSES = {c.kind: c for c in (LLMConfig, VisionConfig, ProjectorConfig)}


def config_from_dict(d: dict[str, Any]):
    """Inverse of `cfg.to_dict()` for any config class (dispatch on its `kind`)."""
    if d.get("kind") not in CONFIG_CLASSES:
        raise ValueError(f"config has kind {d.get('kind')!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[d["kind"]].from_dict(d)


# Llama 3.1 / 3.2's RoPE scaling (config.json's rope_scaling).
_LLAMA3_ROPE = dict(rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position=8192)


def _gemma3_layer_types(n: int) -> tuple[str, ...]:
    """Gemma3TextConfig's default pattern: every 6th layer global, the others sliding."""
    return tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n))


PRESETS: dict[str, _Config] = {
    # SPEC: Qwen2.5-3B (hidden 2048, 36 layers, 16 q heads, 2 KV heads, head_dim 128, ...).
    "qwen2.5-3b": LLMConfig(
        family="qwen2", vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16,
        num_kv_heads=2, head_dim=128, intermediate_size=11008, rope_theta=1e6, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    # Real shapes for benchmarks and memory plans (numbers from each model's config.json).
    "qwen2.5-0.5b": LLMConfig(
        family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": LLMConfig(
        family="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, intermediate_size=8960, rope_theta=1e6, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-7b": LLMConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=False, max_position_embeddings=32768),
    # The small LLMs people deploy on phones, at their published shapes (config.json of each hub
    # model; README "Model families" cites where each was read). Llama 3.2: llama3 RoPE scaling.
    "llama-3.2-1b": LLMConfig(
        family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072, **_LLAMA3_ROPE),
    "llama-3.2-3b": LLMConfig(
        family="llama", vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, intermediate_size=8192, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072, **_LLAMA3_ROPE),
    # Qwen3 dense: per-head q/k RMSNorm, explicit head_dim, no biases.
    "qwen3-0.6b": LLMConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, intermediate_size=3072, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=40960),
    "qwen3-1.7b": LLMConfig(
        family="qwen3", vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, intermediate_size=6144, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=40960),
    "qwen3-4b": LLMConfig(
        family="qwen3", vocab_size=151936, hidden_size=2560, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=9728, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=40960),
    # Gemma 3 text: 5 sliding-window layers (local RoPE base 1e4) to 1 global layer (base 1e6; linear
    # scaling x8 on 4B), (1 + w) RMSNorms, GeGLU, scaled embeddings, a 262k vocabulary.
    "gemma-3-1b": LLMConfig(
        family="gemma3", vocab_size=262144, hidden_size=1152, num_layers=26, num_heads=4,
        num_kv_heads=1, head_dim=256, intermediate_size=6912, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=32768, local_rope_theta=1e4,
        layer_types=_gemma3_layer_types(26), sliding_window=512, query_pre_attn_scalar=256),
    "gemma-3-4b": LLMConfig(
        family="gemma3", vocab_size=262208, hidden_size=2560, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, intermediate_size=10240, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=131072, rope_type="linear", rope_factor=8.0,
        local_rope_theta=1e4, layer_types=_gemma3_layer_types(34), sliding_window=1024,
        query_pre_attn_scalar=256),
    # SmolLM3: Llama-style blocks, no RoPE on every 4th layer (NoPE).
    "smollm3-3b": LLMConfig(
        family="smollm3", vocab_size=128256, hidden_size=2048, num_layers=36, num_heads=16,
        num_kv_heads=4, head_dim=128, intermediate_size=11008, rope_theta=5e6, rms_norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=65536, nope_layers=tuple(range(3, 36, 4))),
    # The Llama-family case: untied embeddings, no biases, GQA (TinyLlama-1.1B's numbers).
    "tinyllama-1.1b": LLMConfig(
        family="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
        num_kv_heads=4, head_dim=64, intermediate_size=5632, rope_theta=1e4, rms_norm_eps=1e-5,
        tie_embeddings=False, max_position_embeddings=2048),
    # SPEC: SigLIP so400m-patch14-384 (27x27 = 729 tokens, attention-pooling head).
    "siglip-so400m-384": VisionConfig(
        image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, layer_norm_eps=1e-6, use_head=True),
    "siglip-so400m-224": VisionConfig(
        image_size=224, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, layer_norm_eps=1e-6, use_head=True),
    # SigLIP 2 at fixed resolution: SiglipModel-layout checkpoints, so400m shapes.
    "siglip2-so400m-patch14-384": VisionConfig(
        image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, layer_norm_eps=1e-6, use_head=True),
    "siglip2-so400m-patch16-512": VisionConfig(
        image_size=512, patch_size=16, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, layer_norm_eps=1e-6, use_head=True),
    "siglip-base-patch16-224": VisionConfig(
        image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, layer_norm_eps=1e-6, use_head=True),
    # Tiny presets for tests and the CPU demo.
    "tiny-qwen2": LLMConfig(
        family="qwen2", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
        max_position_embeddings=2048),
    "tiny-llama": LLMConfig(
        family="llama", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=160, rope_theta=1e4, rms_norm_eps=1e-5,
        tie_embeddings=False, max_position_embeddings=2048),
    # Demo scale: the embedded CPU demo and the engine benchmarks (trains in minutes on 2 cores).
    "demo-qwen2": LLMConfig(
        family="qwen2", vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
        head_dim=64, intermediate_size=704, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
        max_position_embeddings=4096),
    # The embedded end-to-end demo (pretraining + stage 1 + stage 2 + evaluation in minutes):
    # 8 layers, so skip / pre / post placements all differ, at a quarter of demo-qwen2's cost.
    "demo-small-qwen2": LLMConfig(
        family="qwen2", vocab_size=512, hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=384, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
        max_position_embeddings=4096),
    # The reduced demo of the test suite (tests/test_demo.py): demo-small-qwen2 at half the width,
    # same depth and vocabulary; the demo's six steps in ~490 s instead of 667 s on 2 cores.
    "demo-tiny-qwen2": LLMConfig(
        family="qwen2", vocab_size=512, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=192, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
        max_position_embeddings=4096),
    "demo-siglip": VisionConfig(
        image_size=56, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
        intermediate_size=256, use_head=False),
    # 56 px / patch 8 -> a 7x7 grid: odd like so400m's 27x27, so the downsampler pads.
    "tiny-siglip": VisionConfig(
        image_size=56, patch_size=8, hidden_size=48, num_layers=2, num_heads=4,
        intermediate_size=96, use_head=True),
}


def get_preset(name: str):
    """`PRESETS[name]` (an LLMConfig or VisionConfig); KeyError listing the presets if unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
