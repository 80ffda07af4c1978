"""Packed rows: segments never attend across each other, positions restart per segment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genieblue_jax import models
from genieblue_jax.models.masks import causal_segment_mask, positions_from_segments


def test_mask_docstring_example():
    mask = np.asarray(causal_segment_mask(jnp.array([[1, 1, 2, 2, 0]])))[0].astype(int)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])


def test_positions_restart_per_segment():
    np.testing.assert_array_equal(positions_from_segments([[1, 1, 1, 2, 2, 0, 0]]),
                                  [[0, 1, 2, 0, 1, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments([[0, 0, 1, 1, 1]]), [[0, 0, 0, 1, 2]])
    # Two adjacent samples that happen to share an id are one segment: ids must differ.
    np.testing.assert_array_equal(positions_from_segments([[3, 3, 4]]), [[0, 1, 0]])


def _forward(cfg, params, ids, seg):
    pos = positions_from_segments(seg)
    return np.asarray(models.build(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(pos),
                                              jnp.asarray(seg)))


@pytest.mark.slow
def test_two_packed_sequences_equal_each_alone():
    for preset in ("tiny-qwen2", "tiny-llama"):
        cfg = models.get_preset(preset)
        params = models.init_params(cfg, jax.random.key(0))
        rng = np.random.default_rng(0)
        a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
        packed = np.concatenate([a, b, [0, 0]])[None]
        seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
        out = _forward(cfg, params, packed, seg)
        alone_a = _forward(cfg, params, a[None], np.ones((1, 7), int))
        alone_b = _forward(cfg, params, b[None], np.ones((1, 5), int))
        diff = max(np.abs(out[0, :7] - alone_a[0]).max(), np.abs(out[0, 7:12] - alone_b[0]).max())
        print(f"{preset}: packed vs alone max diff {diff:.2e}")
        assert diff <= 1e-5


def test_positions_match_a_plain_loop_on_random_layouts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 6, size=rng.integers(1, 5))
        seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(rng.integers(0, 4), int)])
        expected, count, prev = [], 0, None
        for s in seg:
            count = 0 if s == 0 else (count + 1 if s == prev else 0)
            expected.append(count)
            prev = s
        np.testing.assert_array_equal(positions_from_segments(seg[None])[0], expected)
