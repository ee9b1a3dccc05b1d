"""The synthetic compositional set: determinism, splits, coverage and binding groups."""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter, defaultdict

import pytest

from conftest import tiny_config
from dmp_core.data import synthetic
from dmp_core.data.download import run_download
from dmp_core.data.synthetic import COLOURS, SHAPES, Obj, plan_scenes, relation


def _digest(root):
    """sha256 of the JSON and of every image file, by name."""
    out = {"json": hashlib.sha256((root / "dataset_synthetic.json").read_bytes()).hexdigest()}
    for p in sorted((root / "images").iterdir()):
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    made = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(seed=seed, data__root=str(base / name), data__synthetic__n_test=40)
        made[name] = run_download(cfg)
    return made


def test_same_seed_same_bytes_other_seed_differs(sets):
    a, b, c = (_digest(sets[k]) for k in "abc")
    assert a == b
    assert a["json"] != c["json"]
    assert sum(a[k] != c.get(k) for k in a if k != "json") >= len(a) - 2  # nearly all images differ


def test_layout_and_fields(sets):
    root = sets["a"]
    doc = json.loads((root / "dataset_synthetic.json").read_text())
    images = doc["images"]
    assert Counter(e["split"] for e in images) == {"train": 48, "val": 16, "test": 40}
    names = [e["filename"] for e in images]
    assert len(set(names)) == len(names)
    for e in images:
        assert (root / "images" / e["filename"]).is_file()
        assert len(e["sentences"]) == 2 and all(s["raw"] for s in e["sentences"])
        assert 1 <= len(e["objects"]) <= 3
        for o in e["objects"]:
            assert set(o) == {"shape", "colour", "size", "x", "y"}
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in ("small", "large")
        if e["split"] != "test":
            assert e["group"] is None


def test_splits_are_disjoint(sets):
    root = sets["a"]
    doc = json.loads((root / "dataset_synthetic.json").read_text())
    by_split = defaultdict(set)
    for e in doc["images"]:
        by_split[e["split"]].add(hashlib.sha256((root / "images" / e["filename"]).read_bytes()).hexdigest())
        by_split[e["split"] + "_scene"].add(json.dumps(e["objects"], sort_keys=True))
    for s1, s2 in itertools.combinations(("train", "val", "test"), 2):
        assert not by_split[s1] & by_split[s2]
        assert not by_split[s1 + "_scene"] & by_split[s2 + "_scene"]


def test_train_covers_every_shape_colour_pair():
    scenes = plan_scenes(3, n_train=60, n_val=4, n_test=8)
    seen = {(o.shape, o.colour) for s in scenes["train"] for o in s.objects}
    assert seen == {(s, c) for s in SHAPES for c in COLOURS}
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8


def _attrs(scene):
    return sorted(o.shape for o in scene.objects), sorted(o.colour for o in scene.objects)


def test_binding_groups():
    scenes = plan_scenes(5, n_train=10, n_val=4, n_test=100, binding_fraction=0.5)
    test = scenes["test"]
    groups = defaultdict(list)
    for s in test:
        if s.group is not None:
            groups[s.group].append(s)
    assert sum(len(g) for g in groups.values()) == 50
    assert all(len(g) in (2, 3) for g in groups.values())
    kinds = Counter()
    for members in groups.values():
        for m1, m2 in itertools.combinations(members, 2):
            # same shapes and colours overall ...
            assert _attrs(m1) == _attrs(m2)
            pairs1 = sorted((o.shape, o.colour) for o in m1.objects)
            pairs2 = sorted((o.shape, o.colour) for o in m2.objects)
            if pairs1 != pairs2:
                kinds["binding"] += 1
            else:  # ... same bindings: then a relation differs (objects at other places)
                rel1 = {(a.shape, b.shape): relation(a, b) for a, b in itertools.permutations(m1.objects, 2)}
                rel2 = {(a.shape, b.shape): relation(a, b) for a, b in itertools.permutations(m2.objects, 2)}
                assert rel1 != rel2
                kinds["relation"] += 1
    assert kinds["binding"] > 0 and kinds["relation"] > 0


def test_grouped_captions_tell_members_apart():
    scenes = plan_scenes(7, n_train=10, n_val=4, n_test=60, binding_fraction=1.0)
    import numpy as np

    groups = defaultdict(list)
    for i, s in enumerate(scenes["test"]):
        caps = synthetic.captions_for(s, np.random.default_rng(i), 5)
        groups[s.group].append((s, caps))
    colour_words = {w: c for c, ws in synthetic.COLOUR_WORDS.items() for w in ws}
    for members in groups.values():
        for (s1, c1), (s2, c2) in itertools.combinations(members, 2):
            assert not set(c1) & set(c2)
        for s, caps in members:
            for cap in caps:
                # every object's colour is named, and only colours of this scene
                named = {colour_words[w] for w in cap.replace(",", " ").replace(":", " ").split() if w in colour_words}
                assert named == {o.colour for o in s.objects}, cap


@pytest.mark.parametrize(
    "a, b, expected",
    [((0.2, 0.5), (0.8, 0.5), "left"), ((0.8, 0.5), (0.2, 0.45), "right"),
     ((0.5, 0.2), (0.5, 0.8), "above"), ((0.45, 0.9), (0.5, 0.1), "below")],
)
def test_relation(a, b, expected):
    oa = Obj("circle", "red", "small", a[0], a[1], 0.1, 0.0)
    ob = Obj("star", "blue", "small", b[0], b[1], 0.1, 0.0)
    assert relation(oa, ob) == expected


def test_rendered_colours_match_objects(sets):
    """Pixel check: the centre of each object is close to its nominal colour."""
    from PIL import Image
    import numpy as np

    root = sets["a"]
    doc = json.loads((root / "dataset_synthetic.json").read_text())
    for e in doc["images"][:20]:
        arr = np.asarray(Image.open(root / "images" / e["filename"]), dtype=float)
        size = arr.shape[0]
        for o in e["objects"]:
            if o["shape"] == "star":  # thin centre after downsampling; checked by the others
                continue
            y, x = int(o["y"] * size), int(o["x"] * size)
            nominal = np.array(COLOURS[o["colour"]], dtype=float)
            assert np.abs(arr[y, x] - nominal).max() < 50, (e["filename"], o)


def test_regenerates_only_when_params_change(tmp_path):
    cfg = tiny_config(data__root=str(tmp_path), data__synthetic__n_train=8, data__synthetic__n_test=8)
    root = run_download(cfg)
    json_path = root / "dataset_synthetic.json"
    first = json_path.stat().st_mtime_ns
    assert run_download(cfg) == root and json_path.stat().st_mtime_ns == first  # validated, untouched
    cfg2 = tiny_config(data__root=str(tmp_path), data__synthetic__n_train=9, data__synthetic__n_test=8)
    run_download(cfg2)
    doc = json.loads(json_path.read_text())
    assert sum(e["split"] == "train" for e in doc["images"]) == 9
    assert len(list((root / "images").iterdir())) == 9 + 16 + 8
