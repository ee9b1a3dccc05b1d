"""A compositional image-caption set, deterministic from the seed.

Every image holds 1..``max_objects`` objects; each object has a shape (6), a colour
(8), a size (2) and a position. Captions come from templates with synonyms at
several levels of detail, some with spatial relations ("a small red circle left of
a blue square"). Retrieval on the test split needs attribute *binding*: a fraction
``binding_fraction`` of the test images come in groups whose members share the
same shapes and colours but bind them differently (colours permuted over the
shapes) or relate them differently (two objects swap places). Captions of grouped
images always name every object with its colour, and the two swapped objects'
relation, so each caption is true of exactly one group member.

The set is written in the Karpathy layout used for the real datasets
(``dataset_synthetic.json`` + ``images/*.png``), with two extra fields per image:
``objects`` (list of {shape, colour, size, x, y}) and ``group`` (id or null).
The train split holds every (shape, colour) combination when ``n_train`` >= 48.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from dmp_core.io import write_json

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 45),
    "green": (45, 175, 60),
    "cyan": (40, 210, 215),
    "blue": (40, 75, 225),
    "purple": (140, 55, 195),
    "pink": (245, 130, 195),
}
SIZES = ("small", "large")
SPLITS = ("train", "val", "test")

SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"cyan": ("cyan", "turquoise"), "purple": ("purple", "violet")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# radius as a fraction of the image side: (mean, jitter)
_RADIUS = {"small": (0.095, 0.01), "large": (0.165, 0.012)}
_MIN_GAP = 0.03  # free space between objects, fraction of the side
_AXIS_RATIO = 1.5  # a pair's dominant axis is at least this much longer: relations are clear
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges


@dataclass(frozen=True)
class Obj:
    """One object of a scene; x, y are the centre in [0, 1] (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float  # radius, fraction of the side
    angle: float  # rotation in degrees (polygons only)

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "x": round(self.x, 4), "y": round(self.y, 4)}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    group: Optional[int] = None
    variant: str = "plain"  # plain | base | colour_swap | relation_swap


# ----------------------------------------------------------------------- geometry
def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b`` along the dominant axis: left/right/above/below."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def region(o: Obj) -> str:
    """Where the object lies in a 3x3 grid: 'in the top left', 'at the top', 'in the centre'."""
    col = "left" if o.x < 1 / 3 else "right" if o.x > 2 / 3 else "centre"
    row = "top" if o.y < 1 / 3 else "bottom" if o.y > 2 / 3 else "middle"
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def _valid(objs: tuple[Obj, ...]) -> bool:
    for a, b in itertools.combinations(objs, 2):
        dx, dy = abs(a.x - b.x), abs(a.y - b.y)
        if math.hypot(dx, dy) < a.r + b.r + _MIN_GAP:
            return False
        if max(dx, dy) < _AXIS_RATIO * min(dx, dy):
            return False
    return all(o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r for o in objs)


def _place(rng: np.random.Generator, attrs: list[tuple[str, str, str]]) -> Optional[tuple[Obj, ...]]:
    """Random non-overlapping positions for (shape, colour, size) triples, or None."""
    radii = [float(_RADIUS[s][0] + rng.uniform(-1, 1) * _RADIUS[s][1]) for _, _, s in attrs]
    angles = [float(rng.uniform(-12, 12)) for _ in attrs]
    for _ in range(200):
        objs = tuple(
            Obj(shape, colour, size, float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r)), r, a)
            for (shape, colour, size), r, a in zip(attrs, radii, angles)
        )
        if _valid(objs):
            return objs
    return None


def _random_attrs(rng: np.random.Generator, n: int, first: Optional[tuple[str, str]] = None,
                  distinct: bool = False) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) with distinct (shape, colour) pairs; ``distinct``: all shapes
    and all colours differ (needed for binding groups)."""
    while True:
        shapes = list(rng.choice(len(SHAPES), size=n, replace=not distinct))
        colours = list(rng.choice(len(COLOURS), size=n, replace=not distinct))
        pairs = [(SHAPES[s], list(COLOURS)[c]) for s, c in zip(shapes, colours)]
        if first is not None:
            if first in pairs[1:]:
                continue
            pairs[0] = first
        if len(set(pairs)) == n:
            return [(s, c, SIZES[int(rng.integers(2))]) for s, c in pairs]


def _random_scene(rng: np.random.Generator, max_objects: int, first: Optional[tuple[str, str]] = None,
                  min_objects: int = 1, distinct: bool = False) -> tuple[Obj, ...]:
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        objs = _place(rng, _random_attrs(rng, n, first=first, distinct=distinct))
        if objs is not None:
            return objs


def _binding_group(rng: np.random.Generator, max_objects: int, size: int, group: int) -> list[Scene]:
    """A base scene plus variants: colours rotated over the objects (same geometry), and
    objects 0 and 1 swapping places (same attributes)."""
    while True:
        base = _random_scene(rng, max_objects, min_objects=2, distinct=True)
        colours = [o.colour for o in base]
        rotated = colours[1:] + colours[:1]
        colour_swap = tuple(replace(o, colour=c) for o, c in zip(base, rotated))
        a, b = base[0], base[1]
        moved = (replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)) + base[2:]
        if not _valid(moved):
            continue
        variants = [Scene(colour_swap, group, "colour_swap"), Scene(moved, group, "relation_swap")]
        if size == 2:
            variants = [variants[int(rng.integers(2))]]
        return [Scene(base, group, "base")] + variants


def _group_sizes(n_grouped: int) -> list[int]:
    sizes: list[int] = []
    left = n_grouped
    while left >= 5 or left == 3:
        sizes.append(3)
        left -= 3
    while left >= 2:
        sizes.append(2)
        left -= 2
    return sizes


def plan_scenes(seed: int, n_train: int, n_val: int, n_test: int, max_objects: int = 3,
                binding_fraction: float = 0.5) -> dict[str, list[Scene]]:
    """The scenes of every split (no pixels yet), deterministic from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C3E]))
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    order = rng.permutation(len(combos))
    train = [Scene(_random_scene(rng, max_objects, first=combos[order[i]] if i < len(combos) else None))
             for i in range(n_train)]
    val = [Scene(_random_scene(rng, max_objects)) for _ in range(n_val)]

    n_grouped = int(round(binding_fraction * n_test)) if max_objects >= 2 else 0
    grouped: list[Scene] = []
    for g, size in enumerate(_group_sizes(min(n_grouped, n_test))):
        grouped += _binding_group(rng, max_objects, size, group=g)
    plain = [Scene(_random_scene(rng, max_objects)) for _ in range(n_test - len(grouped))]
    test = grouped + plain
    test = [test[i] for i in rng.permutation(len(test))]
    return {"train": train, "val": val, "test": test}


# ----------------------------------------------------------------------- captions
def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng: np.random.Generator, o: Obj, detail: int) -> str:
    """detail 0: 'red circle'; 1: 'small red circle'; 2: '... in the top left'."""
    words = [_pick(rng, COLOUR_WORDS[o.colour]), _pick(rng, SHAPE_WORDS[o.shape])]
    if detail >= 1:
        words.insert(0, _pick(rng, SIZE_WORDS[o.size]))
    phrase = " ".join(words)
    if detail >= 2:
        phrase += f" {region(o)}"
    return phrase


def _rel(rng: np.random.Generator, a: Obj, b: Obj) -> str:
    return _pick(rng, RELATION_WORDS[relation(a, b)])


def _the(rng: np.random.Generator, o: Obj) -> str:
    return f"the {_pick(rng, COLOUR_WORDS[o.colour])} {_pick(rng, SHAPE_WORDS[o.shape])}"


def _relational_caption(rng: np.random.Generator, objs: tuple[Obj, ...], pair: tuple[int, int]) -> str:
    """Names every object with its colour and states the relation of ``pair``."""
    d = int(rng.integers(0, 2))
    i, j = pair if rng.integers(2) else pair[::-1]
    a, b = objs[i], objs[j]
    np_a, np_b = _noun_phrase(rng, a, d), _noun_phrase(rng, b, d)
    rest = [objs[k] for k in range(len(objs)) if k not in pair]
    if not rest:
        t = int(rng.integers(4))
        if t == 0:
            return f"{_article(np_a)} {_rel(rng, a, b)} {_article(np_b)}"
        if t == 1:
            return f"two shapes: {_article(np_a)} {_rel(rng, a, b)} {_article(np_b)}"
        if t == 2:
            return f"{_article(np_b)} with {_article(np_a)} {_rel(rng, a, b)} it"
        return f"there is {_article(np_a)} {_rel(rng, a, b)} {_article(np_b)}"
    c = rest[0]
    np_c = _noun_phrase(rng, c, d)
    t = int(rng.integers(3))
    if t == 0:
        return f"{_article(np_a)} {_rel(rng, a, b)} {_article(np_b)}, and {_the(rng, b)} is {_rel(rng, b, c)} {_article(np_c)}"
    if t == 1:
        return f"{_article(np_a)} {_rel(rng, a, b)} {_article(np_b)}, plus {_article(np_c)}"
    return f"{COUNT_WORDS[len(objs)]} shapes: {_article(np_a)} {_rel(rng, a, b)} {_article(np_b)} and {_article(np_c)}"


def _free_caption(rng: np.random.Generator, objs: tuple[Obj, ...]) -> str:
    """Any template, any level of detail (used for images outside binding groups)."""
    d = int(rng.integers(0, 3))
    if len(objs) == 1:
        o = objs[0]
        t = int(rng.integers(7))
        np_o = _noun_phrase(rng, o, d)
        if t == 0:
            return _article(np_o)
        if t == 1:
            return f"there is {_article(np_o)}"
        if t == 2:
            return f"{_article(np_o)} on a plain background"
        if t == 3:
            return f"a {_pick(rng, SHAPE_WORDS[o.shape])} that is {_pick(rng, COLOUR_WORDS[o.colour])}"
        if t == 4:
            return f"a single {_noun_phrase(rng, o, 0)} {region(o)}"
        if t == 5:
            return f"one {_noun_phrase(rng, o, 1)}"
        return f"an image of {_article(np_o)}"
    t = int(rng.integers(5))
    if t <= 1:  # relational
        i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
        return _relational_caption(rng, objs, (min(i, j), max(i, j)))
    order = [objs[k] for k in rng.permutation(len(objs))]
    phrases = [_article(_noun_phrase(rng, o, d)) for o in order]
    listing = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if t == 2:
        return listing
    if t == 3:
        return f"{COUNT_WORDS[len(objs)]} shapes: {listing}"
    return f"some shapes including {phrases[0]}"


def captions_for(scene: Scene, rng: np.random.Generator, k: int) -> list[str]:
    """k captions, distinct where the templates allow it."""
    out: list[str] = []
    for _ in range(50 * k):
        if scene.group is None:
            cap = _free_caption(rng, scene.objects)
        else:
            cap = _relational_caption(rng, scene.objects, (0, 1))
        if cap not in out:
            out.append(cap)
        if len(out) == k:
            break
    while len(out) < k:  # a scene with very few possible captions
        out.append(out[len(out) % max(1, len(out))])
    return out


# -------------------------------------------------------------------------- render
def _polygon(o: Obj, side: float) -> list[tuple[float, float]]:
    cx, cy, r = o.x * side, o.y * side, o.r * side
    if o.shape == "square":
        pts = [(r * 1.05, a) for a in (45, 135, 225, 315)]
    elif o.shape == "triangle":
        pts = [(r * 1.15, a) for a in (-90, 30, 150)]
    elif o.shape == "hexagon":
        pts = [(r, a) for a in range(0, 360, 60)]
    elif o.shape == "star":
        pts = [(r * (1.15 if k % 2 == 0 else 0.5), -90 + 36 * k) for k in range(10)]
    elif o.shape == "diamond":  # a rhombus: narrower than tall, so not a rotated square
        pts = [(r * 0.72, 0), (r * 1.15, 90), (r * 0.72, 180), (r * 1.15, 270)]
        return [(cx + rad * math.cos(math.radians(a + o.angle / 3)),
                 cy + rad * math.sin(math.radians(a + o.angle / 3))) for rad, a in pts]
    else:
        raise ValueError(o.shape)
    return [(cx + rad * math.cos(math.radians(a + o.angle)), cy + rad * math.sin(math.radians(a + o.angle)))
            for rad, a in pts]


def render(scene: Scene, size: int, seed_seq: np.random.SeedSequence) -> np.ndarray:
    """uint8 [size, size, 3]: tinted background with a soft gradient, jittered colours, noise."""
    rng = np.random.default_rng(seed_seq)
    side = size * _SUPERSAMPLE
    base = rng.uniform(55, 115)
    bg = np.clip(base + rng.uniform(-14, 14, size=3), 0, 255)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + rng.uniform(-18, 18, size=3), 0, 255))
        if o.shape == "circle":
            cx, cy, r = o.x * side, o.y * side, o.r * side
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o, side), fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(-10, 10)
    arr = arr + (ramp[:, None, None] if rng.integers(2) else ramp[None, :, None])
    arr = arr + rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# -------------------------------------------------------------------------- write
def generator_record(seed: int, image_size: int, synthetic_params: Any) -> dict[str, Any]:
    """What determines the set's content; a mismatch with the files on disk means regenerate."""
    params = synthetic_params.model_dump() if hasattr(synthetic_params, "model_dump") else dict(synthetic_params)
    return {"version": 1, "seed": int(seed), "image_size": int(image_size), "params": params}


def generate_synthetic(out_dir: str | Path, *, seed: int, image_size: int, synthetic_params: Any) -> Path:
    """Write ``dataset_synthetic.json`` + ``images/`` under ``out_dir``; returns ``out_dir``.

    Images are first written into a temporary folder that is renamed onto ``images/``;
    the JSON is written last (atomically), so its presence means the set is complete."""
    p = synthetic_params
    record = generator_record(seed, image_size, p)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "dataset_synthetic.json"
    json_path.unlink(missing_ok=True)  # from here on the old set (if any) is incomplete

    scenes = plan_scenes(seed, p.n_train, p.n_val, p.n_test, p.max_objects, p.binding_fraction)
    tmp_images = Path(tempfile.mkdtemp(prefix=".images.", dir=out_dir))
    entries: list[dict[str, Any]] = []
    sentid = 0
    try:
        for split_idx, split in enumerate(SPLITS):
            for i, scene in enumerate(scenes[split]):
                filename = f"{split}_{i:05d}.png"
                pixels = render(scene, image_size, np.random.SeedSequence([seed, 0x1A6E, split_idx, i]))
                (tmp_images / filename).write_bytes(_png_bytes(pixels))
                cap_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA9, split_idx, i]))
                caps = captions_for(scene, cap_rng, p.captions_per_image)
                entries.append({
                    "filename": filename,
                    "imgid": len(entries),
                    "split": split,
                    "sentences": [{"raw": c, "sentid": sentid + k} for k, c in enumerate(caps)],
                    "objects": [o.to_json() for o in scene.objects],
                    "group": scene.group,
                    "variant": scene.variant,
                })
                sentid += len(caps)
        images_dir = out_dir / "images"
        if images_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=".old-images.", dir=out_dir))
            os.replace(images_dir, trash / "images")
            shutil.rmtree(trash)
        os.replace(tmp_images, images_dir)
    except BaseException:
        shutil.rmtree(tmp_images, ignore_errors=True)
        raise
    write_json(json_path, {"dataset": "synthetic", "generator": record, "images": entries}, indent=1)
    return out_dir


def is_current(out_dir: str | Path, *, seed: int, image_size: int, synthetic_params: Any) -> bool:
    """True when ``out_dir`` holds a complete set made with these parameters."""
    json_path = Path(out_dir) / "dataset_synthetic.json"
    if not json_path.is_file() or not (Path(out_dir) / "images").is_dir():
        return False
    try:
        with open(json_path) as fh:
            found = json.load(fh).get("generator")
    except (OSError, ValueError, AttributeError):
        return False
    return found == generator_record(seed, image_size, synthetic_params)
