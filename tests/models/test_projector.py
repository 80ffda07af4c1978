"""The projector against a PyTorch transcription of VILA's `mlp_downsample` projector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genieblue_jax import models
from genieblue_jax.models.projector import downsampled_grid, vila_downsample


def vila_flat_square(x):
    """VILA's DownSampleBlock.flat_square, verbatim apart from formatting."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    return x


def vila_downsample_block(tokens):
    h = w = int(tokens.shape[1] ** 0.5)
    x = tokens.reshape(tokens.shape[0], h, w, -1)
    x = vila_flat_square(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize("grid", [3, 4, 7, 27])
def test_downsampler_is_bitwise_vila(grid):
    x = np.random.default_rng(grid).normal(size=(2, grid * grid, 5)).astype(np.float32)
    ours = np.asarray(vila_downsample(jnp.asarray(x)))
    ref = vila_downsample_block(torch.from_numpy(x)).numpy()
    assert ours.shape == (2, downsampled_grid(grid * grid) ** 2, 20)
    np.testing.assert_array_equal(ours, ref)


def test_docstring_worked_example():
    x = jnp.arange(1, 10, dtype=jnp.float32).reshape(1, 9, 1)  # tokens 1..9, 0 = pad
    out = np.asarray(vila_downsample(x))[0]
    np.testing.assert_array_equal(out, [[1, 2, 4, 5], [7, 8, 0, 0], [3, 0, 6, 0], [9, 0, 0, 0]])


def test_siglip_so400m_grid_gives_196_tokens_of_4608():
    out = jax.eval_shape(vila_downsample, jax.ShapeDtypeStruct((1, 729, 1152), jnp.float32))
    assert out.shape == (1, 196, 4608)


def test_projector_matches_torch_mlp():
    cfg = models.ProjectorConfig(vision_hidden_size=12, llm_hidden_size=16)
    params = models.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    x = np.random.default_rng(0).normal(size=(2, 49, 12)).astype(np.float32)
    ours = np.asarray(models.build(cfg).apply({"params": params}, jnp.asarray(x)))

    mlp = torch.nn.Sequential(torch.nn.LayerNorm(48), torch.nn.Linear(48, 16), torch.nn.GELU(),
                              torch.nn.Linear(16, 16))
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
    with torch.no_grad():
        for module, name, transpose in ((mlp[0], "layer_norm", False), (mlp[1], "linear_1", True),
                                        (mlp[3], "linear_2", True)):
            weight = p[name]["kernel"].T if transpose else p[name]["scale"]
            module.weight.copy_(weight)
            module.bias.copy_(p[name]["bias"])
        ref = mlp(vila_downsample_block(torch.from_numpy(x))).numpy()
    assert ours.shape == (2, 16, 16)
    assert np.abs(ours - ref).max() <= 1e-5


def test_shipped_torch_projector_matches_ours_and_round_trips():
    from genieblue_jax.export.torch_modules import VilaProjector, projector_params_from_state_dict, projector_state_dict
    cfg = models.ProjectorConfig(vision_hidden_size=12, llm_hidden_size=16)
    params = models.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    x = np.random.default_rng(0).normal(size=(2, 49, 12)).astype(np.float32)
    ours = np.asarray(models.build(cfg).apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        ref = VilaProjector.from_params(cfg, params)(torch.from_numpy(x)).numpy()
    assert np.abs(ours - ref).max() <= 1e-5
    back = projector_params_from_state_dict(cfg, projector_state_dict(cfg, params))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="missing"):
        projector_params_from_state_dict(cfg, {})
