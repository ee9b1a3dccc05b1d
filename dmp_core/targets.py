"""Reconstruction targets for masked image modelling: HOG (MaskFeat) and pixels.

Both are computed per ViT patch, in ViT patch order (row-major over the patch
grid), as ``[B, P, D]`` float tensors:

* :func:`hog` -- per RGB channel histograms of oriented gradients (METHOD.md
  section 5), ``D = C * bins * (patch / cell) ** 2`` (108 at patch 16, cell 8).
* :func:`pixel_targets` -- the patch's pixels in ``[0, 1]``, ``D = patch * patch * C``,
  optionally normalised per patch (MAE / SimMIM); without per-patch normalisation the
  training step maps them into the image tower's normalised input space
  (:func:`normalise_pixel_targets`), so the L1 loss has the scale SimMIM's has.

:func:`run_targets` is the ``targets`` pipeline stage: it precomputes both for
every prepared split and writes them as float16 ``.npy`` files plus a JSON
sidecar naming every parameter used.

The HOG is computed batched in torch; scikit-image's per-image loop is the
reference it is tested against (``grad="central", angle="skimage"`` reproduces
``skimage.feature.hog(channel, orientations=bins, pixels_per_cell=(cell, cell),
cells_per_block=(1, 1), block_norm="L2")`` per channel).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dmp_core.errors import DataError, DmpError
from dmp_core.io import open_memmap_atomic, write_json

Grad = Literal["sobel", "central"]
Angle = Literal["maskfeat", "skimage"]

# skimage's ``_hog_normalize_block`` epsilon for block_norm="L2"; it is applied to
# the histogram of cell *means*, so ours is too (see ``hog``).
HOG_EPS = 1e-5
# Added to the per-patch variance before the square root (MAE uses 1e-6).
PIXEL_NORM_EPS = 1e-6
SPLITS = ("train", "val", "test")
# Pixel values (B * C * H * W) per internal HOG chunk: small enough that the per-pixel
# intermediates (gradients, magnitude, angle, bin index; ~5 MB each) stay in the CPU
# caches, large enough to amortise per-op overheads (8 images at 224 px).
_HOG_CHUNK_VALUES = 8 * 3 * 224 * 224
# Bin-edge tolerance: theta * bins / pi (in bin widths) is raised by bins * 2**-21, a few
# fp32 ulps of values up to `bins`, before it is floored (see _cell_histograms).
_BIN_EDGE_NUDGE = 2.0**-21


class TargetsError(DmpError, ValueError):
    """Bad arguments to the target functions (shape, dtype, sizes that do not tile)."""


# ----------------------------------------------------------------------------- helpers
def _as_float_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """``[B, C, H, W]`` float32; uint8 input is scaled to ``[0, 1]``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TargetsError(f"{name}: expected a tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise TargetsError(f"{name}: expected shape [B, C, H, W], got {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TargetsError(f"{name}: expected uint8 or float images, got {images.dtype}")
    return images.float()


def _check_tiling(size: tuple[int, int], patch: int, cell: int | None = None) -> None:
    height, width = size
    if patch < 1 or height % patch or width % patch:
        raise TargetsError(f"image size {height}x{width} is not divisible by patch={patch}")
    if cell is not None and (cell < 1 or patch % cell):
        raise TargetsError(f"cell={cell} must divide patch={patch}")


def _gradients(x: torch.Tensor, grad: Grad) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (downward) and column (rightward) derivatives of every channel, ``[B, C, H, W]``.

    Both operators act on the reflect-padded image (``F.pad(mode="reflect")``):

    * ``central``: ``x[r+1] - x[r-1]`` (not halved, as skimage). At the border the
      reflected neighbours are equal, so the derivative across the border is exactly
      0 -- what skimage sets it to.
    * ``sobel``: MaskFeat's 3x3 Sobel kernels. A Sobel kernel is the outer product of
      the smoothing ``[1, 2, 1]`` and the difference ``[-1, 0, 1]``, so it is applied as
      two shifted-slice passes; on CPU this is several times faster than the equivalent depthwise
      ``conv2d`` (measured; see bench/README.md) and gives the same values up to fp32
      rounding.

    Signs do not matter downstream: the orientation is unsigned, so negating both
    derivatives maps every pixel to the same bin.
    """
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # [B, C, H+2, W+2]
    if grad == "central":
        d_row = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
        d_col = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
    elif grad == "sobel":
        # smooth across columns, then difference across rows (and vice versa)
        across_cols = torch.add(padded[..., :-2], padded[..., 2:]).add_(padded[..., 1:-1], alpha=2.0)
        d_row = across_cols[:, :, 2:] - across_cols[:, :, :-2]
        del across_cols
        across_rows = torch.add(padded[:, :, :-2], padded[:, :, 2:]).add_(padded[:, :, 1:-1], alpha=2.0)
        d_col = across_rows[..., 2:] - across_rows[..., :-2]
    else:
        raise TargetsError(f"grad must be 'sobel' or 'central', got {grad!r}")
    return d_row, d_col


def _cell_histograms(
    x: torch.Tensor, *, cell: int, bins: int, grad: Grad, angle: Angle
) -> torch.Tensor:
    """Per-channel, per-cell sums of gradient magnitude in hard orientation bins.

    Returns ``[B, C, H/cell, W/cell, bins]`` float32.
    """
    batch, channels, height, width = x.shape
    d_row, d_col = _gradients(x, grad)
    # hypot(d_row, d_col); sqrt of the sum of squares is ~3x cheaper than torch.hypot and
    # cannot overflow for image-range inputs
    magnitude = (d_row * d_row).addcmul_(d_col, d_col).sqrt_()

    # Unsigned orientation in [0, 180) degrees, hard-binned into `bins` equal bins:
    #   bin = floor(theta * bins / pi) mod bins,  theta = atan2(...) in [-pi, pi]
    # (the modulo folds theta and theta - pi, i.e. opposite directions, together):
    #   skimage:  theta = atan2(d_row, d_col)   (skimage/feature/_hoghistogram.pyx)
    #   maskfeat: theta = atan2(d_col, d_row)   (MaskFeat's atan2(gx, gy))
    if angle == "skimage":
        theta = torch.atan2(d_row, d_col)
    elif angle == "maskfeat":
        theta = torch.atan2(d_col, d_row)
    else:
        raise TargetsError(f"angle must be 'maskfeat' or 'skimage', got {angle!r}")
    del d_row, d_col
    # k = floor(theta * bins / pi) lies in [-bins, bins]. Rather than a (slow) per-pixel
    # modulo, every cell gets 2 * bins + 1 slots, slot k + bins, and the slots are folded
    # onto the bins afterwards on the small histogram.
    slots = 2 * bins + 1
    n_rows, n_cols = height // cell, width // cell
    cell_of_pixel = (
        (torch.arange(height, device=x.device) // cell)[:, None] * n_cols
        + (torch.arange(width, device=x.device) // cell)[None, :]
    )
    slot_offset = (cell_of_pixel * slots + bins).to(theta.dtype)  # exact: small integers
    # The nudge puts angles that sit exactly on a bin edge (axis-aligned gradients when
    # `bins` is even, theta = -pi) in the upper bin whatever the fp32 rounding of
    # theta * bins / pi. It is far below the distance of any uint8-image gradient
    # direction from a bin edge (>= 3e-5 bin widths for central differences and 6, 8 or
    # 9 bins), so it changes nothing else.
    nudge = _BIN_EDGE_NUDGE * bins
    index = theta.mul_(bins / math.pi).add_(nudge).floor_().add_(slot_offset).long()

    flat = torch.zeros(batch * channels, n_rows * n_cols * slots, dtype=torch.float32, device=x.device)
    flat.scatter_add_(1, index.view(batch * channels, -1), magnitude.view(batch * channels, -1))
    flat = flat.view(batch, channels, n_rows, n_cols, slots)
    # slot j holds k = j - bins: k in [-bins, -1] -> bin k + bins, k in [0, bins) -> bin k,
    # k = bins (theta = pi exactly) -> bin 0
    hist = flat[..., :bins] + flat[..., bins : 2 * bins]
    hist[..., 0] += flat[..., 2 * bins]
    return hist


# ----------------------------------------------------------------------------- public
def hog(
    images: torch.Tensor,
    *,
    patch: int = 16,
    cell: int = 8,
    bins: int = 9,
    grad: Grad = "sobel",
    angle: Angle = "maskfeat",
    eps: float = HOG_EPS,
) -> torch.Tensor:
    """HOG targets per ViT patch: ``[B, H/patch * W/patch, C * bins * (patch/cell)**2]``.

    ``images``: ``[B, C, H, W]`` float (any affine intensity scale: the histograms are
    normalised) or uint8 (scaled to ``[0, 1]``). Computed per channel in fp32 without
    gradients: derivatives by ``grad`` (``sobel``: MaskFeat's 3x3 Sobel; ``central``:
    skimage's central differences), magnitude ``hypot``, unsigned orientation hard-binned
    into ``bins`` bins of ``180/bins`` degrees measured as ``angle`` says (``skimage``:
    ``atan2(d_row, d_col)``; ``maskfeat``: ``atan2(d_col, d_row)``), magnitudes summed per
    ``cell x cell`` cell, and each cell's ``bins``-histogram L2-normalised as
    ``m / sqrt(|m|^2 + eps^2)`` where ``m`` is the histogram of cell *means* (the sum
    divided by ``cell**2``), exactly as skimage's ``block_norm="L2"`` with
    ``cells_per_block=(1, 1)``. A flat cell gives zeros.

    Patches are in ViT (row-major) order. Inside a patch the last dimension is
    flattened as ``(channel, bin, cell_row, cell_col)`` -- MaskFeat's order -- i.e.
    ``out[b, p].view(C, bins, patch // cell, patch // cell)``.
    """
    x = _as_float_images(images)
    batch, channels, height, width = x.shape
    _check_tiling((height, width), patch, cell)
    if bins < 1:
        raise TargetsError(f"bins must be >= 1, got {bins}")
    if not eps > 0:
        raise TargetsError(f"eps must be > 0 (flat cells would divide 0 by 0), got {eps}")
    if grad not in ("sobel", "central"):
        raise TargetsError(f"grad must be 'sobel' or 'central', got {grad!r}")
    if angle not in ("maskfeat", "skimage"):
        raise TargetsError(f"angle must be 'maskfeat' or 'skimage', got {angle!r}")

    per_side = patch // cell
    grid_h, grid_w = height // patch, width // patch
    # skimage normalises the histogram of cell means m = sums / cell**2:
    # m / sqrt(|m|^2 + eps^2) == sums / sqrt(|sums|^2 + (eps * cell**2)^2)
    eps_sums_sq = (eps * cell * cell) ** 2
    step = max(1, _HOG_CHUNK_VALUES // (channels * height * width))
    with torch.no_grad():
        x = x.detach().contiguous()
        out = torch.empty(batch, grid_h * grid_w, channels * bins * per_side * per_side, device=x.device)
        # [B, grid_h, grid_w, C, bins, cell_row, cell_col] view of the output
        out_cells = out.view(batch, grid_h, grid_w, channels, bins, per_side, per_side)
        for lo in range(0, batch, step):
            hist = _cell_histograms(x[lo : lo + step], cell=cell, bins=bins, grad=grad, angle=angle)
            norm = torch.linalg.vector_norm(hist, dim=-1, keepdim=True)
            hist.div_(norm.square_().add_(eps_sums_sq).sqrt_())
            # [b, C, rows, cols, bins] -> [b, grid_h, grid_w, C, bins, cell_row, cell_col]
            cells = hist.view(len(hist), channels, grid_h, per_side, grid_w, per_side, bins)
            out_cells[lo : lo + step] = cells.permute(0, 2, 4, 1, 6, 3, 5)
        return out


def pixel_targets(
    images: torch.Tensor, *, patch: int, norm_per_patch: bool = False, eps: float = PIXEL_NORM_EPS
) -> torch.Tensor:
    """Per-patch flattened pixels: ``[B, H/patch * W/patch, patch * patch * C]``.

    Values in ``[0, 1]`` (uint8 input is scaled); patches in ViT row-major order; inside
    a patch the order is ``(row, col, channel)`` (MAE's patchify). With
    ``norm_per_patch`` each patch is shifted to zero mean and scaled to unit variance
    (population variance, ``+ eps`` under the square root), as MAE / SimMIM.
    """
    x = _as_float_images(images)
    batch, channels, height, width = x.shape
    _check_tiling((height, width), patch)
    with torch.no_grad():
        grid_h, grid_w = height // patch, width // patch
        out = x.detach().reshape(batch, channels, grid_h, patch, grid_w, patch)
        out = out.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch * patch * channels)
        if norm_per_patch:
            mean = out.mean(dim=-1, keepdim=True)
            var = out.var(dim=-1, keepdim=True, unbiased=False)
            out = (out - mean) / (var + eps).sqrt()
        return out.contiguous()


def normalise_pixel_targets(targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixel targets in ``[0, 1]`` (``[B, P, patch*patch*C]``, channel last) -> normalised
    with the image tower's per-channel ``mean``/``std``: the same space as the model's
    input, as SimMIM regresses (used when ``targets.pixel.norm_per_patch`` is off)."""
    mean, std = mean.reshape(-1).to(targets), std.reshape(-1).to(targets)
    channels = mean.numel()
    shape = targets.shape
    out = (targets.reshape(*shape[:-1], -1, channels) - mean) / std
    return out.reshape(shape)


# ----------------------------------------------------------------------------- stage
def target_settings(cfg: Any) -> dict[str, Any]:
    """Every parameter that determines the target arrays (written to the sidecar)."""
    t = cfg.targets
    return {
        "kinds": list(dict.fromkeys(t.kinds)),  # in order, without repeats
        "patch": cfg.target_patch,
        "hog": {"cell": t.hog.cell, "bins": t.hog.bins, "grad": t.hog.grad, "angle": t.hog.angle, "eps": HOG_EPS},
        "pixel": {"norm_per_patch": t.pixel.norm_per_patch, "eps": PIXEL_NORM_EPS},
    }


def target_dim(kind: str, cfg: Any, channels: int = 3) -> int:
    """Width ``D`` of one patch's target of ``kind`` under ``cfg.targets`` (for MIM heads)."""
    t, patch = cfg.targets, cfg.target_patch
    if kind == "hog":
        return channels * t.hog.bins * (patch // t.hog.cell) ** 2
    if kind == "pixel":
        return patch * patch * channels
    raise TargetsError(f"targets.kinds: unknown kind {kind!r} (allowed: hog, pixel)")


def compute_targets(images: torch.Tensor, kind: str, cfg: Any) -> torch.Tensor:
    """One kind of target (``hog`` or ``pixel``) for a batch, with ``cfg.targets`` settings."""
    t, patch = cfg.targets, cfg.target_patch
    if kind == "hog":
        return hog(images, patch=patch, cell=t.hog.cell, bins=t.hog.bins, grad=t.hog.grad, angle=t.hog.angle)
    if kind == "pixel":
        return pixel_targets(images, patch=patch, norm_per_patch=t.pixel.norm_per_patch)
    raise TargetsError(f"targets.kinds: unknown kind {kind!r} (allowed: hog, pixel)")


def _open_images(path: Path, patch: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing (run the preprocess stage first)")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    height, width = images.shape[1:3]
    if height % patch or width % patch:
        raise DataError(f"{path}: image size {height}x{width} is not divisible by targets.patch={patch}")
    return images


def run_targets(
    cfg: Any, prepared_dir: Path = Path("data/prepared"), out_dir: Path = Path("data/targets")
) -> dict[str, Any]:
    """The ``targets`` stage: precompute ``cfg.targets.kinds`` for every prepared split.

    Reads ``<prepared_dir>/<split>/images.npy`` (uint8 ``[N, H, W, 3]``, memory-mapped)
    for the splits present among train/val/test and writes, atomically,
    ``<out_dir>/<split>/<kind>.npy`` (float16 ``[N, P, D]``, ViT patch order) and
    ``<out_dir>/<split>/targets.json`` (every parameter used, shapes and layouts).
    A kind not requested any more is removed so the folder matches its sidecar.
    Returns a summary: per split the number of images and the shapes, and the seconds taken.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    t = cfg.targets
    splits = [s for s in SPLITS if (prepared_dir / s / "images.npy").is_file()]
    if not splits:
        raise DataError(f"{prepared_dir}: no <split>/images.npy for any of {', '.join(SPLITS)} (run preprocess first)")
    settings = target_settings(cfg)
    kinds = settings["kinds"]
    if not kinds:
        raise DataError("targets.kinds: empty; choose at least one of hog, pixel")
    start = time.perf_counter()
    summary: dict[str, Any] = {"splits": {}, "settings": settings}

    for split in splits:
        src = prepared_dir / split / "images.npy"
        images = _open_images(src, cfg.target_patch)
        n, height, width = images.shape[:3]
        dest = out_dir / split
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "targets.json").unlink(missing_ok=True)  # stale until this split is complete
        for kind in ("hog", "pixel"):
            if kind not in kinds:
                (dest / f"{kind}.npy").unlink(missing_ok=True)

        num_patches = (height // cfg.target_patch) * (width // cfg.target_patch)
        shapes = {kind: (n, num_patches, target_dim(kind, cfg)) for kind in kinds}
        with contextlib.ExitStack() as stack:
            outs = {
                kind: stack.enter_context(open_memmap_atomic(dest / f"{kind}.npy", np.float16, shapes[kind]))
                for kind in kinds
            }
            for lo in range(0, n, t.batch_size):
                batch = np.array(images[lo : lo + t.batch_size])  # read from the memmap into RAM
                # [b, H, W, 3] uint8 -> [b, 3, H, W] float in [0, 1]
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
                for kind, arr in outs.items():
                    arr[lo : lo + len(batch)] = compute_targets(x, kind, cfg).to(torch.float16).numpy()
        sidecar = {
            **settings,
            "source": str(src),
            "num_images": n,
            "image_size": [height, width],
            "num_patches": num_patches,
            "dtype": "float16",
            "shapes": {kind: list(shape) for kind, shape in shapes.items()},
            "layout": {
                "patches": "ViT row-major over the (H/patch, W/patch) grid",
                "hog": "(channel, bin, cell_row, cell_col)",
                "pixel": "(row, col, channel)",
            },
        }
        write_json(dest / "targets.json", sidecar)
        summary["splits"][split] = {"images": n, "shapes": sidecar["shapes"]}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def mim_targets(cfg: Any, kind: str, raw_images: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                precomputed: torch.Tensor | None = None) -> torch.Tensor:
    """HOG or pixel MIM targets [B, N, D] of uint8 images: the precomputed ones (targets
    stage) when given, else computed on the fly. Pixel targets without per-patch
    normalisation are mapped into the image tower's normalised input space (SimMIM), given
    by the tower's ``pixel_mean`` / ``pixel_std``."""
    if precomputed is not None:
        out = precomputed.to(raw_images.device).float()
    else:
        out = compute_targets(raw_images, kind, cfg)
    if kind == "pixel" and not cfg.targets.pixel.norm_per_patch:
        out = normalise_pixel_targets(out, pixel_mean, pixel_std)
    return out
