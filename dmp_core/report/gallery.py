"""The retrieval gallery: reports/evaluate/scores.npz and the test split's images and captions,
drawn at a legible size."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_core.errors import DataError
from dmp_core.report.figures import _figure, _save
from dmp_core.report.runs import MODELS

# ------------------------------------------------------------------ gallery
GALLERY_DPI = 100
MIN_DISPLAY_PX, MAX_DISPLAY_PX = 96, 224  # real photos are legible at 96-224 px


@dataclass
class GalleryData:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # one per caption id
    txt2img: np.ndarray  # [M]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (i2t, t2i), ITM re-ranked
    dataset: str = "?"
    split: str = "test"


def load_gallery(scores_npz: str | Path, split_dir: str | Path, dataset: str = "?") -> GalleryData:
    """Scores of every model in reports/evaluate/scores.npz and the split's images/captions."""
    scores_npz, split_dir = Path(scores_npz), Path(split_dir)
    for path in (scores_npz, split_dir / "images.npy", split_dir / "captions.parquet"):
        if not path.is_file():
            raise DataError(f"{path}: missing (run the evaluate stage)")
    with np.load(scores_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    # "<model>_i2t" holds the headline scorer's scores; "<model>_itc_i2t" / "<model>_itm_i2t" the others'
    models = sorted({k[: -len("_i2t")] for k in arrays
                     if k.endswith("_i2t") and not k.endswith(("itc_i2t", "itm_i2t"))},
                    key=lambda m: (MODELS[::-1].index(m) if m in MODELS else len(MODELS), m))
    scores = {m: (arrays[f"{m}_i2t"], arrays[f"{m}_t2i"]) for m in models if f"{m}_t2i" in arrays}
    if not scores:
        scores = {"final": (arrays["i2t"], arrays["t2i"])}
    captions = pd.read_parquet(split_dir / "captions.parquet").sort_values("caption_id")
    text_col = "raw" if "raw" in captions else "clean"
    return GalleryData(
        images=np.load(split_dir / "images.npy", mmap_mode="r"),
        captions=captions[text_col].astype(str).tolist(),
        txt2img=arrays["txt2img"],
        scores=scores,
        dataset=dataset,
        split=split_dir.name,
    )


def gallery_scale(image_px: int) -> float:
    """Display scale of gallery images: 1 (pixel for pixel) from 96 to 224 px, an integer
    enlargement below (nearest neighbour, said in the caption), a reduction above."""
    if image_px < MIN_DISPLAY_PX:
        return float(math.ceil(MIN_DISPLAY_PX / image_px))
    if image_px > MAX_DISPLAY_PX:
        return MAX_DISPLAY_PX / image_px
    return 1.0


def gallery_caption(data: GalleryData) -> str:
    """Names the dataset, the image size and how the images are shown."""
    h, w = data.images.shape[1:3]
    scale = gallery_scale(max(h, w))
    if scale > 1:
        how = f"shown enlarged {scale:g}× (nearest neighbour, {int(w * scale)} px on screen)"
    elif scale < 1:
        how = f"shown reduced to {int(round(w * scale))} px"
    else:
        how = "shown pixel for pixel"
    return f"{data.dataset} {data.split} split, images {w}×{h} px, {how}"


def plot_gallery(data: GalleryData, model: str, path: Path, queries: int = 4, top: int = 5) -> Path:
    """Top-``top`` images for a few captions (gold framed green) and top captions for a few images.

    Axes are placed in inches at a fixed dpi so that an image cell is exactly the
    image's display size (:func:`gallery_scale`).
    """
    import textwrap

    from matplotlib.patches import Rectangle

    plt = _figure()
    i2t, t2i = data.scores[model]
    text_q = _query_ids(t2i.shape[0], queries)
    image_q = _query_ids(i2t.shape[0], queries)
    top = min(top, i2t.shape[0], i2t.shape[1])
    h, w = data.images.shape[1:3]
    scale = gallery_scale(max(h, w))
    cell_w, cell_h = w * scale / GALLERY_DPI, h * scale / GALLERY_DPI  # inches
    pad, title_h, text_w, head = 0.08, 0.22, 2.6, 0.55
    rows = len(text_q) + len(image_q)
    fig_w = text_w + top * (cell_w + pad) + pad
    fig_w = max(fig_w, text_w + cell_w + 6.0)
    fig_h = head + rows * (cell_h + title_h + pad)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=GALLERY_DPI)
    interpolation = "nearest" if scale >= 1 else "antialiased"

    def axes_at(x: float, y_top: float, width: float, height: float):
        return fig.add_axes((x / fig_w, 1 - (y_top + height) / fig_h, width / fig_w, height / fig_h))

    def show(ax, img: int, gold: bool = False) -> None:
        ax.imshow(np.asarray(data.images[img]), interpolation=interpolation)
        ax.set_xticks([]), ax.set_yticks([])
        if gold:
            ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor="limegreen", linewidth=4))

    for r, t in enumerate(text_q):
        y = head + r * (cell_h + title_h + pad) + title_h
        ax = axes_at(pad, y, text_w - 2 * pad, cell_h)
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(textwrap.wrap(f"“{data.captions[t]}”", 34)), va="center", fontsize=8)
        for c, img in enumerate(np.argsort(-t2i[t], kind="stable")[:top]):
            gold = img == data.txt2img[t]
            ax = axes_at(text_w + c * (cell_w + pad), y, cell_w, cell_h)
            show(ax, int(img), gold)
            ax.set_title(f"#{c + 1}" + (" gold" if gold else ""), fontsize=7, color="green" if gold else "black")
    for r, img in enumerate(image_q, start=len(text_q)):
        y = head + r * (cell_h + title_h + pad) + title_h
        ax = axes_at(pad, y, cell_w, cell_h)
        show(ax, img)
        ax.set_title(f"image {img}", fontsize=7)
        ax = axes_at(pad + cell_w + 0.2, y, fig_w - cell_w - 0.4, cell_h)
        ax.axis("off")
        ranked = np.argsort(-i2t[img], kind="stable")[:top]
        for c, t in enumerate(ranked):
            gold = data.txt2img[t] == img
            line = f"{c + 1}. {'✓ ' if gold else ''}{textwrap.shorten(data.captions[t], 90)}"
            ax.text(0.0, 1 - (c + 0.5) / top, line, va="center", fontsize=8,
                    color="green" if gold else "black", weight="bold" if gold else "normal")
    title = (f"Retrieval gallery: {model} (headline scorer), {gallery_caption(data)}. "
             f"Rows 1-{len(text_q)}: caption → images; then image → captions. Gold in green.")
    fig.text(pad / fig_w, 1 - 0.06 / fig_h, "\n".join(textwrap.wrap(title, int(fig_w * 15))), fontsize=8,
             va="top", ha="left")
    return _save(fig, path, dpi=GALLERY_DPI, tight=False)


def _query_ids(n: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(count, n))})
