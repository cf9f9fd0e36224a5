"""ISDNet's Table 4 rows on the generic networks: the scale variants (`half`, `quarter`) and the ISD framework on
another deep branch (`isd`, reconstructed: methods/blocks/generic.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import MethodError, build_method, method_class
from methods.blocks.isd import ISDHead
from methods.isdnet import ISDNet
from pipelines import published
from pipelines.config import ConfigError, load_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pspnet_plus_isd_is_pspnet_plus_exactly_isdnets_head():
    """The deep branch is the whole PSPNet (12,787,758, mmseg's count) and the rest is ISDNet's own head."""
    plus = build_method("pspnet-isd", 7)
    assert count(plus) == count(build_method("pspnet-global", 7)) + count(ISDNet(7).refine_head)
    assert count(plus) == 12_787_758 + 3_796_508


def test_segformer_plus_isd_projects_its_256_channels_into_the_head():
    plus = build_method("segformer-isd", 7)
    head = count(plus) - count(build_method("segformer-global", 7))
    # ISDNet's head plus the two projections from 256 instead of 128 channels: RAF's context ChannelAtt (3x3 to 128)
    # and the SR decoder's first conv (3x3 to 64)
    assert head == count(ISDNet(7).refine_head) + 128 * 128 * 9 + 128 * 64 * 9
    assert head == count(ISDHead(7, 128, deep_channels=256))


@pytest.mark.parametrize("run", ["pspnet-isd", "segformer-isd"])
def test_isd_fuses_the_networks_features_on_the_quarter_image(run):
    """predict = ISD head(full image, the network's decode features on x[..., ::4, ::4]), upsampled to input size."""
    torch.manual_seed(0)
    model = build_method(run, 7).eval()
    for m in model.modules():  # non-trivial statistics, so a wrong wiring cannot cancel out
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (1, 3, 256, 320), dtype=torch.uint8)  # MiT reduces 1/32 by 8x8 convs
    with torch.inference_mode():
        x = model.normalize(images)
        features, outputs = model.network_features(x[..., ::4, ::4])
        fused = model.isd_head(x, features)["logits"]
        expected = F.interpolate(fused, size=(256, 320), mode="bilinear", align_corners=False)
        assert torch.allclose(model.predict(images), expected, atol=1e-5)
        assert not torch.allclose(expected, F.interpolate(outputs[0], size=(256, 320), mode="bilinear"), atol=1e-2)


def test_isd_training_adds_isdnets_terms_to_the_networks_own():
    torch.manual_seed(0)
    model = build_method("pspnet-isd", 7).train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    labels = torch.randint(0, 7, (2, 64, 96))
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg", "loss_aux0", "refine.loss_seg", "aux_1.loss_seg", "aux_2.loss_seg",
                          "aux_3.recon_losses", "aux_4.fa_loss"}
    sum(terms.values()).backward()
    # every part learns: the deep network (through its CE and L_SD), the shallow STDC and the SR decoder
    for part in ("backbone", "decode_head", "auxiliary_head", "isd_head.stdc_net", "isd_head.sr_decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part + ".")]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part


def test_a_network_without_isd_features_refuses_isd_inference():
    with pytest.raises(MethodError, match="unet: inference isd needs a network that hands its features"):
        method_class("unet")(7, inference="isd")
    with pytest.raises(ConfigError, match="'isd' is not a variant of unet"):
        load_config(None, ["benchmark.networks=[unet]", "benchmark.inference=[isd]"])


def test_scale_variants_are_absolute_over_the_datasets_full_scale():
    """Cityscapes runs PSPNet at full scale (`downsample: 1`); its 1/2 and 1/4 scale rows still get 2 and 4."""
    config = load_config(None, ["benchmark.networks=[pspnet,segformer]",
                                "benchmark.inference=[global,half,quarter,isd]"])
    assert config.benchmark_methods[-8:] == [f"{n}-{v}" for n in ("pspnet", "segformer")
                                             for v in ("global", "half", "quarter", "isd")]
    model = {run: config.resolved(run, "cityscapes")["train"]["model"] for run in
             ("pspnet-global", "pspnet-half", "pspnet-quarter", "pspnet-isd")}
    assert [model[r]["downsample"] for r in model] == [1, 2, 4, 4]
    assert model["pspnet-isd"]["inference"] == "isd"
    sizes = []
    net = build_method("pspnet-half", 19, **{k: v for k, v in model["pspnet-half"].items()
                                             if k not in ("inference", "downsample")}).eval()
    next(net.backbone.children()).register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    with torch.inference_mode():
        net.predict(torch.randint(0, 256, (1, 3, 128, 256), dtype=torch.uint8))
    assert sizes == [(64, 128)]


def test_table4_rows_are_filled_by_their_variants():
    ours = {"runs": True, "rows": {(run, ()): {"headline": miou, "fps": 2.0, "memory": 100.0, "outputs": {}}
                                   for run, miou in {"pspnet-half": 61.0, "segformer-isd": 55.0}.items()}}
    table = published.published_table("paper_isdnet_cityscapes_branches", ours).set_index("method")
    mine = [c for c in table.columns if c.startswith("mIoU") and "ours" in c][0]
    assert float(table.loc["PSPNet (1/2 scale)", mine]) == 61.0
    assert float(table.loc["Segformer-b0 + ISD", mine]) == 55.0
    assert table.loc["PSPNet + ISD", mine] == "not measured (no pspnet-isd run)"
