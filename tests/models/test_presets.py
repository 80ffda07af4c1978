"""Presets: exact parameter counts from abstract shapes alone (nothing allocated)."""
import jax
import pytest

from genieblue_jax import models


@pytest.mark.parametrize("name,count", [
    ("qwen2.5-3b", 3_085_938_688),          # SPEC
    ("siglip-so400m-384", 428_225_600),     # SPEC, with the attention-pooling head
    ("tinyllama-1.1b", 1_100_048_384),      # TinyLlama-1.1B's published size
    # The published sizes of the HF models (transformers' num_parameters() of each release).
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-1.5b", 1_543_714_304),
    ("qwen2.5-7b", 7_615_616_512),
    ("llama-3.2-1b", 1_235_814_400),
    ("siglip-base-patch16-224", 92_884_224),  # SiglipVisionModel of google/siglip-base-patch16-224
    ("siglip-so400m-224", 428_225_600 - (729 - 256) * 1152),  # the 384 tower with 16 x 16 positions, not 27 x 27
])
def test_preset_parameter_counts(name, count):
    abstract = models.abstract_params(models.get_preset(name))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert models.count_params(abstract) == count


def test_spec_architecture_numbers():
    q = models.get_preset("qwen2.5-3b")
    assert (q.hidden_size, q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim, q.intermediate_size,
            q.vocab_size, q.rope_theta, q.rms_norm_eps, q.qkv_bias, q.out_bias, q.tie_embeddings) == (
        2048, 36, 16, 2, 128, 11008, 151936, 1e6, 1e-6, True, False, True)
    v = models.get_preset("siglip-so400m-384")
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.image_size,
            v.patch_size, v.num_patches, v.layer_norm_eps) == (1152, 27, 16, 4304, 384, 14, 729, 1e-6)


def test_siglip_without_head_drops_exactly_the_head():
    cfg = models.get_preset("siglip-so400m-384")
    with_head = models.count_params(models.abstract_params(cfg))
    without = models.count_params(models.abstract_params(cfg.replace(use_head=False)))
    d, m = cfg.hidden_size, cfg.intermediate_size
    head = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    assert with_head - without == head


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="qwen2.5-3b"):
        models.get_preset("qwen3")
