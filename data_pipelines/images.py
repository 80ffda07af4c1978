"""Image decoding and dynamic-resolution tiling (BlueLM-V-3B relaxed aspect-ratio matching).

Pipeline for one encoded image (PNG / JPEG / ... bytes):

    pixels = decode_image(data)                               # uint8 (H, W, 3) RGB
    tiles = to_tiles(pixels, tile=384, mode="dynamic")   # uint8 (k, 384, 384, 3)

`mode="single"` squeezes the whole image into one tile. `mode="dynamic"` resizes the image
to the m x n grid chosen by `select_grid` (m columns, n rows of `tile`-pixel tiles), cuts
it row-major and appends one global thumbnail, so k = m * n + 1 (k = 1 when the grid is
1 x 1: the grid tile *is* the thumbnail). `num_tiles` gives k from the size alone, so
token budgets can be planned without decoding pixels.

All resizing is PIL bicubic on uint8 pixels, which is deterministic: the same bytes always
give bitwise-identical tiles for a fixed Pillow version.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

MODES = ("single", "dynamic")

# 16-bit grey PNGs load as one of these modes; PIL's own convert("RGB") would clip them.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# Decompression bombs: a 165 KB PNG can declare 12000 x 12000 pixels (432 MB decoded). Images
# above this many pixels are refused from their header, before any pixel is decoded (PIL's own
# guard only warns up to 179 Mpx). 64 Mpx keeps every real photo (a 200 Mpx phone sensor saves
# 50 Mpx by default) far above the 16 tiles of 384 px (2.4 Mpx) the model sees.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """Encoded image bytes that PIL cannot decode (corrupt, truncated, unknown format)."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more pixels than allowed (a decompression bomb)."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image file to uint8 (H, W, 3) RGB.

    Every PIL mode is accepted: grey ("L", "1"), palette ("P"), "CMYK", "YCbCr", 16-bit grey
    (scaled by 1/257 so 65535 -> 255, where PIL alone would clip), and images with alpha
    ("RGBA", "LA", "PA", or a "transparency" entry such as a PNG tRNS chunk), which are
    composited over white: the colour under a fully transparent pixel is undefined.
    EXIF orientation is applied (`PIL.ImageOps.exif_transpose`, as
    `transformers.image_utils.load_image` and image viewers do): a phone photo stored
    sideways with Orientation = 6 comes back upright, and its tile grid follows the upright
    axes. Every path decodes through here (conversion, pipeline, chat, evaluate, export
    calibration).

    Raises ImageTooLargeError (an ImageDecodeError) when the header declares more than
    `max_pixels` pixels, before decoding any, and ImageDecodeError (a ValueError) with PIL's
    reason for corrupt, truncated or unrecognised data; callers add the record id / file name.
    PNG chunk checksums are verified; formats without checksums (JPEG) only fail when the
    decoder does.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image of {width} x {height} = {width * height / 1e6:.1f} Mpx "
                                         f"({len(data)} bytes) exceeds the limit of {max_pixels / 1e6:.1f} Mpx")
            img.verify()  # PNG: chunk CRCs and a missing end, which load() alone forgives
        with Image.open(io.BytesIO(data)) as img:
            img.load()    # PIL decodes lazily: force it so truncation is caught here
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, met at open (> 179 Mpx)
        raise ImageTooLargeError(f"image of {len(data)} bytes exceeds PIL's pixel limit: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes, starting {data[:8]!r}): "
            f"{type(e).__name__}: {e}") from e
    return np.array(rgb, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.int64)
        grey = ((np.clip(grey, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "A" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _effective_and_wasted(w0: int, h0: int, width: int, height: int) -> tuple[int, int]:
    """(Re, Rw) of fitting a w0 x h0 image into a width x height canvas, in exact integers.

    s = min(width / w0, height / h0); Re = min(int(w0 s) * int(h0 s), w0 h0);
    Rw = width * height - Re. The side that limits s is scaled to exactly `width` (or
    `height`); the float product int(w0 * (width / w0)) of the reference code can come out
    one pixel short, so the other side is computed as an integer floor division instead.
    A side that would shrink below one pixel counts as 1 (a resize cannot go to 0 pixels),
    which keeps Re > 0 for extreme shapes (e.g. 4 x 3571) so they still get a fitting grid.
    """
    if width * h0 <= height * w0:        # s = width / w0
        scaled = width * max(1, h0 * width // w0)
    else:                                # s = height / h0
        scaled = max(1, w0 * height // h0) * height
    effective = min(scaled, w0 * h0)
    return effective, width * height - effective


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """All grids (m columns, n rows) with m * n <= max_tiles, in the order `select_grid`
    visits them: largest first (m * n descending), equal areas by m ascending (taller first).

    >>> candidate_grids(3)
    [(1, 3), (3, 1), (1, 2), (2, 1), (1, 1)]
    """
    grids = [(m, n) for m in range(1, max_tiles + 1) for n in range(1, max_tiles // m + 1)]
    return sorted(grids, key=lambda g: (-g[0] * g[1], g[0]))


def select_grid(width: int, height: int, *, tile: int, max_tiles: int = 16,
                alpha: float = 0.1) -> tuple[int, int]:
    """The (m columns, n rows) tile grid for a width x height image, m * n <= max_tiles.

    BlueLM-V-3B's relaxed aspect-ratio matching (arXiv 2411.10640, Alg. 1). Each candidate
    grid is a canvas (W, H) = (tile * m, tile * n). Fitting the image into it with the
    aspect ratio kept, s = min(W / width, H / height), gives

        Re = min(int(width * s) * int(height * s), width * height)   effective resolution
        Rw = W * H - Re                                                wasted resolution

    Candidates are visited from the largest down (`candidate_grids`: m * n descending, then
    m ascending). The first is taken; each later one replaces the current best (whose Re, Rw
    become Re_max, Rw_min) if

        Re - Re_max > alpha * Re_max                       (clearly more detail), or
        Re_max - Re < alpha * Re_max  and  Rw < Rw_min     (nearly as much, less waste).

    So a smaller grid wins whenever it keeps at least (1 - alpha) of the detail with less
    padding, instead of upscaling the image to fill a bigger canvas. The order among grids
    of equal area only matters for exact ties in Re (then the first visited is kept).

    Worked examples (the paper's, with 384-pixel tiles):

    >>> select_grid(394, 390, tile=384)    # LLaVA-NeXT (max Re, then min Rw) picks 2:2
    (1, 1)
    >>> select_grid(380, 76, tile=384)     # InternVL-1.5 (closest ratio, max 6) picks 5:1
    (1, 1)

    For 394 x 390 the 2 x 2 canvas (768 x 768) holds all 153660 pixels, but 1 x 1 keeps
    384 * 380 = 145920 of them (95%, within alpha = 10%) and wastes 1536 pixels instead of
    436164, so the image costs 1 tile instead of 4 (+1 thumbnail). For 380 x 76 every
    canvas holds the whole image (s >= 1), so the least wasteful, 1 x 1, wins.

    More: squares stay square; the relaxation trades up to alpha of the detail for fewer
    tiles (800 x 800: 2 x 2 keeps 589824 of 640000 pixels, 92%, with no waste, where
    3 x 3 would upscale); a 4:1 panorama gets a 4:1 grid.

    >>> select_grid(1000, 1000, tile=384), select_grid(800, 800, tile=384)
    ((3, 3), (2, 2))
    >>> select_grid(1600, 400, tile=384), select_grid(1600, 400, tile=384, max_tiles=2)
    ((4, 1), (2, 1))
    """
    for name, value in (("width", width), ("height", height), ("tile", tile),
                        ("max_tiles", max_tiles)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"select_grid: {name} must be a positive int, got {value!r}")
    if not alpha > 0:
        # With alpha = 0 the strict "<" never lets an equally good, less wasteful grid
        # replace a larger one; alpha must be a positive tolerance.
        raise ValueError(f"select_grid: alpha must be > 0, got {alpha!r}")
    best = None
    re_max = rw_min = 0
    for m, n in candidate_grids(int(max_tiles)):
        re, rw = _effective_and_wasted(int(width), int(height), tile * m, tile * n)
        if (best is None or re - re_max > alpha * re_max
                or (re_max - re < alpha * re_max and rw < rw_min)):
            best, re_max, rw_min = (m, n), re, rw
    return best


def num_tiles(width: int, height: int, *, tile: int, mode: str, max_tiles: int = 16) -> int:
    """How many tiles `to_tiles` returns for a width x height image (no pixels needed).

    >>> num_tiles(394, 390, tile=384, mode="dynamic"), num_tiles(1600, 400, tile=384, mode="dynamic")
    (1, 5)
    >>> num_tiles(1600, 400, tile=384, mode="single")
    1
    """
    if mode == "single":
        return 1
    if mode != "dynamic":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    m, n = select_grid(width, height, tile=tile, max_tiles=max_tiles)
    return m * n + (1 if m * n > 1 else 0)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 SigLIP normalisation (x / 255 - 0.5) / 0.5: 0 -> -1.0, 255 -> 1.0: the
    `pixel_values` HF's `SiglipImageProcessor` gives, for the exported graphs that take them.
    Training and inference in JAX normalise on device instead (`models.siglip.normalize_pixels`,
    tested equal), so tiles travel as uint8, a quarter of float32's bytes."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def to_tiles(image: np.ndarray, *, tile: int, mode: str, max_tiles: int = 16) -> np.ndarray:
    """Cut a uint8 (H, W, 3) image into uint8 (k, tile, tile, 3) tiles (resized, not normalised:
    `normalize` on the host or `models.siglip.normalize_pixels` on device).

    mode "single":  k = 1, the whole image resized to tile x tile.
    mode "dynamic": the m x n grid of `select_grid`: the image is resized to
                    (m * tile, n * tile) and cut row-major (tile i is row i // m,
                    column i % m), then one global thumbnail (the whole image resized to
                    tile x tile) is appended: k = m * n + 1. For a 1 x 1 grid the single
                    tile already is the thumbnail, so k = 1.

    E.g. a 1600 x 400 image with tile=384: grid 4 x 1, the image is resized to 1536 x 384,
    tiles 0..3 are its columns left to right, tile 4 is the thumbnail.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"to_tiles expects a uint8 (H, W, 3) image, got {image.dtype} "
                         f"{image.shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    height, width = image.shape[:2]
    pil = Image.fromarray(image, mode="RGB")
    thumbnail = _resize(pil, tile, tile)[None]
    if mode == "single":
        return thumbnail
    m, n = select_grid(width, height, tile=tile, max_tiles=max_tiles)
    if m * n == 1:
        return thumbnail
    grid = _resize(pil, m * tile, n * tile)                       # (n*p, m*p, 3)
    tiles = grid.reshape(n, tile, m, tile, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(n * m, tile, tile, 3)
    return np.concatenate([tiles, thumbnail], axis=0)


def _resize(pil: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)
