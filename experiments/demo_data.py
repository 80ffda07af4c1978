"""The project's own synthetic multimodal dataset: small rendered scenes, questions, text tasks.

Everything is a pure function of (split, seed, index): example `index` of a split is the
same whatever `n` is asked for, and the PNG bytes are identical on every run (for a fixed
Pillow version: text is rendered with Pillow's bundled default font).

    for ex in demo_examples("train", 1000, seed=0):   # data_pipelines.records.Example
        ...

Sources (`SOURCES`) and the default mixture `MIXTURE` = caption 3, vqa 3, ocr 2, text 2:
the weights are integers per block of sum(weights) = 10 consecutive examples, and every
block holds exactly that many of each source, in a shuffled order. So the first n examples
contain exactly n/10 * weight of each source when 10 divides n (off by < 1 block otherwise).
Pass `mixture={"text": 1}` for a text-only set, `{"caption": 1, "vqa": 1, "ocr": 1}` for
multimodal only, and so on.

  caption  "<image>\\nDescribe the image."    -> "two red circles and one blue square"
  vqa      "<image>\\nHow many yellow objects are there?" -> "two";  "What colour is the
           square?" -> "blue";  "What shape is the green object?" -> "triangle";
           "How many objects are there?" -> "three";  "Is there a purple object?" -> "yes" / "no"
  ocr      "<image>\\nWhat is written in the image?" -> "QZKA" (3-4 capital letters)
  text     (no image) "What is 3 + 4?" -> "7";  "What is 9 - 4?" -> "5";
           "What letter comes after c?" -> "d";  "What letter comes before c?" -> "b"

Design: the answer vocabularies are disjoint. Multimodal answers are number WORDS, colour
and shape names, yes / no and capital letters; text-task answers are digits and lower-case
letters. The text tasks are meant for the base LLM's pretraining only (and for measuring
text retention); training the whole LLM on caption / vqa / ocr pulls its outputs towards
the multimodal vocabulary, so a fully fine-tuned model measurably loses the text tasks,
while a frozen-LLM GenieBlue model keeps them. The splits are independent draws, not
disjoint sets: the text-task space is small (e.g. 100 additions), so train and eval share
questions, which is what a retention measurement wants.

Images (`scene`, one of `SCENES`): shapes (circle, square, triangle) in `COLOURS`, drawn
without anti-aliasing (exact palette colours).
  "grid" (default)  1-3 objects, each inside its own cell of a grid of (image_size / 2)-px
                    cells, so objects never touch; the canvas is image_size x image_size
                    (60%), 2x wide (20%) or 2x tall (20%), so dynamic resolution with
                    tile = image_size cuts wide / tall images into 2 tiles (+ 1 thumbnail).
                    Every VQA task.
  "single"          one object, 55-80% of the side, on a square canvas; VQA asks its colour
                    or its shape ("What colour is the circle?" -> "red"), captions are
                    "one red circle". What the embedded demo trains on: a 1.6M-parameter
                    MLLM grounds it in ~150 CPU steps (small objects in "grid" scenes cover
                    one or two of its 16 image tokens, and it stays near chance).
OCR text (either scene) is anti-aliased, always fully inside a square / wide / tall canvas.
"""
from __future__ import annotations

import functools
import io
import random
from typing import Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.records import IMAGE_TAG, Example

SOURCES = ("caption", "vqa", "ocr", "text")
MIXTURE = {"caption": 3, "vqa": 3, "ocr": 2, "text": 2}
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220),
           "yellow": (240, 200, 20), "purple": (140, 50, 170)}
BACKGROUNDS = ((255, 255, 255), (236, 236, 236), (250, 244, 228))
TEXT_COLOURS = ((20, 20, 20), (20, 40, 140), (150, 20, 20), (20, 100, 40))
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
VQA_TASKS = ("count_colour", "count_total", "colour_of", "shape_of", "exists_colour")
# Scene styles (module docstring) and the VQA tasks each asks.
SCENES = ("grid", "single")
SCENE_TASKS = {"grid": VQA_TASKS, "single": ("colour_of", "shape_of")}
TEXT_TASKS = ("add", "sub", "next_letter", "prev_letter")
# Every word a caption / vqa answer can contain (ocr answers are capitals, text ones are not).
MULTIMODAL_WORDS = frozenset(NUMBER_WORDS + SHAPES + tuple(s + "s" for s in SHAPES)
                             + tuple(COLOURS) + ("yes", "no", "and"))
PROMPTS = {"caption": "Describe the image.", "ocr": "What is written in the image?"}
MIN_IMAGE_SIZE = 24
MAX_OBJECTS = 3
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_MARGIN = 2          # OCR text keeps this many pixels from every edge


def demo_examples(split: str, n: int, seed: int, *, image_size: int = 56,
                  mixture: Mapping[str, int] | None = None, scene: str = "grid") -> Iterator[Example]:
    """The first n examples of (split, seed): `demo_item(split, i, seed)[0]` for i < n."""
    for example, _ in demo_items(split, n, seed, image_size=image_size, mixture=mixture, scene=scene):
        yield example


def demo_items(split: str, n: int, seed: int, *, image_size: int = 56,
               mixture: Mapping[str, int] | None = None, scene: str = "grid") -> Iterator[tuple[Example, dict]]:
    """Like `demo_examples`, with each example's generator metadata (see `demo_item`)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"demo data: n must be an int >= 0, got {n!r}")
    for index in range(n):
        yield demo_item(split, index, seed, image_size=image_size, mixture=mixture, scene=scene)


def demo_item(split: str, index: int, seed: int, *, image_size: int = 56,
              mixture: Mapping[str, int] | None = None, scene: str = "grid") -> tuple[Example, dict]:
    """Example `index` of (split, seed) and its metadata, by random access; `scene` is one of
    `SCENES` (caption / vqa images; OCR and text are the same in both).

    The metadata says what was generated, for tests and per-task evaluation:
    {"task": "caption" | "ocr" | one of VQA_TASKS | one of TEXT_TASKS,
     "size": (width, height) of the image, None for text,
     "background": rgb (images only),
     "objects": [{"shape", "colour", "box": (x0, y0, x1, y1) inclusive}, ...],  # caption / vqa
     "query": {...} (vqa: the shape / colour asked about; text: the operands),
     "text": {"string", "xy", "font_size", "fill"} (ocr)}.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"demo data: split must be a non-empty str, got {split!r}")
    if not isinstance(seed, int) or not isinstance(index, int) or index < 0:
        raise ValueError(f"demo data: seed must be an int and index an int >= 0, "
                         f"got seed={seed!r}, index={index!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"demo data: image_size must be an int >= {MIN_IMAGE_SIZE}, "
                         f"got {image_size!r}")
    if scene not in SCENES:
        raise ValueError(f"demo data: scene must be one of {SCENES}, got {scene!r}")
    source = _source_of(split, seed, index, _cycle(_check_mixture(mixture)))
    rng = random.Random(f"genieblue-demo|{split}|{seed}|{index}")
    if source == "text":
        question, answer, meta = _text_task(rng)
        images = []
    else:
        meta = _canvas(rng, image_size, square=scene == "single" and source != "ocr")
        if source == "ocr":
            image = _draw_text(rng, meta, image_size)
            question, answer = PROMPTS["ocr"], meta["text"]["string"]
        else:
            image = _draw_scene(rng, meta, cell=image_size // 2 if scene == "grid" else image_size)
            if source == "caption":
                meta["task"] = "caption"
                question, answer = PROMPTS["caption"], caption(meta["objects"])
            else:
                question, answer = _vqa(rng, meta, SCENE_TASKS[scene])
        question = f"{IMAGE_TAG}\n{question}"
        images = [_png(image)]
    example = Example(id=f"demo-{split}-{seed}-{index:07d}", source=source,
                      turns=[{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}],
                      images=images)
    return example, meta


def answer_of(example: Example) -> str:
    """The content of the last assistant turn (the reference answer for evaluation)."""
    for turn in reversed(example.turns):
        if turn["role"] == "assistant":
            return turn["content"]
    raise ValueError(f"example {example.id!r} has no assistant turn")


def caption(objects: list[dict]) -> str:
    """Canonical caption: (colour, shape) groups counted, in SHAPES then COLOURS order.

    >>> caption([{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"},
    ...          {"shape": "circle", "colour": "red"}])
    'two red circles and one blue square'
    >>> caption([{"shape": s, "colour": "green"} for s in SHAPES])
    'one green circle, one green square and one green triangle'
    """
    colours = list(COLOURS)
    counts: dict[tuple[str, str], int] = {}
    for ob in objects:
        counts[ob["shape"], ob["colour"]] = counts.get((ob["shape"], ob["colour"]), 0) + 1
    parts = [f"{NUMBER_WORDS[c]} {colour} {shape}{'s' if c > 1 else ''}"
             for (shape, colour), c in sorted(
                 counts.items(), key=lambda kv: (SHAPES.index(kv[0][0]), colours.index(kv[0][1])))]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


# ---- mixture ---------------------------------------------------------------------------

def _check_mixture(mixture: Mapping[str, int] | None) -> dict[str, int]:
    mixture = dict(MIXTURE if mixture is None else mixture)
    for name, weight in mixture.items():
        if name not in SOURCES:
            raise ValueError(f"demo data: unknown source {name!r} in mixture; known: {SOURCES}")
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(f"demo data: mixture weight of {name!r} must be an int >= 0, "
                             f"got {weight!r}")
    if not sum(mixture.values()):
        raise ValueError(f"demo data: mixture {mixture} has no positive weight")
    return mixture


def _cycle(mixture: dict[str, int]) -> tuple[str, ...]:
    return tuple(name for name in SOURCES for _ in range(mixture.get(name, 0)))


@functools.lru_cache(maxsize=64)
def _block_order(split: str, seed: int, block: int, cycle: tuple[str, ...]) -> tuple[str, ...]:
    order = list(cycle)
    random.Random(f"genieblue-demo-mixture|{split}|{seed}|{block}").shuffle(order)
    return tuple(order)


def _source_of(split: str, seed: int, index: int, cycle: tuple[str, ...]) -> str:
    return _block_order(split, seed, index // len(cycle), cycle)[index % len(cycle)]


# ---- images ----------------------------------------------------------------------------

def _canvas(rng: random.Random, image_size: int, square: bool = False) -> dict:
    layout = rng.choices(("square", "wide", "tall"), weights=(3, 1, 1))[0]
    layout = "square" if square else layout
    size = {"square": (image_size, image_size), "wide": (2 * image_size, image_size),
            "tall": (image_size, 2 * image_size)}[layout]
    return {"size": size, "background": rng.choice(BACKGROUNDS)}


def _draw_scene(rng: random.Random, meta: dict, cell: int) -> Image.Image:
    """1-3 objects of 1-k (shape, colour) kinds, one per cell of a `cell`-px grid (at most
    one per cell: a canvas of one cell holds one object), each 55-80% of the cell's side."""
    width, height = meta["size"]
    cells = [(cx, cy) for cy in range(height // cell) for cx in range(width // cell)]
    count = rng.randint(1, min(MAX_OBJECTS, len(cells)))
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    kinds = rng.sample(pairs, rng.randint(1, count))
    chosen = kinds + [rng.choice(kinds) for _ in range(count - len(kinds))]
    image = Image.new("RGB", (width, height), meta["background"])
    draw = ImageDraw.Draw(image)
    objects = []
    for (shape, colour), (cx, cy) in zip(chosen, rng.sample(cells, count)):
        side = rng.randint(cell * 55 // 100, cell * 80 // 100)
        x0 = cx * cell + rng.randint(1, cell - side - 1)     # >= 1 px inside its cell
        y0 = cy * cell + rng.randint(1, cell - side - 1)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)         # inclusive pixel box
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + (side - 1) / 2, y0), (box[2], box[3]), (x0, box[3])], fill=fill)
        objects.append({"shape": shape, "colour": colour, "box": box})
    meta["objects"] = objects
    return image


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_text(rng: random.Random, meta: dict, image_size: int) -> Image.Image:
    """3-4 capital letters, as large as fits (at most image_size / 4 px), fully inside."""
    width, height = meta["size"]
    string = "".join(rng.choice(_UPPER) for _ in range(rng.randint(3, 4)))
    size = image_size // 4
    while True:
        left, top, right, bottom = _font(size).getbbox(string)
        if right - left <= width - 2 * _MARGIN and bottom - top <= height - 2 * _MARGIN:
            break
        if size <= 6:  # unreachable for image_size >= MIN_IMAGE_SIZE
            raise ValueError(f"demo data: cannot fit {string!r} in a {width}x{height} image")
        size -= 1
    x = rng.randint(_MARGIN - left, width - _MARGIN - right)
    y = rng.randint(_MARGIN - top, height - _MARGIN - bottom)
    fill = rng.choice(TEXT_COLOURS)
    image = Image.new("RGB", (width, height), meta["background"])
    ImageDraw.Draw(image).text((x, y), string, fill=fill, font=_font(size))
    meta.update(task="ocr", text={"string": string, "xy": (x, y), "font_size": size, "fill": fill})
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- questions -------------------------------------------------------------------------

def _vqa(rng: random.Random, meta: dict, tasks: tuple[str, ...] = VQA_TASKS) -> tuple[str, str]:
    objects = meta["objects"]
    shapes = [ob["shape"] for ob in objects]
    colours = [ob["colour"] for ob in objects]
    eligible = ["count_colour", "count_total", "exists_colour"]
    if any(shapes.count(s) == 1 for s in SHAPES):
        eligible.append("colour_of")
    if any(colours.count(c) == 1 for c in COLOURS):
        eligible.append("shape_of")
    task = rng.choice([t for t in eligible if t in tasks])
    if task == "count_colour":
        # Mostly a colour that is there; sometimes any (then the answer may be "zero").
        colour = rng.choice(colours if rng.random() < 0.75 else list(COLOURS))
        query = {"colour": colour}
        question = f"How many {colour} objects are there?"
        answer = NUMBER_WORDS[colours.count(colour)]
    elif task == "count_total":
        query = {}
        question, answer = "How many objects are there?", NUMBER_WORDS[len(objects)]
    elif task == "colour_of":
        shape = rng.choice([s for s in SHAPES if shapes.count(s) == 1])
        query = {"shape": shape}
        question, answer = f"What colour is the {shape}?", colours[shapes.index(shape)]
    elif task == "shape_of":
        colour = rng.choice([c for c in COLOURS if colours.count(c) == 1])
        query = {"colour": colour}
        question, answer = f"What shape is the {colour} object?", shapes[colours.index(colour)]
    else:
        if rng.random() < 0.5:                    # "yes" and "no" equally often
            colour = rng.choice(sorted(set(colours)))
        else:
            colour = rng.choice([c for c in COLOURS if c not in colours])
        query = {"colour": colour}
        question = f"Is there a {colour} object?"
        answer = "yes" if colour in colours else "no"
    meta.update(task=task, query=query)
    return question, answer


def _text_task(rng: random.Random) -> tuple[str, str, dict]:
    task = rng.choice(TEXT_TASKS)
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question, answer, query = f"What is {a} + {b}?", str(a + b), {"a": a, "b": b}
    elif task == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        question, answer, query = f"What is {a} - {b}?", str(a - b), {"a": a, "b": b}
    elif task == "next_letter":
        i = rng.randrange(len(_LOWER) - 1)
        question, answer = f"What letter comes after {_LOWER[i]}?", _LOWER[i + 1]
        query = {"letter": _LOWER[i]}
    else:
        i = rng.randrange(1, len(_LOWER))
        question, answer = f"What letter comes before {_LOWER[i]}?", _LOWER[i - 1]
        query = {"letter": _LOWER[i]}
    return question, answer, {"task": task, "size": None, "query": query}


def without_images(ex: Example) -> Example:
    """The conversation of `ex` with its images and `<image>` tags removed.

    >>> ex = Example("a", "vqa", [{"role": "user", "content": "<image>\\nIs there a red object?"},
    ...                            {"role": "assistant", "content": "yes"}], [b"png"])
    >>> without_images(ex).turns[0], without_images(ex).images
    ({'role': 'user', 'content': 'Is there a red object?'}, [])
    """
    turns = [{**t, "content": t["content"].replace(IMAGE_TAG + "\n", "").replace(IMAGE_TAG, "")} for t in ex.turns]
    return Example(ex.id, ex.source, turns, [])


def chance_accuracy(question: str) -> float | None:
    """Expected accuracy of a uniform guess among the answers a demo VQA question allows
    (None for other questions): objects in total 1/3 (one-three), of a colour 1/4
    (zero-three), colours 1/5, shapes 1/3, yes / no 1/2.

    >>> chance_accuracy("<image>\\nHow many red objects are there?"), chance_accuracy("Is there a red object?")
    (0.25, 0.5)
    """
    q = question.replace(IMAGE_TAG, "").strip()
    if q == "How many objects are there?":
        return 1 / MAX_OBJECTS
    if q.startswith("How many "):
        return 1 / (MAX_OBJECTS + 1)
    if q.startswith("What colour is the "):
        return 1 / len(COLOURS)
    if q.startswith("What shape is the "):
        return 1 / len(SHAPES)
    if q.startswith("Is there a "):
        return 0.5
    return None


KINDS = tuple((shape, colour) for shape in SHAPES for colour in COLOURS)  # patch labels 1..15


def patch_kinds(pixels, meta: dict, patch: int, min_pixels: int | None = None):
    """Which object kind each `patch` x `patch` cell of a scene shows: int32 (H/patch, W/patch),
    0 = background, k = 1 + index of (shape, colour) in `KINDS`. A cell takes the kind with
    the most pixels in it if that is at least `min_pixels` (default patch^2 / 5); pixels
    count when they lie in an object's box and have its exact colour (shapes are drawn
    without anti-aliasing). Dense labels for pretraining the demo's vision tower.

    >>> img = np.full((4, 4, 3), 255, np.uint8); img[0:2, 2:4] = COLOURS["red"]
    >>> meta = {"objects": [{"shape": "square", "colour": "red", "box": (2, 0, 3, 1)}]}
    >>> patch_kinds(img, meta, patch=2).tolist(), KINDS[6 - 1]
    ([[0, 6], [0, 0]], ('square', 'red'))
    """
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    if height % patch or width % patch:
        raise ValueError(f"patch_kinds: a {width}x{height} image is not a whole number of {patch}-px cells")
    labels = np.zeros((height, width), np.int32)
    for ob in meta["objects"]:
        x0, y0, x1, y1 = ob["box"]
        inside = (pixels[y0:y1 + 1, x0:x1 + 1] == np.array(COLOURS[ob["colour"]], np.uint8)).all(-1)
        labels[y0:y1 + 1, x0:x1 + 1][inside] = 1 + KINDS.index((ob["shape"], ob["colour"]))
    cells = labels.reshape(height // patch, patch, width // patch, patch).transpose(0, 2, 1, 3)
    cells = cells.reshape(height // patch, width // patch, patch * patch)
    counts = (cells[..., None] == np.arange(1, len(KINDS) + 1)).sum(2)          # (gh, gw, 15)
    threshold = patch * patch // 5 if min_pixels is None else min_pixels
    return np.where(counts.max(-1) >= max(threshold, 1), counts.argmax(-1) + 1, 0).astype(np.int32)


def write_demo_datasets(out_dir: str, *, splits: Mapping[str, int] = None, seed: int = 0,
                        image_size: int = 56, vocab_size: int = 512, num_shards: int = 2,
                        mixtures: Mapping[str, Mapping[str, int]] | None = None,
                        text_only_splits: tuple[str, ...] = (), scene: str = "grid") -> dict:
    """Writes the demo as ArrayRecord, one dataset per (split, source), plus a tokenizer.

        out_dir/{split}/{source}/manifest.json + shards     (e.g. train/caption, eval/text)
        out_dir/tokenizer.model                             SentencePiece trained on train text

    `mixtures[split]` replaces `MIXTURE` for that split (e.g. {"text": 1} for a text-only
    pretraining split); only the sources a split's mixture names get a dataset. A split in
    `text_only_splits` keeps every conversation but drops its images and `<image>` tags
    (`without_images`): language to pretrain a base LLM on, image questions answered blind
    (the answer vocabulary and the questions' formats, not their grounding). Returns
    {"datasets": {split: {source: dir}}, "tokenizer": path}. Deterministic from the seed; a
    pipeline mixes the train sources with `data_pipelines.pipeline.mixture`.
    """
    import os

    from data_pipelines.records import ShardedWriter
    from data_pipelines.tokenizer import train_sentencepiece

    splits = dict(splits or {"train": 2000, "eval": 200})
    datasets: dict[str, dict[str, str]] = {}
    texts: list[str] = []
    mixtures = dict(mixtures or {})
    for split, n in splits.items():
        mixture = _check_mixture(mixtures.get(split))
        names = [s for s in SOURCES if mixture.get(s)]
        writers = {s: ShardedWriter(os.path.join(out_dir, split, s), num_shards=num_shards) for s in names}
        for ex in demo_examples(split, n, seed, image_size=image_size, mixture=mixture, scene=scene):
            writers[ex.source].write(without_images(ex) if split in text_only_splits else ex)
            if split == "train":
                texts.extend(t["content"].replace(IMAGE_TAG, "") for t in ex.turns)
        for w in writers.values():
            w.close()
        datasets[split] = {s: os.path.join(out_dir, split, s) for s in names}
    texts += ["system\n", "user\n", "assistant\n"]
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    train_sentencepiece(texts, tokenizer, vocab_size=vocab_size)
    return {"datasets": datasets, "tokenizer": tokenizer}



def with_demo_sources(config, workdir: str):
    """`config` (a `RunConfig`, changed in place and returned) reading the demo
    datasets, written once into WORKDIR/demo_data (by process 0; the others wait for it), when
    it is a demo-scale config that names no `data.sources`: what `python -m experiments.run`
    trains on without data. `config.data.demo_examples` train examples (and a tenth, at least 20, held out).
    A config that names its sources is returned unchanged.

    Raises ValueError for a remote (gs://) workdir: the demo data is written to local disk.
    """
    import os

    if config.data.sources or config.scale != "demo":
        return config
    from genieblue_jax import paths
    if paths.is_remote(workdir):
        raise ValueError(f"data.sources is empty, so the demo data would be written into the workdir, but "
                         f"{workdir} is not on local disk: give data.sources (and data.tokenizer)")
    import jax
    out = os.path.join(os.path.abspath(workdir), "demo_data")
    if jax.process_index() == 0 and not os.path.isdir(out):
        print(f"no data.sources given: writing the demo dataset to {out}", flush=True)
        n = config.data.demo_examples
        # Written beside, then renamed into place: runs started together on one workdir (one of
        # them is then refused by the workdir lock) never write into each other's files.
        staging = f"{out}.tmp-{os.getpid()}"
        write_demo_datasets(staging, splits={"train": n, "eval": max(n // 10, 20)}, seed=0)
        try:
            os.rename(staging, out)
        except OSError:  # another run renamed its (identical) copy first
            import shutil
            shutil.rmtree(staging)
    if jax.process_count() > 1:  # the other hosts read what process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("demo data written")
    config.data.sources = ",".join(f"{s}={os.path.join(out, 'train', s)}:{w}" for s, w in MIXTURE.items())
    config.data.tokenizer = os.path.join(out, "tokenizer.model")
    return config

if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write the demo datasets and tokenizer.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_demo_datasets(args.out, splits={"train": args.train, "eval": args.eval},
                                         seed=args.seed), indent=2))
