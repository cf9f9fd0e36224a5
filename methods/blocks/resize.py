"""Pillow's bilinear resize of uint8 images, bit for bit, as batched torch ops on the images' device.

Upstream code that resizes PIL images before `ToTensor()` (GLNet's global view: `Image.resize((s, s), BILINEAR)`,
glnet spec §4.3, §5.1) gets Pillow's result, which is neither torch's `interpolate(..., antialias=True)` followed by
rounding (that differs by ±1 on about 10% of the values) nor plain bilinear sampling (Pillow widens the filter by the
downscale factor: an area-aware, antialiased resize). `pil_bilinear_resize` reproduces Pillow's
`src/libImaging/Resample.c` for 8-bit images exactly:

* per output pixel, `precompute_coeffs`: centre `(i + 0.5) * scale` with `scale = in / out`, filter scale
  `max(scale, 1)`, support `1 * filter scale`, taps from `int(centre - support + 0.5)` (clamped to 0) up to
  `int(centre + support + 0.5)` (clamped to the input size), weights `triangle((j - centre + 0.5) * (1 / filter scale))`
  summed in order and divided by their sum; all in double precision, as in C;
* `normalize_coeffs_8bpc`: weights to fixed point, `int(0.5 + w * 2**22)` (PRECISION_BITS = 32 - 8 - 2);
* a horizontal pass, then a vertical pass on its uint8 result (Pillow >= 13 swaps the two when the height shrinks
  by more than twice as many pixels as the width: `pillow_vertical_first`), each `(2**21 + sum(pixel * weight))
  >> 22` clipped to 0..255.

The taps are computed once per (input size, output size) in Python floats (IEEE doubles, the same operations in the
same order as the C code); the passes run in int64, so every sum is exact whatever the device.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits for the result, 2 for overflow of negative-lobed filters


def _triangle(x: float) -> float:
    """Resample.c `bilinear_filter`."""
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


@lru_cache(maxsize=32)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Pillow's taps for one axis: (first input index per output pixel, fixed-point weights per output pixel,
    padded with zeros to the same length). `precompute_coeffs` + `normalize_coeffs_8bpc` for box (0, in_size)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize: sizes must be >= 1, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize; in0 = 0.0f, in1 = (float)in_size (exact)
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # BILINEAR.support = 1.0
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    starts, weights = [], []
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero; negatives end at 0 either way
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [_triangle((x + xmin - center + 0.5) * inv) for x in range(xmax)]
        ww = 0.0
        for w in k:  # summed in order, as the C loop (numpy's pairwise sum could round differently)
            ww += w
        if ww != 0.0:
            k = [w / ww for w in k]
        fixed = [int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS)) for w in k]
        starts.append(xmin)
        weights.append(tuple(fixed + [0] * (ksize - len(fixed))))
    return tuple(starts), tuple(weights)


def _resample_rows(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass of `ImagingResample{Horizontal,Vertical}_8bpc` along dim -2 (whole rows are gathered, the fast
    direction for `index_select`): the int64 uint8-valued result."""
    in_size = x.shape[-2]
    starts, weights = pil_bilinear_taps(in_size, out_size)
    start = torch.tensor(starts, dtype=torch.int64, device=x.device)
    kernel = torch.tensor(weights, dtype=torch.int64, device=x.device).T[..., None]  # (ksize, out, 1)
    acc = torch.full((*x.shape[:-2], out_size, x.shape[-1]), 1 << (PRECISION_BITS - 1), dtype=torch.int64,
                     device=x.device)
    for t in range(kernel.shape[0]):
        index = (start + t).clamp_(max=in_size - 1)  # a tap past the input has weight 0
        acc.add_(x.index_select(-2, index).to(torch.int64).mul_(kernel[t]))
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255)  # clip8: a lookup of ss >> 22


def _horizontal(x: torch.Tensor, out_w: int) -> torch.Tensor:
    return _resample_rows(x.transpose(-1, -2).contiguous(), out_w).transpose(-1, -2).contiguous()


def pillow_vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow 13 runs the vertical pass first (python-pillow/Pillow#9549, "if height is scaled down
    significantly more than width, resize vertically first"): when the height shrinks by more than twice as many
    pixels as the width. Pillow <= 12 always ran the horizontal pass first. Sizes are (h, w). The exact condition
    is inferred from Pillow 13.0.0's output (its C source was not at hand) and checked against it on random sizes
    in tests/test_glnet.py; the two orders differ by 1 on some values."""
    (h, w), (oh, ow) = in_size, out_size
    return oh < h and (h - oh) > 2 * (w - ow)


def pil_bilinear_resize(images: torch.Tensor, size: tuple[int, int],
                        vertical_first: bool | None = None) -> torch.Tensor:
    """`Image.resize((w, h), Image.BILINEAR)` of every image of a batch (..., H, W) of uint8 values (any dtype
    holding integers 0..255, fractions are truncated; any channel count) to `size` = (h, w); returns the input's
    dtype, on its device.

    `vertical_first`: the order of the two passes. None follows the pinned Pillow 13 (`pillow_vertical_first`);
    False is every Pillow up to 12 (GLNet's authors, 2019, left Pillow unpinned). Both choose horizontal first,
    hence agree, unless the height shrinks by more than twice as many pixels as the width: square-to-square and
    landscape-to-square resizes (every dataset here as stored; not a 90-degree-rotated Cityscapes image) are never
    affected. A pass along an axis that keeps its size is skipped, as Pillow does (it would be an identity: taps
    [1, 0])."""
    out_h, out_w = (int(s) for s in size)
    in_h, in_w = images.shape[-2:]
    if vertical_first is None:
        vertical_first = pillow_vertical_first((in_h, in_w), (out_h, out_w))
    x = images.contiguous()
    if vertical_first and out_h != in_h:
        x = _resample_rows(x, out_h)
    if out_w != in_w:
        x = _horizontal(x, out_w)
    if not vertical_first and out_h != in_h:
        x = _resample_rows(x, out_h)
    return x.to(images.dtype) if (out_h, out_w) != (in_h, in_w) else images.clone()
