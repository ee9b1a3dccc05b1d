"""HOG targets: equivalence with scikit-image, a brute-force MaskFeat reference, and
the properties the MaskFeat (Sobel) mode must have."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data, draw, transform
from skimage.feature import hog as sk_hog

from dmp_core.errors import DmpError
from dmp_core.targets import HOG_EPS, hog


# ----------------------------------------------------------------------------- images
def _astronaut(height: int, width: int) -> np.ndarray:
    """scikit-image's astronaut (ships with the package, no download), resized, uint8 HWC."""
    img = transform.resize(data.astronaut(), (height, width), anti_aliasing=True)
    return np.round(img * 255).astype(np.uint8)


def _smooth(size: int) -> np.ndarray:
    """Ramps and a radial gradient, one per channel, uint8."""
    r, c = np.mgrid[0:size, 0:size].astype(np.float64)
    ramp = (r * 0.3 + c * 0.8) / (1.1 * size)
    radial = np.hypot(r - size / 2, c - size / 3) / size
    wave = 0.5 + 0.5 * np.sin(r / 5.0) * np.cos(c / 7.0)
    return np.round(np.stack([ramp, radial, wave], -1).clip(0, 1) * 255).astype(np.uint8)


def _shapes(size: int) -> np.ndarray:
    """Flat background with a disk, a rectangle and a triangle in different colours."""
    img = np.full((size, size, 3), 40, dtype=np.uint8)
    rr, cc = draw.disk((size * 0.35, size * 0.4), size * 0.22, shape=img.shape[:2])
    img[rr, cc] = (230, 30, 30)
    rr, cc = draw.rectangle((size * 0.55, size * 0.1), (size * 0.9, size * 0.5), shape=img.shape[:2])
    img[rr, cc] = (20, 200, 60)
    rr, cc = draw.polygon([size * 0.1, size * 0.8, size * 0.6], [size * 0.95, size * 0.6, size * 0.9], img.shape[:2])
    img[rr, cc] = (50, 60, 220)
    return img


def _noise(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _to_tensor(img_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img_hwc)).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------- references
def _patch_layout(cells: np.ndarray, patch: int, cell: int) -> np.ndarray:
    """[C, rows, cols, bins] per-cell histograms -> [P, D] in the documented layout
    (patches row-major; inside a patch: channel, bin, cell_row, cell_col), by loops."""
    channels, rows, cols, bins = cells.shape
    per = patch // cell
    out = []
    for pr in range(rows // per):
        for pc in range(cols // per):
            vec = [
                cells[ch, pr * per + cr, pc * per + cc, b]
                for ch in range(channels)
                for b in range(bins)
                for cr in range(per)
                for cc in range(per)
            ]
            out.append(vec)
    return np.asarray(out)


def _skimage_reference(img_hwc_float: np.ndarray, patch: int, cell: int, bins: int) -> np.ndarray:
    cells = np.stack(
        [
            sk_hog(img_hwc_float[..., ch], orientations=bins, pixels_per_cell=(cell, cell), cells_per_block=(1, 1),
                   block_norm="L2", feature_vector=False)[:, :, 0, 0, :]
            for ch in range(img_hwc_float.shape[-1])
        ]
    )
    return _patch_layout(cells, patch, cell)


def _maskfeat_reference(img_chw: np.ndarray, cell: int, bins: int, eps: float = HOG_EPS) -> np.ndarray:
    """Pixel-by-pixel MaskFeat HOG in float64: Sobel on the reflect-padded channel,
    theta = atan2(gx, gy), bin = floor(theta * bins / pi) mod bins, per-cell sums,
    L2 norm of the cell means with eps. Returns [C, rows, cols, bins]."""
    channels, height, width = img_chw.shape

    def px(ch: int, r: int, c: int) -> float:  # reflect padding (edge not repeated)
        r = -r if r < 0 else (2 * (height - 1) - r if r >= height else r)
        c = -c if c < 0 else (2 * (width - 1) - c if c >= width else c)
        return float(img_chw[ch, r, c])

    hist = np.zeros((channels, height // cell, width // cell, bins))
    for ch in range(channels):
        for r in range(height):
            for c in range(width):
                g_row = sum(w * (px(ch, r + 1, c + d) - px(ch, r - 1, c + d)) for d, w in ((-1, 1), (0, 2), (1, 1)))
                g_col = sum(w * (px(ch, r + d, c + 1) - px(ch, r + d, c - 1)) for d, w in ((-1, 1), (0, 2), (1, 1)))
                theta = math.atan2(g_col, g_row)
                b = math.floor(theta * bins / math.pi) % bins
                hist[ch, r // cell, c // cell, b] += math.hypot(g_row, g_col)
    means = hist / (cell * cell)
    return means / np.sqrt((means**2).sum(-1, keepdims=True) + eps**2)


# ----------------------------------------------------------------------------- skimage equivalence
CASES = {
    "astronaut": lambda: _astronaut(64, 96),
    "smooth": lambda: _smooth(64),
    "shapes": lambda: _shapes(64),
    "noise": lambda: _noise(48),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("patch,cell,bins", [(16, 8, 9), (8, 4, 9), (8, 4, 6)])
def test_matches_skimage(name, patch, cell, bins):
    img = CASES[name]()
    as_float = img.astype(np.float32) / np.float32(255)  # what hog() makes of uint8 input
    ours = hog(_to_tensor(img), patch=patch, cell=cell, bins=bins, grad="central", angle="skimage")[0]
    ref = _skimage_reference(as_float, patch, cell, bins)
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    # skimage sums cells in float32 (`cdef float total`), so ~1e-7 is its own precision
    assert np.abs(ours.numpy() - ref).max() < 1e-6


def test_matches_skimage_on_unquantised_natural_image():
    img = transform.resize(data.astronaut(), (96, 96), anti_aliasing=True).astype(np.float32)
    ours = hog(torch.from_numpy(img).permute(2, 0, 1)[None], patch=16, cell=8, grad="central", angle="skimage")[0]
    assert np.abs(ours.numpy() - _skimage_reference(img, 16, 8, 9)).max() < 1e-6


@pytest.mark.parametrize("bins", [6, 8, 22, 44])
def test_axis_aligned_and_diagonal_edges_bin_like_skimage(bins):
    """Horizontal, vertical (and for bins % 4 == 0, diagonal) gradients lie exactly on a
    bin edge; fp32 rounding of theta * bins / pi must not move them to the lower bin."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[8:24, 8:24] = 200
    img[4:12, 16:30, 1] = 90
    img[..., 2] = np.tril(np.full((32, 32), 150, dtype=np.uint8))  # a 45-degree staircase edge
    ref = _skimage_reference(img.astype(np.float32) / np.float32(255), 8, 8, bins)
    ours = hog(_to_tensor(img), patch=8, cell=8, bins=bins, grad="central", angle="skimage")[0]
    assert np.abs(ours.numpy() - ref).max() < 1e-6


def test_skimage_epsilon_is_emulated_on_faint_cells():
    """Faint gradients make skimage's eps visible; matching needs it applied to cell means."""
    img = np.full((32, 32, 3), 100, dtype=np.uint8)
    img[5, 5] = 101  # one grey level in one pixel: cell mean magnitude ~6e-5, comparable to eps
    img[20:, 20:, 1] = 103
    ref = _skimage_reference(img.astype(np.float32) / np.float32(255), 8, 8, 9)
    ours = hog(_to_tensor(img), patch=8, cell=8, grad="central", angle="skimage")[0].numpy()
    no_eps = hog(_to_tensor(img), patch=8, cell=8, grad="central", angle="skimage", eps=1e-12)[0].numpy()
    assert np.abs(ours - ref).max() < 1e-6
    assert np.abs(no_eps - ref).max() > 1e-3  # the emulation is what makes them agree


# ----------------------------------------------------------------------------- MaskFeat mode
def test_maskfeat_matches_bruteforce_reference():
    img = _astronaut(16, 16)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    ours = hog(x[None], patch=8, cell=4, bins=9, grad="sobel", angle="maskfeat")[0].numpy()
    ref = _patch_layout(_maskfeat_reference(x.double().numpy(), cell=4, bins=9), patch=8, cell=4)
    assert np.abs(ours - ref).max() < 1e-5


def test_shape_and_default_is_maskfeat():
    x = torch.rand(2, 3, 224, 224)
    out = hog(x)
    assert out.shape == (2, 196, 108)
    assert torch.equal(out, hog(x, patch=16, cell=8, bins=9, grad="sobel", angle="maskfeat"))
    assert hog(torch.rand(1, 3, 32, 48), patch=8, cell=4, bins=6).shape == (1, 24, 3 * 6 * 4)


def test_uint8_input_equals_scaled_float():
    img = _noise(32)
    u8 = _to_tensor(img)
    assert torch.equal(hog(u8, patch=8, cell=4), hog(u8.float() / 255, patch=8, cell=4))


def test_cells_are_unit_norm_and_flat_cells_zero():
    x = torch.rand(2, 3, 32, 32)
    x[:, :, :, 16:] = 0.5  # right half flat (column 16 still sees its left neighbour)
    out = hog(x, patch=8, cell=4, bins=9).view(2, 4, 4, 3, 9, 2, 2)  # grid, C, bins, cell r/c
    norms = out.square().sum(4).sqrt()  # [2, grid_r, grid_c, C, cell_r, cell_c]
    assert torch.allclose(norms[:, :, :2], torch.ones(()), atol=1e-5)  # textured cells
    assert torch.all(norms[:, :, 2:, :, :, 1] == 0)  # cells in columns 20..31: no gradient
    assert torch.all(out >= 0)


@pytest.mark.parametrize("grad", ["sobel", "central"])
def test_invariant_to_per_channel_brightness_and_offset(grad):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=gen).float() / 256  # exact in binary
    scale = torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1)
    offset = torch.tensor([0.25, -1.0, 3.0]).view(1, 3, 1, 1)
    base = hog(x, patch=8, cell=4, grad=grad)
    assert torch.allclose(hog(x * scale + offset, patch=8, cell=4, grad=grad), base, atol=1e-6)


@pytest.mark.parametrize("grad", ["sobel", "central"])
@pytest.mark.parametrize("angle", ["maskfeat", "skimage"])
def test_rotating_by_90_degrees_shifts_bins_by_half(grad, angle):
    """Rotating the image by 90 degrees rotates the cell grid and adds 90 degrees to every
    unsigned orientation: with an even number of bins, a shift of bins/2."""
    bins = 6
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (1, 3, 32, 32), generator=gen).float() / 64
    grid = lambda img: hog(img, patch=4, cell=4, bins=bins, grad=grad, angle=angle).view(1, 8, 8, 3, bins)  # noqa: E731
    rotated = grid(torch.rot90(x, 1, dims=(2, 3)))
    expected = torch.roll(torch.rot90(grid(x), 1, dims=(1, 2)), shifts=bins // 2, dims=-1)
    assert torch.allclose(rotated, expected, atol=1e-6)


@pytest.mark.parametrize("grad", ["sobel", "central"])
def test_linear_ramp_lands_in_the_expected_bin(grad):
    """A ramp rising at 25 degrees: skimage measures atan2(d_row, d_col) = 25 (bin 1 of 9),
    MaskFeat atan2(d_col, d_row) = 65 (bin 3); rotated by 90 degrees: 115 (bin 5) and 155 (bin 7)."""
    r, c = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phi = math.radians(25)
    ramp = (r * math.sin(phi) + c * math.cos(phi)) / 64
    x = ramp.expand(1, 3, 32, 32)
    interior = (slice(1, 3), slice(1, 3))  # cells away from the reflect-padded border
    for image, bin_skimage, bin_maskfeat in ((x, 1, 3), (torch.rot90(x, 1, dims=(2, 3)), 5, 7)):
        for angle, expected in (("skimage", bin_skimage), ("maskfeat", bin_maskfeat)):
            out = hog(image, patch=8, cell=8, bins=9, grad=grad, angle=angle).view(4, 4, 3, 9)[interior]
            one_hot = torch.zeros(9)
            one_hot[expected] = 1.0
            assert torch.allclose(out, one_hot.expand_as(out), atol=1e-5), (angle, out[0, 0, 0])


def test_sobel_and_central_differ():
    x = torch.from_numpy(_astronaut(32, 32)).permute(2, 0, 1)[None]
    assert not torch.allclose(hog(x, patch=8, cell=4, grad="sobel"), hog(x, patch=8, cell=4, grad="central"))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((1, 3, 30, 32), {"patch": 8, "cell": 4}, "not divisible by patch=8"),
        ((1, 3, 32, 32), {"patch": 8, "cell": 3}, "cell=3 must divide patch=8"),
        ((3, 32, 32), {"patch": 8, "cell": 4}, r"expected shape \[B, C, H, W\]"),
        ((1, 3, 32, 32), {"patch": 8, "cell": 4, "grad": "prewitt"}, "grad must be"),
        ((1, 3, 32, 32), {"patch": 8, "cell": 4, "angle": "degrees"}, "angle must be"),
    ],
)
def test_bad_arguments_raise_one_line(shape, kwargs, match):
    with pytest.raises(DmpError, match=match) as info:
        hog(torch.rand(shape), **kwargs)
    assert "\n" not in str(info.value)


def test_integer_images_other_than_uint8_are_refused():
    with pytest.raises(DmpError, match="uint8 or float"):
        hog(torch.zeros(1, 3, 16, 16, dtype=torch.int32), patch=8, cell=4)


def test_no_autograd_graph():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert not hog(x, patch=8, cell=4).requires_grad


# ----------------------------------------------------------------------------- benchmark
def test_bench_hog_smoke():
    from dmp_core.benchmarks.hog import bench_hog

    threads_before = torch.get_num_threads()
    result = bench_hog(n_images=2, size=32, repeats=1, threads=1)
    assert result["torch_threads"] == 1 and torch.get_num_threads() == threads_before
    assert result["torch_images_per_s"] > 0 and result["skimage_images_per_s"] > 0
    # the speed-up is rounded to 0.1 (and computed from the unrounded rates): compare within that
    # rounding, not relatively (a loaded machine can give 0.4 for a ratio of 0.407)
    assert result["speedup"] == pytest.approx(result["torch_images_per_s"] / result["skimage_images_per_s"],
                                              rel=0.01, abs=0.06)
    assert result["max_abs_diff_vs_skimage"] < 1e-6
