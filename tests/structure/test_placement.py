"""Placements and layer kinds."""
import pytest

from genieblue_jax import structure
from genieblue_jax.structure import StructureConfig, replicated_layers


def test_36_layers_interval_4_pick_9_blocks_at_the_documented_indices():
    assert replicated_layers(36, "skip", 4) == (0, 4, 8, 12, 16, 20, 24, 28, 32)
    assert replicated_layers(36, "pre", 4) == tuple(range(9))
    assert replicated_layers(36, "post", 4) == tuple(range(27, 36))


def test_uneven_layer_counts_keep_equal_budgets():
    for n_layers in (8, 22, 28):
        sizes = {len(replicated_layers(n_layers, p, 4)) for p in structure.PLACEMENTS}
        assert len(sizes) == 1, n_layers


def test_layer_kinds_per_variant():
    assert StructureConfig("genieblue", "skip").layer_kinds(8) == ("base", "lora", "lora", "lora") * 2
    assert StructureConfig("cogvlm", "post").layer_kinds(8) == ("lora",) * 6 + ("expert",) * 2
    assert StructureConfig("lora").layer_kinds(4) == ("lora",) * 4
    assert StructureConfig("full").layer_kinds(4) == ("base",) * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="moe"), "variant='moe'"),
    (dict(placement="middle"), "placement='middle'"),
    (dict(lora_targets=("qkv",)), "lora targets \\['qkv'\\]"),
    (dict(lora_rank=0), "lora rank"),
])
def test_bad_structure_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructureConfig(**kwargs)
