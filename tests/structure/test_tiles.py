"""Image tiles in the multimodal forward: the vision tower runs on the real tiles only
(`structure.embed_image_tokens`), and uint8 tiles are normalised on device.

Reference path (written here, as the model ran before the tile buffer): the tower and the
projector on every tile slot of every row, padding included, and the features written into
each row's image tokens by `merge_image_features`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import images as image_lib
from genieblue_jax import models, structure
from genieblue_jax.models.masks import positions_from_segments
from genieblue_jax.structure import mllm
from tests.structure.conftest import IMAGE_TOKEN, build


def _batch(mcfg, real_tiles, slots=4, seed=0):
    """Rows with real_tiles[r] tiles each (uint8, real ones first in `slots` slots; padding
    slots hold noise, which must not matter) and that many image-token runs."""
    rng = np.random.default_rng(seed)
    k, s = mcfg.tokens_per_tile, mcfg.vision.image_size
    tokens = rng.integers(0, 500, size=(len(real_tiles), 8 + slots * k)).astype(np.int32)
    for r, n in enumerate(real_tiles):
        tokens[r, 5:5 + n * k] = IMAGE_TOKEN
    images = rng.integers(0, 256, size=(len(real_tiles), slots, s, s, 3)).astype(np.uint8)
    return tokens, np.ones_like(tokens), images


def _reference_logits(mcfg, params, tokens, segments, images):
    """Every slot through the tower (host-normalised float pixels), then merged per row."""
    b, p = images.shape[:2]
    pixels = image_lib.normalize(images).reshape(b * p, *images.shape[2:])
    vision = models.build(mcfg.vision).apply({"params": params["vision"]}, pixels)["tokens"]
    feats = models.build(mcfg.projector).apply({"params": params["projector"]}, vision)
    feats = feats.reshape(b, p * feats.shape[1], feats.shape[2])
    decoder = structure.multimodal_decoder(mcfg)
    llm = structure.multimodal_llm_params(params["llm"], params["branch"])
    embeds = decoder.apply({"params": llm}, tokens, method="embed")
    is_image = tokens == mcfg.image_token_id
    embeds = structure.merge_image_features(embeds, is_image, feats)
    return decoder.apply({"params": llm}, tokens, positions_from_segments(segments), segments,
                         inputs_embeds=embeds, token_types=is_image.astype(jnp.int32))


def _counting(monkeypatch):
    """Counts, at run time, the tiles the vision tower is applied to."""
    seen = []
    inner = mllm.image_features

    def counted(mcfg, params, tiles):
        jax.debug.callback(lambda n: seen.append(int(n)), tiles.shape[0])
        return inner(mcfg, params, tiles)

    monkeypatch.setattr(mllm, "image_features", counted)
    return seen


@pytest.mark.parametrize("real_tiles, per_call, ran", [
    ((1, 0), 1, [1]),           # capacity 8, one real tile: the tower runs once, on one tile
    ((2, 1), 2, [2, 2]),        # 3 real tiles in calls of 2: two calls
    ((0, 0), 1, []),            # image slots but no image token: no call at all
])
@pytest.mark.slow
def test_the_vision_tower_runs_on_the_real_tiles_only(base_params, monkeypatch, real_tiles, per_call, ran):
    mcfg, params = build("genieblue", "skip", base_params)
    mcfg = mcfg.replace(vision=mcfg.vision.replace(tiles_per_call=per_call))
    tokens, segments, images = _batch(mcfg, real_tiles)
    seen = _counting(monkeypatch)
    forward = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")
    logits = forward(mcfg, params, tokens, positions_from_segments(segments), segments, images)
    jax.effects_barrier()
    assert seen == ran
    want = _reference_logits(mcfg, params, tokens, segments, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_each_batch_shard_gathers_its_own_tiles(base_params, monkeypatch):
    """Under a 2-way data mesh the rows form 2 groups, each with its own buffer: the tower runs
    as many calls as the fullest group needs (here 2 of 1 tile, both groups at once), and the
    features land in the right rows."""
    mcfg, params = build("genieblue", "skip", base_params)
    mcfg = mcfg.replace(vision=mcfg.vision.replace(tiles_per_call=1))
    tokens, segments, images = _batch(mcfg, (0, 2, 1, 0))
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    seen = _counting(monkeypatch)

    def forward(params, tokens, positions, segments, images):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return structure.forward(mcfg, params, tokens, positions, segments, images)

    rows = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, rows) for x in (tokens, positions_from_segments(segments), segments, images)]
    logits = jax.jit(forward)(params, *args)
    jax.effects_barrier()
    assert sum(seen) == 2 * 2            # 2 calls x (2 groups x 1 tile)
    want = _reference_logits(mcfg, params, tokens, segments, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=0)


def test_uint8_tiles_normalised_on_device_equal_the_host_float_path(base_params):
    """The pipeline ships uint8 tiles; the tower normalises them on device, bitwise as the host
    (HF's processor's float32 pixel values), so its features equal the float path's exactly."""
    mcfg, params = build("genieblue", "skip", base_params)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(3, mcfg.vision.image_size, mcfg.vision.image_size, 3)).astype(np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    for x in (pixels, every_value):
        device = jax.jit(models.siglip.normalize_pixels)(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(device), image_lib.normalize(x))
    features = jax.jit(structure.image_features, static_argnums=0)
    np.testing.assert_array_equal(np.asarray(features(mcfg, params, pixels)),
                                  np.asarray(features(mcfg, params, image_lib.normalize(pixels))))
