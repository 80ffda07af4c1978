"""Image decoding, BlueLM-V-3B grid selection and tiling (data_pipelines/images.py)."""
import doctest
import io
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images
from data_pipelines.images import (
    ImageDecodeError,
    candidate_grids,
    decode_image,
    normalize,
    num_tiles,
    select_grid,
    to_tiles,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- reference selectors (independent re-implementations) ------------------------------

def _spec_reference(w0, h0, tile, max_tiles, alpha=0.1):
    """SPEC "Dynamic resolution" literally, in exact rationals (sides floored at 1 pixel)."""
    best, re_max, rw_min = None, 0, 0
    for m, n in sorted(((m, n) for m in range(1, max_tiles + 1)
                        for n in range(1, max_tiles + 1) if m * n <= max_tiles),
                       key=lambda g: (-g[0] * g[1], g[0])):
        W, H = tile * m, tile * n
        s = min(Fraction(W, w0), Fraction(H, h0))
        re = min(max(1, int(w0 * s)) * max(1, int(h0 * s)), w0 * h0)
        rw = W * H - re
        if best is None or re - re_max > alpha * re_max or (re_max - re < alpha * re_max
                                                              and rw < rw_min):
            best, re_max, rw_min = (m, n), re, rw
    return best


def _llava_next(w0, h0, tile, max_tiles):
    """LLaVA-NeXT select_best_resolution: max effective resolution, then min waste."""
    best, best_re, best_rw = None, -1, float("inf")
    for m in range(1, max_tiles + 1):
        for n in range(1, max_tiles // m + 1):
            W, H = tile * m, tile * n
            s = min(W / w0, H / h0)
            re = min(int(w0 * s) * int(h0 * s), w0 * h0)
            rw = W * H - re
            if re > best_re or (re == best_re and rw < best_rw):
                best, best_re, best_rw = (m, n), re, rw
    return best


def _internvl_15(w0, h0, image_size, max_num=6):
    """InternVL-1.5 find_closest_aspect_ratio (min_num = 1)."""
    ratios = sorted({(i, j) for k in range(1, max_num + 1) for i in range(1, k + 1)
                     for j in range(1, k + 1) if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(w0 / h0 - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w0 * h0 > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


# ---- select_grid -----------------------------------------------------------------------

def test_docstring_examples():
    result = doctest.testmod(images, verbose=False)
    assert result.attempted >= 7 and result.failed == 0


def test_paper_examples_and_the_baselines_they_beat():
    assert select_grid(394, 390, tile=384) == (1, 1)
    assert select_grid(380, 76, tile=384) == (1, 1)
    assert _llava_next(394, 390, 384, 16) == (2, 2)
    assert _internvl_15(380, 76, 448, max_num=6) == (5, 1)
    assert num_tiles(394, 390, tile=384, mode="dynamic") == 1   # LLaVA-NeXT: 4 + 1


def test_candidate_order():
    grids = candidate_grids(16)
    assert len(grids) == len(set(grids)) == sum(16 // m for m in range(1, 17)) == 50
    assert grids[:5] == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert grids[-1] == (1, 1)
    assert all(m * n <= 16 for m, n in grids)


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 9, 16])
def test_square_images_get_square_grids(max_tiles):
    for side in list(range(1, 400, 13)) + list(range(400, 6000, 97)):
        m, n = select_grid(side, side, tile=384, max_tiles=max_tiles)
        assert m == n and m * n <= max_tiles, (side, max_tiles, (m, n))
        if side <= 384:
            assert (m, n) == (1, 1)


def test_random_sizes_match_spec_reference_and_bounds():
    rng = random.Random(0)
    checked = 0
    for max_tiles in (1, 2, 4, 6, 9, 16):
        for _ in range(500):
            w, h = rng.randint(1, rng.choice([300, 2000, 8000])), rng.randint(1, rng.choice([300, 2000, 8000]))
            tile = rng.choice([14, 56, 384])
            m, n = select_grid(w, h, tile=tile, max_tiles=max_tiles)
            assert 1 <= m * n <= max_tiles
            assert (m, n) == _spec_reference(w, h, tile, max_tiles), (w, h, tile, max_tiles)
            assert select_grid(h, w, tile=tile, max_tiles=max_tiles) == (n, m)  # transpose
            checked += 1
    assert checked == 3000


def test_relaxation_trades_detail_for_fewer_tiles():
    # 800 x 800: 3 x 3 holds every pixel, 2 x 2 keeps 92% of them with no padding.
    assert _llava_next(800, 800, 384, 16) == (3, 3)
    assert select_grid(800, 800, tile=384) == (2, 2)
    # Below (1 - alpha) of the detail the bigger grid stays: for 1000 x 1000, 2 x 2 keeps 59%.
    assert select_grid(1000, 1000, tile=384) == (3, 3)
    assert select_grid(1000, 1000, tile=384, alpha=0.5) == (2, 2)


def test_select_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        select_grid(0, 10, tile=384)
    with pytest.raises(ValueError, match="max_tiles"):
        select_grid(10, 10, tile=384, max_tiles=0)
    with pytest.raises(ValueError, match="alpha"):
        select_grid(10, 10, tile=384, alpha=0.0)


# ---- to_tiles / num_tiles ----------------------------------------------------------

def test_dynamic_tiles_are_row_major_tiles_then_thumbnail():
    tile = 16
    assert select_grid(48, 32, tile=tile) == (3, 2)
    image = np.zeros((32, 48, 3), np.uint8)
    colours = [(10 * i, 255 - 20 * i, 7 * i) for i in range(6)]
    for i, colour in enumerate(colours):             # tile i at row i // 3, column i % 3
        r, c = divmod(i, 3)
        image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = colour
    out = to_tiles(image, tile=tile, mode="dynamic")
    assert out.shape == (7, tile, tile, 3) and out.dtype == np.uint8    # normalised on device
    for i, colour in enumerate(colours):
        np.testing.assert_array_equal(out[i], np.broadcast_to(np.asarray(colour, np.uint8), (tile, tile, 3)))
    thumb = np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[6], thumb)
    np.testing.assert_array_equal(to_tiles(image, tile=tile, mode="single")[0], out[6])


def test_normalisation_endpoints_and_determinism():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255
    out = normalize(to_tiles(image, tile=10, mode="dynamic"))          # 3 x 2 grid of exact tiles
    assert select_grid(30, 20, tile=10) == (3, 2) and out.shape == (7, 10, 10, 3)
    assert set(np.unique(out[[0, 3]])) == {-1.0} and out[2].min() == 1.0 == out[5].max()
    big = _rgb(300, 500, seed=3)
    a = to_tiles(big, tile=56, mode="dynamic")
    assert np.array_equal(a, to_tiles(big.copy(), tile=56, mode="dynamic"))
    assert -1.0 <= normalize(a).min() and normalize(a).max() <= 1.0


def test_num_tiles_matches_to_tiles_on_random_sizes():
    rng = random.Random(1)
    for _ in range(60):
        w, h = rng.randint(1, 200), rng.randint(1, 200)
        max_tiles = rng.choice([1, 4, 6, 16])
        image = _rgb(h, w, seed=w * 1000 + h)
        for mode in ("single", "dynamic"):
            out = to_tiles(image, tile=14, mode=mode, max_tiles=max_tiles)
            assert out.shape[0] == num_tiles(w, h, tile=14, mode=mode, max_tiles=max_tiles)
            assert out.shape[1:] == (14, 14, 3)
        m, n = select_grid(w, h, tile=14, max_tiles=max_tiles)
        assert out.shape[0] == (1 if m * n == 1 else m * n + 1)


def test_one_by_one_grid_has_no_duplicate_thumbnail():
    image = _rgb(40, 50)
    assert select_grid(50, 40, tile=56) == (1, 1)
    dynamic = to_tiles(image, tile=56, mode="dynamic")
    assert dynamic.shape == (1, 56, 56, 3)
    np.testing.assert_array_equal(dynamic, to_tiles(image, tile=56, mode="single"))


def test_to_tiles_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_tiles(np.zeros((8, 8, 3), np.float32), tile=4, mode="single")
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        to_tiles(np.zeros((8, 8), np.uint8), tile=4, mode="single")
    with pytest.raises(ValueError, match="mode"):
        to_tiles(np.zeros((8, 8, 3), np.uint8), tile=4, mode="anyres")
    with pytest.raises(ValueError, match="mode"):
        num_tiles(8, 8, tile=4, mode="anyres")


# ---- decode_image ----------------------------------------------------------------------

def test_decode_rgb_png_is_lossless():
    pixels = _rgb(17, 23)
    out = decode_image(_encode(Image.fromarray(pixels)))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, pixels)
    out[0, 0] = 0                                   # a writable copy


def test_decode_converts_every_mode_to_rgb():
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(grey, "L"))),
                                  np.repeat(grey[..., None], 3, axis=2))
    bits = decode_image(_encode(Image.fromarray(grey > 100)))
    assert set(np.unique(bits)) == {0, 255} and bits.shape == (6, 8, 3)
    # Alpha: composited over white. Opaque red stays red, transparent becomes white,
    # half-transparent red becomes (255, 127/128, 127/128).
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = [[255, 0, 128], [255, 0, 128]]
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out[:, 0], [[255, 0, 0]] * 2)
    np.testing.assert_array_equal(out[:, 1], [[255, 255, 255]] * 2)
    assert out[0, 2, 0] == 255 and 126 <= out[0, 2, 1] <= 128 and out[0, 2, 1] == out[0, 2, 2]
    la = decode_image(_encode(Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), "LA")))
    assert (la == 255).all()                         # fully transparent -> white
    # Palette, with and without a transparent index.
    pal = Image.fromarray(_rgb(5, 7)).quantize(colors=4)
    np.testing.assert_array_equal(decode_image(_encode(pal)), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    out = decode_image(_encode(pal, transparency=0))
    index = np.asarray(pal)
    assert (out[index == 0] == 255).all()
    np.testing.assert_array_equal(out[index != 0], np.asarray(pal.convert("RGB"))[index != 0])
    # 16-bit grey is scaled, not clipped.
    sixteen = np.array([[0, 257, 257 * 100, 65535]], np.uint16)
    out = decode_image(_encode(Image.fromarray(sixteen)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 255])
    # CMYK JPEG (lossy): close to the source colour.
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))       # red
    out = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3) and out[..., 0].min() > 230 and out[..., 1:].max() < 25


def test_corrupt_and_truncated_data_raise_with_the_reason():
    png = _encode(Image.fromarray(_rgb(40, 50)))
    with pytest.raises(ImageDecodeError, match="[Tt]runcated"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError, match="[Tt]runcated"):
        decode_image(png[:-20])                    # pixels complete, end of file missing
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    with pytest.raises(ImageDecodeError, match="checksum|broken"):
        decode_image(bytes(flipped))
    jpeg = _encode(Image.fromarray(_rgb(40, 50)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    for junk in (b"", b"not an image at all", bytes(range(256))):
        with pytest.raises(ImageDecodeError, match=f"{len(junk)} bytes.*cannot identify"):
            decode_image(junk)
    assert issubclass(ImageDecodeError, ValueError)
    with pytest.raises(TypeError, match="str"):
        decode_image("image.png")


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    """A phone JPEG stored 40 x 20 with EXIF Orientation = 6 (shown rotated 90 degrees
    clockwise): decoded upright, as `transformers.image_utils.load_image` gives it, and its tile
    grid is chosen from the upright size (20 x 40), not the stored one."""
    from transformers.image_utils import load_image
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # red on the stored left edge: the top once rotated upright
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "phone.jpg").write_bytes(buf.getvalue())

    pixels = decode_image(buf.getvalue())
    reference = np.asarray(load_image(str(tmp_path / "phone.jpg")).convert("RGB"))
    assert pixels.shape == reference.shape == (40, 20, 3)
    np.testing.assert_array_equal(pixels, reference)
    assert pixels[:8, :, 0].mean() > 200 and pixels[-8:, :, 0].mean() < 60  # red at the top
    # The grid follows the upright image: 2 columns x 4 rows of 10-px tiles (+ thumbnail), where
    # the stored axes would give 4 x 2.
    assert select_grid(20, 40, tile=10, max_tiles=8) == (2, 4) != select_grid(40, 20, tile=10, max_tiles=8)
    tiles = to_tiles(pixels, tile=10, mode="dynamic", max_tiles=8)
    assert len(tiles) == 9
    np.testing.assert_array_equal(tiles[1:], to_tiles(reference, tile=10, mode="dynamic", max_tiles=8)[1:])
