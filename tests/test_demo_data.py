"""The synthetic demo dataset (experiments/demo_data.py): determinism, mixture, and
answers that are right for the pixels actually rendered."""
import collections
import doctest
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.images import decode_image
from data_pipelines.records import IMAGE_TAG, Example, check_example
from experiments import demo_data
from experiments.demo_data import (
    COLOURS,
    MIXTURE,
    NUMBER_WORDS,
    SHAPES,
    SOURCES,
    answer_of,
    demo_examples,
    demo_item,
    demo_items,
)

N = 400                     # examples per split in most tests: 40 mixture blocks


@pytest.fixture(scope="module")
def train():
    return list(demo_items("train", N, seed=0))


def _content(ex):
    return ex.source, ex.turns, ex.images


def test_docstring_examples():
    result = doctest.testmod(demo_data, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_deterministic_prefix_stable_and_seed_dependent(train):
    examples = [ex for ex, _ in train]
    again = list(demo_examples("train", N, seed=0))
    assert again == examples                                  # bytes included
    assert list(demo_examples("train", 37, seed=0)) == examples[:37]
    assert [demo_item("train", i, 0)[0] for i in (0, 5, 399)] == [examples[i] for i in (0, 5, 399)]
    for other in (list(demo_examples("train", N, seed=1)), list(demo_examples("eval", N, seed=0))):
        same = sum(_content(a) == _content(b) for a, b in zip(examples, other))
        assert same <= N // 20, same                          # only chance text collisions
        assert not {im for ex in examples for im in ex.images} & {im for ex in other for im in ex.images}
    assert len({ex.id for ex in examples}) == N
    assert examples[7].id == "demo-train-0-0000007"


def test_mixture_counts_are_exact_per_block(train):
    sources = [ex.source for ex, _ in train]
    cycle = sum(MIXTURE.values())
    assert cycle == 10 and set(MIXTURE) == set(SOURCES)
    assert collections.Counter(sources) == {s: w * N // cycle for s, w in MIXTURE.items()}
    for start in range(0, N, cycle):
        assert collections.Counter(sources[start:start + cycle]) == MIXTURE
    assert sources[:cycle] != sources[cycle:2 * cycle]          # blocks are shuffled
    text_only = [ex.source for ex in demo_examples("train", 50, 0, mixture={"text": 1})]
    assert text_only == ["text"] * 50
    two = collections.Counter(ex.source for ex in demo_examples("t", 60, 3, mixture={"vqa": 1, "ocr": 2}))
    assert two == {"vqa": 20, "ocr": 40}


def test_every_example_is_valid_and_every_image_decodes(train):
    sizes = collections.Counter()
    for ex, meta in train:
        check_example(ex)                                     # roles, tags == images
        assert isinstance(ex, Example) and ex.source in SOURCES
        assert [t["role"] for t in ex.turns] == ["user", "assistant"]
        assert ex.turns[0]["content"].count(IMAGE_TAG) == len(ex.images)
        assert len(ex.images) == (0 if ex.source == "text" else 1)
        for data in ex.images:
            assert data.startswith(b"\x89PNG")
            pixels = decode_image(data)
            assert pixels.shape == (meta["size"][1], meta["size"][0], 3)
            sizes[meta["size"]] += 1
    assert set(sizes) == {(56, 56), (112, 56), (56, 112)}
    assert sizes[56, 56] > sizes[112, 56] and sizes[56, 56] > sizes[56, 112]
    small = [meta["size"] for _, meta in demo_items("s", 40, 0, image_size=32) if meta["size"]]
    assert set(small) == {(32, 32), (64, 32), (32, 64)}


def _grow(region, mask):
    """Flood-fill `region` within `mask` (8-connected) by repeated 3 x 3 dilation."""
    h, w = mask.shape
    while True:
        padded = np.pad(region, 1)
        grown = region.copy()
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy:dy + h, dx:dx + w]
        grown &= mask
        if (grown == region).all():
            return region
        region = grown


def _objects_in(pixels):
    """(shape, colour, inclusive box) of every 8-connected blob of an exact palette colour;
    the shape from how much of its box the blob fills (square 1, circle ~0.8, triangle ~0.55)."""
    found = []
    for colour, rgb in COLOURS.items():
        mask = (pixels == rgb).all(-1)
        while mask.any():
            seed = np.zeros_like(mask)
            seed[tuple(np.argwhere(mask)[0])] = True
            blob = _grow(seed, mask)
            mask &= ~blob
            ys, xs = np.nonzero(blob)
            box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            fill = blob.sum() / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
            shape = "square" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"
            found.append((shape, colour, box))
    return sorted(found)


_GROUP = rf"({'|'.join(NUMBER_WORDS[1:])}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?"


def _answer_from_pixels(question, objects):
    """Answer a caption / vqa prompt from the blobs found in the pixels (independent of the
    generator); the caption comes back as a Counter of (shape, colour)."""
    shapes = [s for s, _, _ in objects]
    colours = [c for _, c, _ in objects]
    if question == "Describe the image.":
        return collections.Counter((s, c) for s, c, _ in objects)
    if question == "How many objects are there?":
        return NUMBER_WORDS[len(objects)]
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return NUMBER_WORDS[colours.count(m[1])]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        assert shapes.count(m[1]) == 1
        return colours[shapes.index(m[1])]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        assert colours.count(m[1]) == 1
        return shapes[colours.index(m[1])]
    if m := re.fullmatch(r"Is there a (\w+) object\?", question):
        return "yes" if m[1] in colours else "no"
    raise AssertionError(f"unknown question {question!r}")


def _parse_caption(text):
    groups = [g for g in re.split(r", | and ", text)]
    counts = collections.Counter()
    for group in groups:
        m = re.fullmatch(_GROUP, group)
        assert m, (text, group)
        assert group.endswith("s") == (m[1] != "one"), group          # plural agrees
        counts[m[3], m[2]] += NUMBER_WORDS.index(m[1])
    return counts


def _assert_answer_from_pixels(ex, objects):
    question = ex.turns[0]["content"].removeprefix(f"{IMAGE_TAG}\n")
    expected = _answer_from_pixels(question, objects)
    if ex.source == "caption":
        assert _parse_caption(answer_of(ex)) == expected, (ex.id, answer_of(ex))
    else:
        assert answer_of(ex) == expected, (ex.id, question, answer_of(ex))


def test_caption_and_vqa_answers_match_the_rendered_pixels(train):
    tasks = collections.Counter()
    answers = collections.Counter()
    for ex, meta in train:
        if ex.source not in ("caption", "vqa"):
            continue
        objects = _objects_in(decode_image(ex.images[0]))
        assert objects == sorted((o["shape"], o["colour"], o["box"]) for o in meta["objects"])
        assert 1 <= len(objects) <= demo_data.MAX_OBJECTS == 3
        _assert_answer_from_pixels(ex, objects)
        if ex.source == "vqa":
            answers[answer_of(ex)] += 1
        tasks[meta["task"]] += 1
    assert tasks["caption"] == 120 and sum(tasks.values()) == 240
    assert set(tasks) == {"caption", *demo_data.VQA_TASKS}
    assert answers["zero"] and answers["no"] and answers["yes"] and answers["three"]


def test_ocr_answer_is_the_string_drawn(train):
    count = 0
    for ex, meta in train:
        if ex.source != "ocr":
            continue
        count += 1
        text = meta["text"]
        assert answer_of(ex) == text["string"] and re.fullmatch(r"[A-Z]{3,4}", text["string"])
        assert ex.turns[0]["content"] == f"{IMAGE_TAG}\nWhat is written in the image?"
        pixels = decode_image(ex.images[0])
        redrawn = Image.new("RGB", meta["size"], meta["background"])
        ImageDraw.Draw(redrawn).text(text["xy"], answer_of(ex), fill=text["fill"],
                                     font=ImageFont.load_default(size=text["font_size"]))
        np.testing.assert_array_equal(pixels, np.asarray(redrawn))
        ys, xs = np.nonzero((pixels != meta["background"]).any(-1))
        assert xs.min() >= 1 and ys.min() >= 1                   # never clipped
        assert xs.max() <= pixels.shape[1] - 2 and ys.max() <= pixels.shape[0] - 2
        assert text["font_size"] in (13, 14)                      # 56 // 4, shrunk to fit
        assert ys.max() - ys.min() + 1 >= 9                         # capitals 9+ px tall
    assert count == 80


def test_text_answers_are_correct(train):
    checks = {
        r"What is (\d+) \+ (\d+)\?": lambda a, b: str(int(a) + int(b)),
        r"What is (\d+) - (\d+)\?": lambda a, b: str(int(a) - int(b)),
        r"What letter comes after ([a-y])\?": lambda c: chr(ord(c) + 1),
        r"What letter comes before ([b-z])\?": lambda c: chr(ord(c) - 1),
    }
    seen = collections.Counter()
    for ex, meta in train:
        if ex.source != "text":
            continue
        assert ex.images == [] and IMAGE_TAG not in ex.turns[0]["content"]
        for pattern, solve in checks.items():
            if m := re.fullmatch(pattern, ex.turns[0]["content"]):
                assert answer_of(ex) == solve(*m.groups()), ex.turns
                seen[pattern] += 1
                break
        else:
            raise AssertionError(f"unknown text task {ex.turns[0]['content']!r}")
        if meta["task"] == "sub":
            assert int(answer_of(ex)) >= 0
    assert sum(seen.values()) == 80 and len(seen) == len(checks)


def test_answer_vocabularies_are_disjoint():
    multimodal, text = set(), set()
    for ex in demo_examples("vocab", 2000, seed=5):
        answer = answer_of(ex)
        if ex.source == "text":
            assert re.fullmatch(r"\d+|[a-z]", answer), answer
            text.add(answer)
        elif ex.source == "ocr":
            assert re.fullmatch(r"[A-Z]{3,4}", answer), answer
        else:
            assert not re.search(r"[\dA-Z]", answer), answer
            multimodal.update(re.split(r",? ", answer))
    assert multimodal <= demo_data.MULTIMODAL_WORDS
    assert not multimodal & text and len(text) == 19 + 26  # sums 0-18, every letter


def test_answer_of_and_bad_arguments():
    ex = Example("x1", "vqa", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}])
    assert answer_of(ex) == "b"
    with pytest.raises(ValueError, match="'x2' has no assistant turn"):
        answer_of(Example("x2", "text", [{"role": "user", "content": "q"}]))
    with pytest.raises(ValueError, match="unknown source 'audio'"):
        next(demo_examples("train", 1, 0, mixture={"audio": 1}))
    with pytest.raises(ValueError, match="no positive weight"):
        next(demo_examples("train", 1, 0, mixture={"text": 0}))
    with pytest.raises(ValueError, match="image_size"):
        next(demo_examples("train", 1, 0, image_size=16))
    with pytest.raises(ValueError, match="split"):
        next(demo_examples("", 1, 0))


def test_single_object_scenes_answer_from_pixels():
    items = list(demo_items("train", 200, seed=0, mixture={"caption": 1, "vqa": 3}, scene="single"))
    tasks = collections.Counter()
    for ex, meta in items:
        image = decode_image(ex.images[0])
        assert image.shape[:2] == (56, 56)                             # square canvas: one tile
        objects = _objects_in(image)
        assert len(objects) == 1 == len(meta["objects"])
        x0, y0, x1, y1 = objects[0][2]
        assert min(x1 - x0, y1 - y0) + 1 > 56 // 2                     # large: over half the side
        _assert_answer_from_pixels(ex, objects)
        tasks[meta["task"]] += 1
    assert tasks["caption"] == 50 and set(tasks) == {"caption", *demo_data.SCENE_TASKS["single"]}
    ocr = next(ex for ex, m in demo_items("train", 10, 0, mixture={"ocr": 1}, scene="single")
               if m["size"] != (56, 56))                               # OCR keeps its layouts
    assert ocr.source == "ocr"
    with pytest.raises(ValueError, match="scene must be one of"):
        next(demo_examples("train", 1, 0, scene="crowd"))
