"""Declarative Hugging Face <-> genieblue_jax parameter name tables, one per model family.

A `Rule` pairs one of our parameter paths with one HF tensor name; `{i}` stands for a
layer index on both sides. Each rule carries a `Transform` that turns the HF tensor into
ours (`to_ours`) and back (`to_hf`, used by the PyTorch export).

`resolve(table, our_paths)` maps every parameter of a model to its HF name and fails if a
parameter matches no rule or several, so a table can never silently skip a tensor:

    >>> resolve(DECODER_TABLE, ["layers_3/self_attn/q_proj/kernel"])
    {'layers_3/self_attn/q_proj/kernel': ('model.layers.3.self_attn.q_proj.weight', TRANSPOSE)}
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """A tensor layout change between HF and ours: an axis permutation, ours =
    hf.transpose(axes) (None: the same layout), e.g. TRANSPOSE for Linear."""
    name: str
    axes: tuple[int, ...] | None = None

    def __repr__(self):
        return self.name

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """The HF tensor `x` in our layout (a view for numpy arrays)."""
        return x if self.axes is None else x.transpose(self.axes)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our tensor `x` in HF's layout (a view for numpy arrays)."""
        return x if self.axes is None else x.transpose(np.argsort(self.axes))

    def ours_shape(self, hf_shape) -> tuple[int, ...]:
        """The shape in our layout of an HF tensor of `hf_shape`."""
        return tuple(hf_shape) if self.axes is None else tuple(hf_shape[a] for a in self.axes)

    def hf_index(self, index: tuple) -> tuple:
        """The index into the HF tensor that reads `ours[index]` (before `to_ours`): a device
        shard's slices, permuted, so only that shard's bytes are read."""
        if self.axes is None:
            return index
        out = [slice(None)] * len(self.axes)
        for k, a in enumerate(self.axes):
            out[a] = index[k]
        return tuple(out)


IDENTITY = Transform("IDENTITY")
# torch Linear stores (out, in); flax Dense kernels are (in, out).
TRANSPOSE = Transform("TRANSPOSE", (1, 0))
# torch Conv2d (out, in, kh, kw) <-> flax Conv (kh, kw, in, out).
CONV_OIHW_TO_HWIO = Transform("CONV_OIHW_TO_HWIO", (2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a name table: our parameter path and the HF tensor name (`{i}` stands for a
    layer index in both) and the transform from HF's layout to ours."""
    ours: str
    hf: str
    transform: Transform = IDENTITY

    @property
    def pattern(self) -> re.Pattern:
        """`ours` as an anchored regex, `{i}` captured as the named group "i"."""
        return re.compile("^" + re.escape(self.ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _linear(ours: str, hf: str) -> tuple[Rule, Rule]:
    return Rule(f"{ours}/kernel", f"{hf}.weight", TRANSPOSE), Rule(f"{ours}/bias", f"{hf}.bias")


def _layer_norm(ours: str, hf: str) -> tuple[Rule, Rule]:
    return Rule(f"{ours}/scale", f"{hf}.weight"), Rule(f"{ours}/bias", f"{hf}.bias")


# Every decoder family shares the tensor names of Qwen2ForCausalLM / LlamaForCausalLM; the
# rules of tensors a family lacks are simply unused: biases only exist when the config asks
# for them (Qwen2: q/k/v; the others: attention_bias, mlp_bias), lm_head only when embeddings
# are untied, q_norm / k_norm in Qwen3 and Gemma 3, the pre / post feed-forward norms in
# Gemma 3 only.
DECODER_TABLE: tuple[Rule, ...] = (
    Rule("embed_tokens/embedding", "model.embed_tokens.weight"),
    *(Rule(f"layers_{{i}}/{n}/scale", f"model.layers.{{i}}.{n}.weight")
      for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")),
    *(Rule(f"layers_{{i}}/self_attn/{n}/scale", f"model.layers.{{i}}.self_attn.{n}.weight")
      for n in ("q_norm", "k_norm")),
    *(r for p in ("q", "k", "v", "o")
      for r in _linear(f"layers_{{i}}/self_attn/{p}_proj", f"model.layers.{{i}}.self_attn.{p}_proj")),
    *(r for p in ("gate", "up", "down")
      for r in _linear(f"layers_{{i}}/mlp/{p}_proj", f"model.layers.{{i}}.mlp.{p}_proj")),
    Rule("norm/scale", "model.norm.weight"),
    Rule("lm_head/kernel", "lm_head.weight", TRANSPOSE),
)

# SigLIP names are given without their prefix: see HF_SPELLINGS.
SIGLIP_TABLE: tuple[Rule, ...] = (
    Rule("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight",
         CONV_OIHW_TO_HWIO),
    Rule("embeddings/patch_embedding/bias", "embeddings.patch_embedding.bias"),
    Rule("embeddings/position_embedding/embedding", "embeddings.position_embedding.weight"),
    *_layer_norm("encoder/layers_{i}/layer_norm1", "encoder.layers.{i}.layer_norm1"),
    *_layer_norm("encoder/layers_{i}/layer_norm2", "encoder.layers.{i}.layer_norm2"),
    *(r for p in ("q", "k", "v", "out")
      for r in _linear(f"encoder/layers_{{i}}/self_attn/{p}_proj",
                       f"encoder.layers.{{i}}.self_attn.{p}_proj")),
    *_linear("encoder/layers_{i}/mlp/fc1", "encoder.layers.{i}.mlp.fc1"),
    *_linear("encoder/layers_{i}/mlp/fc2", "encoder.layers.{i}.mlp.fc2"),
    *_layer_norm("post_layernorm", "post_layernorm"),
    Rule("head/probe", "head.probe"),
    # torch.nn.MultiheadAttention keeps its packed projection as bare tensors, not a Linear.
    Rule("head/attention/in_proj/kernel", "head.attention.in_proj_weight", TRANSPOSE),
    Rule("head/attention/in_proj/bias", "head.attention.in_proj_bias"),
    *_linear("head/attention/out_proj", "head.attention.out_proj"),
    *_layer_norm("head/layernorm", "head.layernorm"),
    *_linear("head/mlp/fc1", "head.mlp.fc1"),
    *_linear("head/mlp/fc2", "head.mlp.fc2"),
)

# The VILA projector has no transformers class; these are the names of our PyTorch module
# (`genieblue_jax.export.torch_modules.VilaProjector`) and of VILA's `mm_projector` MLP.
PROJECTOR_TABLE: tuple[Rule, ...] = (
    *_layer_norm("layer_norm", "layer_norm"),
    *_linear("linear_1", "linear_1"),
    *_linear("linear_2", "linear_2"),
)

DECODER_FAMILIES = ("qwen2", "llama", "qwen3", "gemma3", "smollm3")
TABLES = {**dict.fromkeys(DECODER_FAMILIES, DECODER_TABLE), "siglip": SIGLIP_TABLE, "projector": PROJECTOR_TABLE}

# How an architecture's files spell the table's names: each spelling is a tuple of
# (table prefix, file prefix) rewrites, the first whose table prefix a name starts with
# applies ("" matches every name; () leaves names as they are). Most common first.
#   SigLIP: SiglipModel and SiglipVisionModel files written by transformers 4.x (and the hub's)
#   use `vision_model.`; transformers 5.x writes SiglipVisionModel's names bare.
#   Gemma3ForConditionalGeneration (its language model): the hub's files say
#   `language_model.model.layers...` / `language_model.lm_head`, transformers 5 writes
#   `model.language_model.layers...` / `lm_head`.
HF_SPELLINGS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    **{arch: ((),) for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
                                "SmolLM3ForCausalLM")},
    "Gemma3ForConditionalGeneration": ((("", "language_model."),), (("model.", "model.language_model."),)),
    "SiglipVisionModel": ((("", "vision_model."),), ()), "SiglipModel": ((("", "vision_model."),),),
}


def spell(name: str, spelling: tuple[tuple[str, str], ...]) -> str:
    """`name` (a table's HF name) as a file of that spelling writes it (see HF_SPELLINGS).

        >>> spell("model.norm.weight", (("model.", "model.language_model."),))
        'model.language_model.norm.weight'
        >>> spell("lm_head.weight", (("model.", "model.language_model."),))
        'lm_head.weight'
        >>> spell("head.probe", (("", "vision_model."),))
        'vision_model.head.probe'
    """
    for table_prefix, file_prefix in spelling:
        if name.startswith(table_prefix):
            return file_prefix + name[len(table_prefix):]
    return name


def resolve(table: Iterable[Rule], our_paths: Iterable[str]) -> dict[str, tuple[str, Transform]]:
    """Maps each of our parameter paths ("a/b/c") to (hf_name, transform).

    Raises ValueError naming every path that matches no rule or more than one.
    """
    rules = [(r, r.pattern) for r in table]
    out, unmatched, ambiguous = {}, [], []
    for path in our_paths:
        hits = [(r, m) for r, m in ((r, p.match(path)) for r, p in rules) if m]
        if not hits:
            unmatched.append(path)
        elif len(hits) > 1:
            ambiguous.append(f"{path} <- {[r.ours for r, _ in hits]}")
        else:
            rule, m = hits[0]
            name = rule.hf.format(**m.groupdict())
            out[path] = (name, rule.transform)
    if unmatched or ambiguous:
        raise ValueError(f"name table does not cover the model: unmatched parameters {unmatched}; "
                         f"ambiguous {ambiguous}")
    return out
