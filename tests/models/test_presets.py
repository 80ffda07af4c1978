"""Presets: exact parameter counts from abstract shapes alone (nothing allocated)."""
import jax
import pytest

from genieblue_jax import models
from tests.published_configs import PUBLISHED


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


# --- the families' presets: what the importer reads from each published config.json ---------

def _meta_count(model_cls, config) -> int:
    """transformers' own parameter count of `config`, built on the meta device (nothing
    allocated; tied weights counted once)."""
    import torch
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", [n for n in PUBLISHED if not n.startswith("siglip")])
def test_llm_presets_are_their_published_configs(preset):
    """The preset equals what `hf.configs.llm_config_from_hf` reads from the published config.json
    (so the import of the real checkpoint takes every field), and its parameter count from
    abstract shapes equals transformers' count of the same config."""
    import transformers

    from genieblue_jax.hf.configs import llm_config_from_hf
    hub_id, published = PUBLISHED[preset]
    ours = models.get_preset(preset)
    assert llm_config_from_hf(published, source=f"{hub_id}/config.json") == ours
    text = published.get("text_config", published)  # gemma-3-4b: the VLM's language model
    cls = {"LlamaForCausalLM": transformers.LlamaForCausalLM, "Qwen3ForCausalLM": transformers.Qwen3ForCausalLM,
           "Gemma3ForCausalLM": transformers.Gemma3ForCausalLM, "SmolLM3ForCausalLM": transformers.SmolLM3ForCausalLM,
           "Gemma3ForConditionalGeneration": transformers.Gemma3ForCausalLM}[published["architectures"][0]]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in text.items() if k != "architectures"})
    assert models.count_params(models.abstract_params(ours)) == _meta_count(cls, config)


@pytest.mark.parametrize("preset", [n for n in PUBLISHED if n.startswith("siglip")])
def test_siglip2_presets_are_their_published_configs(preset):
    """SigLIP 2's fixed-resolution checkpoints are SiglipModel configs without `architectures`:
    the vision tower we import from them is the preset, with transformers' parameter count."""
    import transformers

    from genieblue_jax.hf.configs import vision_config_from_hf
    hub_id, published = PUBLISHED[preset]
    assert "architectures" not in published and published["model_type"] == "siglip"
    ours = models.get_preset(preset)
    assert vision_config_from_hf(published, source=f"{hub_id}/config.json") == ours
    config = transformers.SiglipVisionConfig(**{k: v for k, v in published["vision_config"].items()
                                               if k != "model_type"})
    assert models.count_params(models.abstract_params(ours)) == _meta_count(transformers.SiglipVisionModel, config)
