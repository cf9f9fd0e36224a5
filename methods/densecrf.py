"""DenseCRF (Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
NeurIPS 2011) as the UHR tables' "DenseCRF" refiner over any registered one-phase base method (`base:` in params).
Facts cite docs/specs/densecrf.md (§N); upstream is lucasb-eyer/pydensecrf @ 2723c7f (`pydensecrf/densecrf/src/`,
cited as `permutohedral.cpp:L`, `pairwise.cpp:L`, `densecrf.cpp:L`): read for facts, written anew in torch so that it
runs on CPU and CUDA without a compiler (tests/golden/make_densecrf.py checks ours against the compiled C++).

What `predict` computes (§3): base logits at the image size -> unary U = -log(clip(softmax, 1e-5)) (pydensecrf's
`unary_from_softmax`; `probability_clip=None`: -log_softmax, DeepLab's unclipped form) -> `iterations` mean-field steps
Q = softmax(-U + w1 K̄1 Q + w2 K̄2 Q) with the appearance kernel (x/θα, y/θα, RGB/θβ) and the smoothness kernel
(x/θγ, y/θγ), self term included, each normalised symmetrically (pydensecrf's default) or per pixel (NeurIPS'11 /
DeepLab's Caffe layer) -> log Q as logits. Kernels are filtered by a permutohedral lattice (Adams, Baek, Davis 2010)
built as `permutohedral.cpp` builds it: same elevation, rounding, rank, barycentric weights and [1 2 1]/2 blur; the
hash table becomes packed integer keys + `torch.unique`, neighbours a `searchsorted`. Defaults: DeepLab-v2's
(w1, θα, θβ, w2, θγ) = (4, 67, 3, 3, 1), 10 iterations (§5). No learnable parameters: only the base trains.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Knob, MethodError, ParamCount, register_method
from methods.blocks.refiner import BaseRefiner

NORMALIZATIONS = ("symmetric", "per_pixel")
KernelFilter = Callable[[torch.Tensor], torch.Tensor]  # (N, V) values -> (N, V) = K @ values, unnormalised


class PermutohedralLattice:
    """The lattice of `permutohedral.cpp` (SSE `init` L140-321, `sseCompute` L529-589) for features (N, d) float32:
    `filter(values)` approximates Σ_j exp(-½|f_i - f_j|²) values_j, self term included. Built once per image and
    kernel; every tensor lives on the features' device."""

    def __init__(self, features: torch.Tensor) -> None:
        n, d = features.shape
        device = features.device
        self.num_points, self.dim = n, d
        features = features.float()
        # the SSE init (the path x86 builds compile) runs 4 points at a time and pads with zero features, whose
        # simplex it inserts into the hash table too (L191-196, L272): lattice vertices that take part in the blur
        padded = torch.cat([features, features.new_zeros((-n) % 4, d)])
        # scale so that the [1 2 1] blur approximates exp(-½|Δf|²) (L179-182): sqrt(2/3)(d+1) / sqrt((i+1)(i+2))
        inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
        scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                             dtype=torch.float32, device=device)
        scaled = padded * scale
        # elevate onto the plane Σ = 0 in d+1 dimensions (L201-207), accumulated from the last coordinate down
        elevated = padded.new_empty(len(padded), d + 1)
        running = padded.new_zeros(len(padded))
        for j in range(d, 0, -1):
            elevated[:, j] = running - j * scaled[:, j - 1]
            running = running + scaled[:, j - 1]
        elevated[:, 0] = running
        # nearest 0-coloured lattice point: round each coordinate to a multiple of d+1, ties to even (L210-220)
        inv_dplus1 = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=device)
        rounded = torch.round(elevated * inv_dplus1)
        rem0 = rounded * (d + 1)
        coordinate_sum = rounded.sum(1).long()
        # rank of each coordinate's residual among the d+1 (ties: the earlier coordinate ranks lower, L225-233)
        residual = elevated - rem0
        rank = torch.zeros(len(padded), d + 1, dtype=torch.long, device=device)
        for i in range(d):
            for j in range(i + 1, d + 1):
                smaller = residual[:, i] < residual[:, j]
                rank[:, i] += smaller
                rank[:, j] += ~smaller
        # bring the point back onto the plane when the rounded coordinates do not sum to 0 (L236-242)
        rank += coordinate_sum[:, None]
        wrap = (rank < 0).long() - (rank >= d + 1).long()
        rank += wrap * (d + 1)
        rem0 = rem0 + wrap * (d + 1)
        # barycentric weights of the d+1 enclosing simplex vertices (L244-263)
        weight = (elevated - rem0) * inv_dplus1
        barycentric = padded.new_zeros(len(padded), d + 2)
        barycentric.scatter_add_(1, d - rank, weight)
        barycentric.scatter_add_(1, d - rank + 1, -weight)
        barycentric[:, 0] += 1 + barycentric[:, d + 1]
        # vertex `remainder` of the simplex: rem0 + canonical[remainder, rank] on the first d coordinates (L268-271);
        # canonical[r, k] = r for k <= d - r, else r - (d + 1)
        rem0_int, rank = rem0[:, :d].long(), rank[:, :d]
        del scaled, elevated, rounded, rem0, residual, weight, wrap  # peak memory: the key sort below
        margin = 2 * d + 2  # keys and their blur neighbours (±d, ±1) stay inside the packing range
        low = rem0_int.amin(0) - margin
        spans = rem0_int.amax(0) + margin - low + 1
        strides = torch.ones(d, dtype=torch.long, device=device)
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * spans[i + 1]
        if float(spans.double().prod()) >= 2.0 ** 62:
            raise MethodError("densecrf: the lattice keys do not fit 64 bits (features too far apart); raise the "
                              "kernel widths θ")
        packed = torch.stack([((rem0_int + r - (d + 1) * (rank > d - r).long() - low) * strides).sum(1)
                              for r in range(d + 1)], 1)
        keys, offsets = torch.unique(packed.flatten(), sorted=True, return_inverse=True)
        self.num_vertices = len(keys)
        self.offsets = offsets.view(-1, d + 1)[:n].int()  # int32 indices: half the memory kept per pixel
        self.barycentric = barycentric[:n, :d + 1].contiguous()
        # blur neighbours along each of the d+1 lattice directions (L457-471): n1 = key - 1 everywhere except
        # key_j + d at j, n2 the opposite; direction d moves all d stored coordinates. Absent -> the zero row M.
        total = strides.sum()
        self.neighbours = []
        for j in range(d + 1):
            step = total - (d + 1) * strides[j] if j < d else total
            pair = []
            for candidate in (keys - step, keys + step):
                index = torch.searchsorted(keys, candidate).clamp_(max=len(keys) - 1)
                index = torch.where(keys[index] == candidate, index, len(keys))
                pair.append(torch.cat([index, index.new_full((1,), len(keys))]).int())
            self.neighbours.append(pair)
        self.alpha = float(torch.tensor(1.0 / (1.0 + 2.0 ** -d), dtype=torch.float32))  # L571

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat (N, V) values onto the lattice, blur along directions 0..d, slice back (`sseCompute`)."""
        lattice = values.new_zeros(self.num_vertices + 1, values.shape[1])  # last row: absent neighbours, stays 0
        for r in range(self.dim + 1):
            lattice.index_add_(0, self.offsets[:, r], self.barycentric[:, r, None] * values)
        for n1, n2 in self.neighbours:
            lattice = lattice + 0.5 * (lattice[n1] + lattice[n2])
        out = torch.zeros_like(values)
        for r in range(self.dim + 1):
            out += (self.barycentric[:, r, None] * self.alpha) * lattice[self.offsets[:, r]]
        return out


def pixel_features(image: torch.Tensor, theta_xy: float, theta_rgb: float | None) -> torch.Tensor:
    """(3, H, W) 0-255 RGB -> (H·W, d) row-major features: (x, y) / θxy, plus RGB / θrgb for the appearance kernel
    (`densecrf.cpp:L61-81`, x = column in pixels of this image)."""
    h, w = image.shape[-2:]
    device = image.device
    theta = torch.tensor(theta_xy, dtype=torch.float32, device=device)
    y, x = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                          torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    columns = [x.flatten() / theta, y.flatten() / theta]
    if theta_rgb is not None:
        colour = image.reshape(3, -1).float() / torch.tensor(theta_rgb, dtype=torch.float32, device=device)
        columns += list(colour)
    return torch.stack(columns, 1)


def unary_from_logits(logits: torch.Tensor, probability_clip: float | None) -> torch.Tensor:
    """(C, N) logits -> U (N, C): -log(clip(softmax, clip, 1)) as pydensecrf's `unary_from_softmax` (§9 trap 4), or
    -log_softmax without a clip."""
    if probability_clip is None:
        return -F.log_softmax(logits.float(), 0).t()
    return -torch.log(F.softmax(logits.float(), 0).clamp(probability_clip, 1.0)).t()


def mean_field(unary: torch.Tensor, kernels: Sequence[tuple[float, KernelFilter]], iterations: int,
               normalization: str = "symmetric") -> torch.Tensor:
    """`DenseCRF::inference` (densecrf.cpp:L115-131) with Potts terms: unary (N, C) -> the energies E (N, C) whose
    softmax is Q after `iterations` steps (E = -U for 0). Each kernel is (w, filter) with filter(v) = K v including
    the self term; normalised with D = K 1 as `DenseKernel` does (pairwise.cpp:L40-80): symmetric D^-½ K D^-½ or
    per pixel D^-1 K."""
    if normalization not in NORMALIZATIONS:
        raise MethodError(f"densecrf: normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    scales = []
    for _, kernel in kernels:
        norm = kernel(unary.new_ones(len(unary), 1)).double()
        scale = 1.0 / torch.sqrt(norm + 1e-20) if normalization == "symmetric" else 1.0 / (norm + 1e-20)
        scales.append(scale.to(unary.dtype))
    energy = -unary
    for _ in range(iterations):
        q = F.softmax(energy, 1)
        energy = -unary
        for (weight, kernel), scale in zip(kernels, scales, strict=True):
            filtered = kernel(q * scale) if normalization == "symmetric" else kernel(q)
            energy = energy + weight * (filtered * scale)  # Potts: minus PottsCompatibility's -w Q̃
    return energy


class FullyConnectedCRF(nn.Module):
    """Mean-field DenseCRF on full-resolution logits, one image at a time (each has its own lattices). No
    parameters."""

    def __init__(self, appearance_weight: float, theta_alpha: float, theta_beta: float, smoothness_weight: float,
                 theta_gamma: float, iterations: int, normalization: str, probability_clip: float | None) -> None:
        super().__init__()
        self.appearance_weight, self.theta_alpha, self.theta_beta = appearance_weight, theta_alpha, theta_beta
        self.smoothness_weight, self.theta_gamma = smoothness_weight, theta_gamma
        self.iterations, self.normalization, self.probability_clip = iterations, normalization, probability_clip

    def refine_one(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB 0-255 and (C, H, W) logits -> log Q (C, H, W)."""
        c, h, w = logits.shape
        unary = unary_from_logits(logits.reshape(c, -1), self.probability_clip)
        kernels = []
        # smoothness first, as pydensecrf's examples and DeepLab add them (only the float summation order differs)
        for weight, theta_xy, theta_rgb in ((self.smoothness_weight, self.theta_gamma, None),
                                            (self.appearance_weight, self.theta_alpha, self.theta_beta)):
            if weight != 0:
                kernels.append((weight, PermutohedralLattice(pixel_features(image, theta_xy, theta_rgb)).filter))
        energy = mean_field(unary, kernels, self.iterations, self.normalization)
        return F.log_softmax(energy, 1).t().reshape(c, h, w)  # log Q, finite where Q underflows

    def forward(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.refine_one(image, logit) for image, logit in zip(images, logits, strict=True)])


@register_method
class DenseCRF(BaseRefiner):
    name = "densecrf"
    description = ("DenseCRF: fully connected CRF (appearance + smoothness Gaussian Potts kernels, permutohedral "
                   "mean field) over a base method's logits at full resolution (base: in params; NeurIPS 2011); "
                   "training-free, knob iterations")
    published = {"DenseCRF": {}}
    knobs = (Knob("iterations", sweep=(10.0, 5.0, 1.0, 0.0), label="MF iterations",
                  help="mean-field steps (DeepLab 10, pydensecrf's example 5; 0: the base's softmax)"),)
    param_counts = (ParamCount("spec §1: no learnable CRF parameters", named={"refiner": 0},
                               config={"base": "global"}),)

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global", base_model: dict | None = None,
                 appearance_weight: float = 4.0, theta_alpha: float = 67.0, theta_beta: float = 3.0,
                 smoothness_weight: float = 3.0, theta_gamma: float = 1.0, iterations: int = 10,
                 normalization: str = "symmetric", probability_clip: float | None = 1e-5) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        for key, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
            if not value > 0:
                raise MethodError(f"densecrf: {key} must be > 0 (a kernel width in pixels / 0-255 intensity; "
                                  f"DeepLab-v2: 67, 3, 1), got {value}")
        if appearance_weight < 0 or smoothness_weight < 0:
            raise MethodError("densecrf: appearance_weight and smoothness_weight must be >= 0 (0 drops the kernel; "
                              f"DeepLab-v2: 4 and 3), got {appearance_weight} and {smoothness_weight}")
        if not (float(iterations) == int(iterations) and iterations >= 0):
            raise MethodError(f"densecrf: iterations must be a whole number >= 0 (DeepLab: 10), got {iterations}")
        if normalization not in NORMALIZATIONS:
            raise MethodError(f"densecrf: normalization must be one of {', '.join(NORMALIZATIONS)} (pydensecrf: "
                              f"symmetric, DeepLab's Caffe layer: per_pixel), got {normalization!r}")
        if probability_clip is not None and not 0 < probability_clip < 1:
            raise MethodError(f"densecrf: probability_clip must lie in (0, 1) (pydensecrf: 1e-5) or be null (no "
                              f"clip), got {probability_clip}")
        self.refiner = FullyConnectedCRF(float(appearance_weight), float(theta_alpha), float(theta_beta),
                                         float(smoothness_weight), float(theta_gamma), int(iterations), normalization,
                                         None if probability_clip is None else float(probability_clip))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.refiner(images, self.base.predict(images))
