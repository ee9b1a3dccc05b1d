"""``dmp bench hog``: the batched torch HOG against scikit-image's per-image loop.

Both compute the same descriptor on the same images: per RGB channel, central
differences, 9 unsigned bins, 8x8 cells, per-cell L2 norm
(``skimage.feature.hog(channel, orientations=9, pixels_per_cell=(8, 8),
cells_per_block=(1, 1), block_norm="L2")``; torch: ``grad="central", angle="skimage"``).
The MaskFeat setting (Sobel) is timed as well, and the two outputs are compared.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dmp_core.targets import hog

PATCH, CELL, BINS = 16, 8, 9


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_images(n_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` uint8: random crops of scikit-image's astronaut (ships offline)."""
    from skimage import data

    source = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()  # [3, 512, 512]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        side = int(torch.randint(size // 2, source.shape[-1] + 1, (1,), generator=gen))
        top, left = (int(v) for v in torch.randint(0, source.shape[-1] - side + 1, (2,), generator=gen))
        crop = source[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def _skimage_hog(images_hwc: np.ndarray) -> np.ndarray:
    """Per image, per channel skimage HOG: ``[n, 3, rows, cols, bins]``."""
    from skimage.feature import hog as sk_hog

    out = []
    for image in images_hwc:
        per_channel = [
            sk_hog(image[..., c], orientations=BINS, pixels_per_cell=(CELL, CELL), cells_per_block=(1, 1),
                   block_norm="L2", feature_vector=False)[:, :, 0, 0, :]
            for c in range(image.shape[-1])
        ]
        out.append(np.stack(per_channel))
    return np.stack(out)


def bench_hog(n_images: int = 64, size: int = 224, repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    """Throughput (images/s) of the torch HOG (one batch) and of the skimage loop."""
    images = bench_images(n_images, size)
    x = images.float().div_(255.0)  # both sides get the same float32 images in [0, 1]
    images_hwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    settings = {"patch": PATCH, "cell": CELL, "bins": BINS, "grad": "central", "angle": "skimage"}

    with _torch_threads(threads) as n_threads:
        hog(x[:2], **settings)  # warm-up (allocator, kernels)
        t_torch = _best_time(lambda: hog(x, **settings), repeats)
        t_sobel = _best_time(lambda: hog(x, patch=PATCH, cell=CELL, bins=BINS, grad="sobel", angle="maskfeat"), repeats)
        ours = hog(x, **settings)
    t_skimage = _best_time(lambda: _skimage_hog(images_hwc), repeats)

    # same descriptor? skimage [n, C, rows, cols, bins] -> our per-patch layout
    ref = torch.from_numpy(_skimage_hog(images_hwc).astype(np.float32))
    side, per = size // PATCH, PATCH // CELL
    ref = ref.view(n_images, 3, side, per, side, per, BINS).permute(0, 2, 4, 1, 6, 3, 5)
    max_abs_diff = float((ours - ref.reshape_as(ours)).abs().max())

    torch_ips, skimage_ips = n_images / t_torch, n_images / t_skimage
    return {
        "benchmark": "hog",
        "n_images": n_images,
        "size": size,
        "repeats": repeats,
        "torch_threads": n_threads,
        "settings": settings,
        "torch_images_per_s": round(torch_ips, 1),
        "torch_sobel_maskfeat_images_per_s": round(n_images / t_sobel, 1),
        "skimage_images_per_s": round(skimage_ips, 2),
        "speedup": round(torch_ips / skimage_ips, 1),
        "max_abs_diff_vs_skimage": max_abs_diff,
        "torch_version": torch.__version__,
    }
