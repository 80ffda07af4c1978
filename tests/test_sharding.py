"""Meshes, regex sharding rules, and sharded init / import / restore on 8 virtual CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import genieblue_jax
from genieblue_jax import models
from genieblue_jax.hf import import_hf
from genieblue_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings, spec_for


def test_eight_virtual_devices():
    assert jax.device_count() == 8  # set by tests/conftest.py


def test_mesh_fills_the_minus_one_axis():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        make_mesh({"data": 3, "fsdp": 2})


def test_every_parameter_of_every_model_is_covered():
    mesh = make_mesh({"fsdp": 1, "data": -1})
    for preset in ("qwen2.5-3b", "tinyllama-1.1b", "siglip-so400m-384"):
        param_shardings(models.abstract_params(models.get_preset(preset)), mesh)
    param_shardings(models.abstract_params(models.ProjectorConfig(1152, 2048)), mesh)


def test_uncovered_or_indivisible_parameters_are_named():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    rules_without_norms = [r for r in DEFAULT_RULES if "norm" not in r[0]]
    with pytest.raises(ValueError, match="no sharding rule matches parameter 'layers_0/input_layernorm/scale'"):
        param_shardings(models.abstract_params(models.get_preset("tiny-qwen2")), mesh, rules_without_norms)
    with pytest.raises(ValueError, match=r"'layers_0/mlp/up_proj/kernel': dimension 6 .* by mesh axes \('fsdp',\)"):
        spec_for("layers_0/mlp/up_proj/kernel", (6, 8), mesh)


def test_sharded_init_places_each_parameter_in_its_shards():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    cfg = models.get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(0), param_shardings(models.abstract_params(cfg), mesh))
    q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor") and q.shape == (64, 64)
    assert {s.data.shape for s in q.addressable_shards} == {(16, 32)}
    emb = params["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(256, 16)}
    # Same values as an unsharded init with the same key.
    plain = models.init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain["layers_0"]["self_attn"]["q_proj"]["kernel"]))


def test_import_and_restore_into_a_mesh(hf_decoder_dir, tmp_path):
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    hf_dir = hf_decoder_dir("qwen2-a")
    _, cfg, params = import_hf(hf_dir, out=str(tmp_path / "ckpt"), mesh=mesh)
    down = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert down.sharding.spec == P("tensor", "fsdp") and len(down.addressable_shards) == 8
    model = genieblue_jax.load(str(tmp_path / "ckpt"), mesh=mesh)
    restored = model.params["llm"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert restored.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(down))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 10))
    single = genieblue_jax.load(hf_dir).logits(ids)
    assert np.abs(model.logits(ids) - single).max() <= 1e-5


def test_every_mllm_variant_is_covered_at_paper_scale():
    from genieblue_jax import structure
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    for variant in structure.VARIANTS:
        mcfg = structure.MLLMConfig.from_presets(
            "qwen2.5-3b", "siglip-so400m-384", structure.StructureConfig(variant=variant))
        shardings = models.flatten(param_shardings(structure.abstract_mllm(mcfg), mesh))
        if variant != "full":
            lora = [s for n, s in shardings.items() if n.endswith("lora_a")]
            assert lora and all(s.spec == P() for s in lora)
        if variant == "cogvlm":
            assert shardings["branch/layers_4/self_attn/vision_q_proj/kernel"].spec == P("fsdp", "tensor")


def test_branch_init_lands_in_its_shardings():
    from genieblue_jax import structure
    from tests.structure.conftest import make_mcfg
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    mcfg = make_mcfg("genieblue", "skip")
    base = models.init_params(mcfg.llm, jax.random.key(0), param_shardings(models.abstract_params(mcfg.llm), mesh))
    shardings = param_shardings(structure.abstract_branch(mcfg), mesh)
    branch = structure.init_branch(mcfg, base, jax.random.key(1), shardings)
    q = branch["layers_4"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(base["layers_4"]["self_attn"]["q_proj"]["kernel"]))
