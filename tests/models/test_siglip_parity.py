"""SigLIP vision features against `transformers` (SiglipVisionModel and SiglipModel)."""
import numpy as np
import pytest
import torch

import genieblue_jax
from genieblue_jax.hf import import_hf
from tests.conftest import SIGLIP_CONFIG, build_hf_siglip


def _pixels(n=2, seed=0):
    size = SIGLIP_CONFIG["image_size"]
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, size, size, 3)).astype(np.float32)  # NHWC, normalised


def _hf_outputs(model, pixels_nhwc):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)),
                     output_hidden_states=True)


@pytest.mark.parametrize("use_head", [True, False])
def test_vision_tower_matches_transformers(use_head, hf_siglip_dir):
    model = genieblue_jax.load(hf_siglip_dir(use_head=use_head))
    pixels = _pixels()
    ref = _hf_outputs(build_hf_siglip(use_head=use_head), pixels)
    ours = model.vision_features(pixels, with_pooled=use_head)
    diff = np.abs(ours["tokens"] - ref.last_hidden_state.numpy()).max()
    print(f"siglip head={use_head}: last_hidden_state max diff {diff:.2e}")
    assert ours["tokens"].shape == (2, 25, SIGLIP_CONFIG["hidden_size"]) and diff <= 1e-4
    if use_head:
        pooled_diff = np.abs(ours["pooled"] - ref.pooler_output.numpy()).max()
        print(f"siglip pooled max diff {pooled_diff:.2e}")
        assert pooled_diff <= 1e-4
    else:
        assert "head" not in model.params["vision"]


@pytest.mark.parametrize("select_layer", [-2, 0, 1])
def test_selected_layer_matches_hidden_states(select_layer, hf_siglip_dir):
    _, cfg, params = import_hf(hf_siglip_dir(), select_layer=select_layer)
    model = genieblue_jax.GenieBlue({"vision": cfg}, {"vision": params})
    pixels = _pixels(seed=3)
    ref = _hf_outputs(build_hf_siglip(), pixels).hidden_states[select_layer].numpy()
    diff = np.abs(model.vision_features(pixels)["tokens"] - ref).max()
    print(f"siglip select_layer={select_layer}: max diff {diff:.2e}")
    assert diff <= 1e-4


def test_siglip_model_imports_vision_half_only(hf_siglip_dir):
    model = genieblue_jax.load(hf_siglip_dir(full_model=True))
    assert set(model.configs) == {"vision"}
    pixels = _pixels(seed=5)
    hf = build_hf_siglip(full_model=True)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    ours = model.vision_features(pixels, with_pooled=True)
    assert np.abs(ours["tokens"] - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(ours["pooled"] - ref.pooler_output.numpy()).max() <= 1e-4


def test_wrong_image_size_names_the_expected_shape(hf_siglip_dir):
    model = genieblue_jax.load(hf_siglip_dir())
    with pytest.raises(ValueError, match=r"expects NHWC \(batch, 30, 30, 3\)"):
        model.vision_features(np.zeros((1, 32, 32, 3), np.float32))


def test_siglip2_fixed_resolution_checkpoint(tmp_path):
    """A SigLIP 2 fixed-resolution checkpoint as Google publishes them: a SiglipModel config
    without `architectures` (model_type "siglip" only) and the patch-16 layout of
    siglip2-so400m-patch16-512 at a tiny size (4 x 4 patches: an even grid, which the 2x2
    downsampler does not pad, unlike so400m-384's 27 x 27). The vision tower imports and
    gives transformers' features and pooled output."""
    import json

    import transformers
    torch.manual_seed(1)
    vision = transformers.SiglipVisionConfig(hidden_size=40, intermediate_size=88, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=64, patch_size=16)
    text = transformers.SiglipTextConfig(vocab_size=64, hidden_size=40, intermediate_size=88, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=16)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("architectures")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    model = genieblue_jax.load(str(tmp_path))
    assert model.configs["vision"].grid_size == 4
    pixels = np.random.default_rng(2).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)
    ref = _hf_outputs(hf.vision_model, pixels)
    ours = model.vision_features(pixels, with_pooled=True)
    diff = max(np.abs(ours["tokens"] - ref.last_hidden_state.numpy()).max(),
               np.abs(ours["pooled"] - ref.pooler_output.numpy()).max())
    print(f"siglip2-shaped: max diff {diff:.2e}")
    assert diff <= 1e-4
