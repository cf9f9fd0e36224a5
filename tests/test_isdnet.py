"""ISDNet against docs/specs/isdnet.md: sizes, cost, interface, losses and their gradients, the Laplacian input, RAF
init, and loading the release checkpoint layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ran_modules
from torch.utils.flop_counter import FlopCounterMode

from datasets.synthetic import generate_image
from methods.base import MethodError, build_method
from methods.blocks.isd import LaplacianPyramid, RelationAwareFusion, affinity
from methods.blocks.mmseg import mmseg_cross_entropy
from methods.isdnet import ISDNet

LOSS_KEYS = {"decode.loss_seg", "refine.loss_seg", "aux_1.loss_seg", "aux_2.loss_seg", "aux_3.recon_losses",
             "aux_4.fa_loss", "aux.loss_seg"}
TRAINING_ONLY = ("auxiliary_head", "refine_head.aux_head8", "refine_head.aux_head16", "refine_head.sr_decoder")


@pytest.fixture(scope="module")
def model() -> ISDNet:
    torch.manual_seed(0)
    return ISDNet(num_classes=7).eval()


@pytest.fixture(scope="module")
def predict_ran(model) -> set[str]:
    """Modules that execute in predict (eval, batch 1)."""
    with torch.no_grad():
        return ran_modules(model, lambda: model.predict(images(1, 64, 64)))


@pytest.fixture(scope="module")
def train_pass():
    """One forward_train (batch 2, some ignored pixels): (model, loss terms, modules that ran)."""
    torch.manual_seed(0)
    net = ISDNet(num_classes=7).train()
    labels = torch.randint(0, 7, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    labels[:, :8] = 255
    terms = {}
    ran = ran_modules(net, lambda: terms.update(net.forward_train(images(2, 64, 96), labels)))
    return net, terms, ran


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed)).float()


def test_registered():
    net = build_method("isdnet", num_classes=2)
    assert isinstance(net, ISDNet) and net.num_classes == 2
    with pytest.raises(MethodError, match="bad config"):
        build_method("isdnet", num_classes=2, not_a_kwarg=1)


def test_parameter_counts(model, predict_ran):
    # spec §2.10: 17.23 M on the inference path, 17.78 M in total (7 classes); the inference path is what runs
    total = sum(p.numel() for p in model.parameters())
    inference = {id(p): p.numel() for name, m in model.named_modules() if name in predict_ran
                 for p in m.parameters(recurse=False)}
    assert abs(total / 1e6 - 17.78) < 0.01
    assert abs(sum(inference.values()) / 1e6 - 17.23) < 0.01
    training_only = sum(p.numel() for name in TRAINING_ONLY for p in model.get_submodule(name).parameters())
    assert total - sum(inference.values()) == training_only  # 0.148 + 0.149 + 0.259 M


@pytest.mark.parametrize(("size", "gmacs"), [((2448, 2448), 238.0), ((1024, 2048), 82.9)])
def test_macs(size, gmacs):
    # spec §2.10 (torch FlopCounterMode, interpolation not counted); meta tensors make this instant
    with torch.device("meta"):
        net = ISDNet(num_classes=7).eval()
        x = torch.empty(1, 3, *size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.predict(x)
    assert abs(counter.get_total_flops() / 2e9 / gmacs - 1) < 0.02


def record_shapes(net: ISDNet, fn) -> dict[str, tuple[int, ...]]:
    """Shapes of the §2.9 tensors (minus the batch dimension) seen while fn() runs, via forward hooks."""
    shapes, handles = {}, []

    def keep(*names, index=None, pre=False):
        def hook(module, args, output=None):
            value = args[0] if pre else output
            values = [value] if index is None else [value[i] for i in index]
            for name, v in zip(names, values, strict=True):
                shapes[name] = tuple(v.shape[1:])
        return hook

    rh = net.refine_head
    handles += [net.backbone.conv1.register_forward_pre_hook(keep("deep input", pre=True)),
                net.decode_head.register_forward_hook(keep("D", "deep logits", index=(0, 1))),
                rh.laplacian.register_forward_hook(keep("H0", "H1", index=(0, 1))),
                rh.stdc_net.register_forward_pre_hook(keep("shallow input", pre=True)),
                rh.stdc_net.features[0].register_forward_hook(keep("stem 1/2")),
                rh.stdc_net.features[1].register_forward_hook(keep("stem 1/4")),
                rh.stdc_net.register_forward_hook(keep("feat8", "feat16", index=(0, 1))),
                rh.fuse16.register_forward_hook(keep("fused16", index=(2,))),
                rh.fuse8.register_forward_hook(keep("fused8", index=(2,))),
                rh.conv_seg.register_forward_hook(keep("logits")),
                rh.sr_decoder.register_forward_hook(keep("F_sr", "sr out", index=(0, 1)))]
    handles += [getattr(net.backbone, f"layer{i}").register_forward_hook(keep(f"stage{i}")) for i in range(1, 5)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return shapes


def _sq(c: int, s: int) -> tuple[int, int, int]:
    return (c, s, s)


# spec §2.9 inference table: input side -> {tensor: (C, H, W)}; the 0.8x columns where the table lists them
SPEC_SHAPES = {
    (2448, 7): {"deep input": _sq(3, 612), "stage1": _sq(64, 153), "stage2": _sq(128, 77), "stage3": _sq(256, 77),
                "stage4": _sq(512, 77), "D": _sq(128, 77), "deep logits": _sq(7, 77), "H0": _sq(3, 2448),
                "H1": _sq(3, 1224), "shallow input": _sq(6, 2448), "stem 1/2": _sq(32, 1224),
                "stem 1/4": _sq(64, 612), "feat8": _sq(256, 306), "feat16": _sq(512, 153), "fused16": _sq(128, 153),
                "fused8": _sq(128, 306), "logits": _sq(7, 306), "output": _sq(7, 2448)},
    (5000, 2): {"deep input": _sq(3, 1250), "stage1": _sq(64, 313), "stage2": _sq(128, 157),
                "stage3": _sq(256, 157), "stage4": _sq(512, 157), "D": _sq(128, 157), "deep logits": _sq(2, 157),
                "H0": _sq(3, 5000), "H1": _sq(3, 2500), "shallow input": _sq(6, 5000), "stem 1/2": _sq(32, 2500),
                "stem 1/4": _sq(64, 1250), "feat8": _sq(256, 625), "feat16": _sq(512, 313), "fused16": _sq(128, 313),
                "fused8": _sq(128, 625), "logits": _sq(2, 625), "output": _sq(2, 5000)},
    (1958, 7): {"deep input": _sq(3, 489), "stage3": _sq(256, 62), "stage4": _sq(512, 62), "D": _sq(128, 62),
                "deep logits": _sq(7, 62), "shallow input": _sq(6, 1958), "feat8": _sq(256, 245),
                "feat16": _sq(512, 123)},
    (4000, 2): {"deep input": _sq(3, 1000), "stage3": _sq(256, 125), "stage4": _sq(512, 125), "D": _sq(128, 125),
                "deep logits": _sq(2, 125), "shallow input": _sq(6, 4000), "feat8": _sq(256, 500),
                "feat16": _sq(512, 250)},
}


@pytest.mark.parametrize(("side", "num_classes"), list(SPEC_SHAPES))
def test_inference_shapes_match_spec(side, num_classes):
    # spec §2.9, batch 1, on the meta device (no memory, no compute)
    with torch.device("meta"):
        net = ISDNet(num_classes=num_classes).eval()
        x = torch.empty(1, 3, side, side)
    out = {}
    shapes = record_shapes(net, lambda: out.update(output=net.predict(x)))
    shapes["output"] = tuple(out["output"].shape[1:])
    expected = SPEC_SHAPES[(side, num_classes)]
    assert {k: shapes[k] for k in expected} == expected
    assert "F_sr" not in shapes  # the SR decoder is training-only


@pytest.mark.parametrize(("side", "batch", "num_classes", "expected"), [
    # spec §2.9 training crops: DeepGlobe 1224^2 (B=2), Inria 2000^2 (B=1)
    (1224, 2, 7, {"deep input": _sq(3, 306), "D": _sq(128, 39), "feat8": _sq(256, 153), "feat16": _sq(512, 77),
                  "logits": _sq(7, 153), "F_sr": _sq(128, 624), "sr out": _sq(3, 624)}),
    (2000, 1, 2, {"deep input": _sq(3, 500), "D": _sq(128, 63), "feat8": _sq(256, 250), "feat16": _sq(512, 125),
                  "F_sr": _sq(128, 1008)}),
])
def test_training_shapes_match_spec(side, batch, num_classes, expected):
    # the network part of forward_train (the losses need real tensors: autocast has no meta device)
    with torch.device("meta"):
        net = ISDNet(num_classes=num_classes).train()
        x = net.normalize(torch.empty(batch, 3, side, side))

    def train_forward():
        stages, deep_feat, _ = net._deep(x)
        net.auxiliary_head(stages[2])
        out = net.refine_head(x, deep_feat, train=True)
        assert out["sr_target"].shape == (batch, 3, side, side)  # H0 + up(H1), the MSE target
        assert out["aux8"].shape[-1] == side // 8 and out["aux16"].shape[-1] == -(-side // 16)

    shapes = record_shapes(net, train_forward)
    assert {k: shapes[k] for k in expected} == expected


@pytest.mark.slow
def test_predict_2448_cpu(model):
    # a real full-size DeepGlobe forward on the CPU (eval, batch 1, uint8 input), spec §2.9 / §5
    x = torch.randint(0, 256, (1, 3, 2448, 2448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model.predict(x)
    assert logits.shape == (1, 7, 2448, 2448) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(256, 256), (90, 126)])
def test_predict_batch1_cpu(model, size):
    with torch.no_grad():
        logits = model.predict(images(1, *size))
    assert logits.shape == (1, 7, *size) and torch.isfinite(logits).all()


def test_training_only_modules_skip_predict(predict_ran, train_pass):
    assert not any(name in predict_ran for name in TRAINING_ONLY)
    assert "decode_head.classifier" in predict_ran  # the deep classifier runs at inference, as upstream (§2.1)
    assert all(name in train_pass[2] for name in TRAINING_ONLY)


def test_forward_train_terms(train_pass):
    terms = train_pass[1]
    assert set(terms) == LOSS_KEYS
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())


def test_short_synthetic_run_lowers_the_loss():
    # 30 AdamW steps (lr 1e-3) on one fixed synthetic batch of two 128^2 images: every term finite at every step,
    # and the total falls (mean of the last 5 steps < 0.8 x mean of the first 5)
    torch.manual_seed(0)
    pairs = [generate_image(128, 0, i) for i in range(2)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    net = ISDNet(num_classes=7).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=True)
    totals, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add OpenMP contention on a shared CPU (~10x slower)
    try:
        for step in range(30):
            terms = net.forward_train(x, y)
            bad = [k for k, t in terms.items() if not torch.isfinite(t)]
            assert set(terms) == LOSS_KEYS and not bad, f"step {step}: non-finite {bad}"
            total = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            totals.append(total.item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(totals[-5:]) < 0.8 * np.mean(totals[:5]), totals


def test_forward_train_batch1():
    # upstream's plain BN raises on the pooled (1, C, 1, 1) attention vectors at batch 1 (§9.3); ours does not
    net = ISDNet(num_classes=7).train()
    terms = net.forward_train(images(1, 64, 64), torch.randint(0, 7, (1, 64, 64)))
    assert set(terms) == LOSS_KEYS and all(torch.isfinite(t) for t in terms.values())


def _grad_norms(net, loss, prefixes) -> dict[str, float]:
    named = [(n, p) for n, p in net.named_parameters() if n.startswith(prefixes)]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    out = dict.fromkeys(prefixes, 0.0)
    for (name, _), g in zip(named, grads, strict=True):
        if g is not None:
            out[next(p for p in prefixes if name.startswith(p))] += g.abs().sum().item()
    return out


def test_loss_gradients_reach_the_right_modules(train_pass):
    net, terms, _ = train_pass
    groups = ("backbone.layer3", "backbone.layer4", "decode_head.bottleneck", "auxiliary_head",
              "refine_head.stdc_net", "refine_head.fuse8.smooth", "refine_head.conv_seg", "refine_head.aux_head8",
              "refine_head.sr_decoder")
    g = {key: _grad_norms(net, terms[key], groups) for key in terms}
    # structure distillation: deep branch only; the SR side is detached (§3)
    assert g["aux_4.fa_loss"]["decode_head.bottleneck"] > 0 and g["aux_4.fa_loss"]["backbone.layer4"] > 0
    assert g["aux_4.fa_loss"]["refine_head.sr_decoder"] == 0 and g["aux_4.fa_loss"]["refine_head.stdc_net"] == 0
    # reconstruction trains the SR decoder and, through D, the deep branch; not the shallow branch
    assert g["aux_3.recon_losses"]["refine_head.sr_decoder"] > 0 and g["aux_3.recon_losses"]["backbone.layer4"] > 0
    assert g["aux_3.recon_losses"]["refine_head.stdc_net"] == 0
    # final CE: shallow branch, fusion, seg head and the deep branch (through D); no training-only heads
    final = g["refine.loss_seg"]
    assert all(final[k] > 0 for k in ("refine_head.stdc_net", "refine_head.fuse8.smooth", "refine_head.conv_seg",
                                      "decode_head.bottleneck", "backbone.layer4"))
    assert final["refine_head.sr_decoder"] == 0 and final["refine_head.aux_head8"] == 0
    # FCN auxiliary on layer3: layer3 and its head, not layer4
    aux = g["aux.loss_seg"]
    assert aux["auxiliary_head"] > 0 and aux["backbone.layer3"] > 0 and aux["backbone.layer4"] == 0
    assert g["aux_1.loss_seg"]["refine_head.aux_head8"] > 0 and g["aux_1.loss_seg"]["refine_head.conv_seg"] == 0
    # every parameter is in the training graph (DDP with find_unused_parameters=False, as upstream)
    sum(terms.values()).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_cross_entropy_counts_ignored_pixels():
    # mmseg 0.16: ignored pixels contribute 0 but count in the mean (§3)
    logits = torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[:, :4] = 255
    valid_mean = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(mmseg_cross_entropy(logits, labels), valid_mean * 0.5)


def _reference_pyramid(img: np.ndarray) -> list[np.ndarray]:
    """Loop-by-loop numpy version of §2.3 for one (H, W) channel."""
    k1 = np.array([1, 4, 6, 4, 1], dtype=np.float64)
    kernel = np.outer(k1, k1) / 256.0

    def blur(x, gain=1.0):
        p = np.pad(x, 2, mode="reflect")
        return np.array([[np.sum(p[i:i + 5, j:j + 5] * kernel * gain) for j in range(x.shape[1])]
                         for i in range(x.shape[0])])

    def nearest(x, shape):
        rows = (np.arange(shape[0]) * x.shape[0] / shape[0]).astype(int)
        cols = (np.arange(shape[1]) * x.shape[1] / shape[1]).astype(int)
        return x[rows][:, cols]

    residuals, current = [], img
    for _ in range(2):
        down = blur(current)[::2, ::2]
        up = np.zeros((2 * down.shape[0], 2 * down.shape[1]))
        up[::2, ::2] = down
        up = blur(up, 4.0)
        if up.shape != current.shape:
            up = nearest(up, current.shape)
        residuals.append(current - up)
        current = down
    return residuals


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_laplacian_pyramid_matches_reference(size):
    img = torch.randn(1, 3, *size, dtype=torch.float64)
    residuals = LaplacianPyramid(levels=2).double()(img)
    for c in range(3):
        for ours, ref in zip(residuals, _reference_pyramid(img[0, c].numpy()), strict=True):
            np.testing.assert_allclose(ours[0, c].numpy(), ref, atol=1e-12)
    # the binomial kernel reproduces a constant image exactly (reflect padding): no high frequencies
    flat = LaplacianPyramid()(torch.full((1, 3, 16, 16), 2.5))
    assert all(r.abs().max() < 1e-6 for r in flat)
    # centre tap of the 5x5 binomial kernel: 36/256
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1.0
    assert LaplacianPyramid().blur(impulse)[0, 0, 4, 4].item() == pytest.approx(36 / 256)
    assert "kernel" not in LaplacianPyramid().state_dict()  # a non-persistent buffer, follows .to(device)


def _upstream_expand(x: torch.Tensor, size) -> torch.Tensor:
    """§2.3 upsampling written out independently: zero insertion at (even, even), 5x5 binomial x4 after reflect
    padding 2, then the nearest resize to `size` when the sizes differ (odd inputs)."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    kernel = (torch.outer(taps, taps) / 64.0).expand(c, 1, 5, 5)  # 4 x /256
    up = F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)
    return F.interpolate(up, size=size, mode="nearest") if up.shape[-2:] != tuple(size) else up


@pytest.mark.parametrize("size", [(64, 96), (61, 75), (34, 33)])
def test_laplacian_pyramid_reconstructs_its_input(model, size):
    # §2.3 on the normalised image: I0 = H0 + U(D1), D1 = H1 + U(D2); the low-pass D2 is what forward() drops
    h, w = size
    rgb = np.stack([generate_image(max(size), 0, i)[0][:h, :w] for i in range(2)])
    x = model.normalize(torch.from_numpy(rgb).permute(0, 3, 1, 2))
    pyramid = model.refine_head.laplacian
    (h0, h1), low = pyramid.decompose(x)
    assert h0.shape == x.shape and h1.shape[-2:] == ((h + 1) // 2, (w + 1) // 2)
    assert low.shape[-2:] == (((h + 1) // 2 + 1) // 2, ((w + 1) // 2 + 1) // 2)
    assert all(torch.equal(a, b) for a, b in zip(pyramid(x), (h0, h1), strict=True))  # forward == residuals
    assert h0.abs().max() > 0.1 and h1.abs().max() > 0.1  # non-trivial residuals
    d1 = h1 + _upstream_expand(low, h1.shape[-2:])
    rebuilt = h0 + _upstream_expand(d1, h0.shape[-2:])
    torch.testing.assert_close(rebuilt, x, atol=1e-5, rtol=0)
    # the documented recipe in LaplacianPyramid.decompose gives the same
    current = low
    for r in (h1, h0):
        current = r + pyramid.expand(current, r.shape[-2:])
    torch.testing.assert_close(current, x, atol=1e-5, rtol=0)


def test_raf_gates_start_at_zero():
    torch.manual_seed(0)
    raf = RelationAwareFusion(128, 256).eval()
    assert raf.g1.item() == 0 and raf.g2.item() == 0
    spatial, context = torch.randn(2, 256, 16, 16), torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        s, c, out = raf(spatial, context)
        # documented init behaviour: plain per-branch channel attention, the relation MLPs have no effect
        s_feat, s_att = raf.spatial_att(spatial)
        c_feat, c_att = raf.context_att(context)
        c_exp = raf.context_head(F.interpolate(c_feat * torch.sigmoid(c_att), size=(16, 16), mode="bilinear",
                                               align_corners=False))
        s_exp = s_feat * torch.sigmoid(s_att)
        assert torch.allclose(s, s_exp) and torch.allclose(c, c_exp)
        assert torch.allclose(out, raf.smooth(s_exp + c_exp))
        for mlp in (raf.spatial_mlp, raf.context_mlp):
            for p in mlp.parameters():
                p.mul_(10.0)
        assert torch.equal(raf(spatial, context)[2], out)
        raf.g1.fill_(1.0)
        assert not torch.allclose(raf(spatial, context)[2], out)


def test_affinity_normalises_each_channel_over_space():
    x = torch.rand(2, 4, 5, 6) + 0.1
    scaled = x * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1)  # per-channel scale: no effect
    assert torch.allclose(affinity(x), affinity(scaled), atol=1e-5)
    assert affinity(x).shape == (2, 30, 30)


# -- release checkpoint layout (§8) -------------------------------------------------------------------------------
# our key prefix -> the release's; written out here independently of methods.isdnet
TO_RELEASE = [("backbone.conv1.", "backbone.stem."), ("backbone.bn1.", "backbone.stem.7."),
              ("decode_head.image_pool.1.", "decode_head.image_pool.1.conv."),
              ("decode_head.image_pool.2.", "decode_head.image_pool.1.bn."),
              ("decode_head.aspp.", "decode_head.aspp_modules."), ("decode_head.classifier.", "decode_head.conv_seg."),
              ("auxiliary_head.classifier.", "auxiliary_head.conv_seg."),
              ("refine_head.aux_head8.", "refine_head.conv_seg_aux_16."),
              ("refine_head.aux_head16.", "refine_head.conv_seg_aux_8.")]
STDC_ALIAS = {0: "x2.0.0", 1: "x4.0.1", 2: "x8.0.2", 3: "x8.0.3", 4: "x16.0.4", 5: "x16.0.5"}


def release_state(net: ISDNet) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("refine_head.stdc_net.features."):
            block, rest = key.split(".", 4)[3:]
            out[f"refine_head.stdc_net.{STDC_ALIAS[int(block)]}.{rest}"] = value.clone()
        for ours, theirs in TO_RELEASE:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = value.clone()
    return out


def test_load_official_reproduces_source_logits(tmp_path):
    torch.manual_seed(1)
    source = ISDNet(num_classes=7)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
        source.refine_head.fuse8.g1.fill_(0.5)
        source.refine_head.conv_seg.conv_out.weight.normal_(0, 0.3)
    source.eval()
    path = tmp_path / "deepglobe.pth"
    state = release_state(source)
    assert "backbone.stem.7.running_var" in state and "refine_head.stdc_net.x8.0.3.conv_list.0.bn.bias" in state
    torch.save({"meta": {"CLASSES": list("0123456")}, "state_dict": state}, path)

    torch.manual_seed(2)
    target = ISDNet(num_classes=7).eval()
    report = target.load_official(str(path))
    assert report.clean and len(report.loaded) == len(source.state_dict())
    x = images(1, 64, 96)
    with torch.no_grad():
        assert torch.equal(target.predict(x), source.predict(x))

    # a missing key is named; nothing is loaded in strict mode; strict=False loads the rest and reports it
    del state["refine_head.fuse8.g1"]
    state["decode_head.aspp_modules.1.conv.bias"] = torch.zeros(128)  # the release's known ASPP mismatch (§8)
    torch.save({"state_dict": state}, path)
    fresh = ISDNet(num_classes=7)
    before = fresh.refine_head.fuse16.smooth.conv.weight.clone()
    with pytest.raises(MethodError, match=r"refine_head\.fuse8\.g1"):
        fresh.load_official(str(path))
    assert torch.equal(fresh.refine_head.fuse16.smooth.conv.weight, before)
    report = fresh.load_official(str(path), strict=False)
    assert report.missing == ["refine_head.fuse8.g1"]
    assert report.unexpected == ["decode_head.aspp.1.conv.bias"]
    assert torch.equal(fresh.refine_head.fuse16.smooth.conv.weight, source.refine_head.fuse16.smooth.conv.weight)


def test_backbone_and_stdc_weights_from_files(tmp_path):
    # deep backbone from an mmcv ResNetV1c file (stem.*, fc.*), STDC from an official-layout file
    donor = ISDNet(num_classes=2)
    v1c = {k.replace("backbone.", ""): v for k, v in release_state(donor).items() if k.startswith("backbone.")}
    v1c.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save({"state_dict": v1c}, tmp_path / "resnet18_v1c.pth")
    stdc = {k.replace("refine_head.stdc_net.", ""): v for k, v in donor.state_dict().items()
            if k.startswith("refine_head.stdc_net.")}
    stdc["features.0.conv.weight"] = stdc["features.0.conv.weight"][:, :3].clone()  # the RGB ImageNet conv
    torch.save({"state_dict": stdc}, tmp_path / "stdc.tar")
    net = ISDNet(num_classes=2, pretrained=str(tmp_path / "resnet18_v1c.pth"),
                 stdc_pretrained=str(tmp_path / "stdc.tar"))
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    first = net.refine_head.stdc_net.features[0].conv.weight
    assert torch.equal(first, torch.cat([stdc["features.0.conv.weight"]] * 2, dim=1))
    with pytest.raises(MethodError, match="does not exist"):
        ISDNet(num_classes=2, stdc_pretrained=str(tmp_path / "absent.tar"))


def test_torchvision_stem_substitute():
    # spec §9.3: without V1c ImageNet weights, torchvision ResNet-18 (7x7 stem) is the documented substitute
    net = ISDNet(num_classes=2, deep_stem=False)
    assert net.backbone.conv1.kernel_size == (7, 7)
    assert net.backbone.layer4[0].conv2.dilation == (1, 1) and net.backbone.layer4[1].conv1.dilation == (4, 4)


def test_loss_weights_are_the_specs():
    """§3 loss table: every term recomputed unweighted from the same forward pass (eval mode: no dropout, fixed BN),
    then weighted by hand with the spec's constants (aux 0.4, reconstruction 0.1, the rest 1.0)."""
    from methods.blocks.isd import feature_affinity_loss, reconstruction_loss

    torch.manual_seed(0)
    net = ISDNet(num_classes=7).eval()
    x_img = images(2, 64, 96)
    labels = torch.randint(0, 7, (2, 64, 96), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    with torch.no_grad():
        terms = net.forward_train(x_img, labels)
        x = net.normalize(x_img)
        stages, deep_feat, deep_logits = net._deep(x)
        out = net.refine_head(x, deep_feat, train=True)

        def ce(logits):
            return mmseg_cross_entropy(logits, labels=labels, ignore_index=255)

        expected = {"decode.loss_seg": ce(deep_logits), "refine.loss_seg": ce(out["logits"]),
                    "aux_1.loss_seg": ce(out["aux8"]), "aux_2.loss_seg": ce(out["aux16"]),
                    "aux_3.recon_losses": 0.1 * reconstruction_loss(out["sr_out"], out["sr_target"]),
                    "aux_4.fa_loss": 1.0 * feature_affinity_loss(deep_feat, out["sr_feat"]),
                    "aux.loss_seg": 0.4 * ce(net.auxiliary_head(stages[2]))}
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-6), key
        assert value.item() > 0, key


def test_laplacian_residuals_stay_float32_under_bf16_autocast():
    """The smoke recipes train under bf16 autocast; the Laplacian residuals (the shallow branch's input and the SR
    target) are differences of nearly equal images and must not be rounded to bfloat16 first."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 80)
    pyramid = LaplacianPyramid(levels=2)
    exact = pyramid(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pyramid(image)
    assert all(m.dtype == torch.float32 and torch.equal(m, e) for m, e in zip(mixed, exact, strict=True))
