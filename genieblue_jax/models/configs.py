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
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"config kind {kind!r} given to {cls.__name__} (expects {cls.kind!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class LLMConfig(_Config):
    """Decoder-only LLM of the Qwen2 / Llama families."""

    kind: ClassVar[str] = "llm"
    family: str  # "qwen2" | "llama": which Hugging Face architecture it maps to
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
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    attention_chunk: int = 0  # > 0: attention runs this many queries at a time (long rows' memory)
    # "auto": the backend's fused attention kernel (splash on TPU, cuDNN on GPU; XLA on CPU);
    # "xla": plain XLA ops everywhere (models/attention.py)
    attention_impl: str = "auto"
    scan_layers: bool = False  # run the blocks as lax.scan loops (models/scan.py); names unchanged
    dtype: str = "float32"
    param_dtype: str = "float32"

    def _validate(self) -> None:
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"family={self.family!r}: supported families are 'qwen2', 'llama'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_impl not in ("auto", "xla"):
            raise ValueError(f"attention_impl={self.attention_impl!r}: choose 'auto' or 'xla'")


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
    # Llama-3.2-1B's shapes. Its config's llama3 RoPE scaling (factor 32) is not implemented:
    # shapes, FLOPs and memory plans only (importing its checkpoint is refused: rope_scaling).
    "llama-3.2-1b": LLMConfig(
        family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072),
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
