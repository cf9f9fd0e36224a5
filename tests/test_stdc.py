"""STDC trunk: structure, and loading the official ImageNet STDC1 file layout (`STDCNet813M_73.91.tar`)."""
from __future__ import annotations

import pytest
import torch

from methods.base import MethodError
from methods.blocks.stdc import STDCNet, load_stdc_pretrained, stdc_state_dict

# block index -> the official alias prefix of the same module (STDCNet813 registers x2/x4/x8/x16/x32 as
# nn.Sequential(features[a:b]), so block i also appears as `x<stride>.0.<i>.*`)
ALIASES = {0: "x2.0.0.", 1: "x4.0.1.", 2: "x8.0.2.", 3: "x8.0.3.", 4: "x16.0.4.", 5: "x16.0.5.", 6: "x32.0.6.",
           7: "x32.0.7."}


def official_stdc1_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full STDCNet813 ImageNet state dict as the official file lays it out: features.0-7 (random values), their
    x2..x32 aliases, and the classifier (conv_last, fc, bn, linear)."""
    torch.manual_seed(seed)
    net = STDCNet(3, layers=(2, 2, 2), out_strides=(32,))
    state = {}
    for key, value in net.state_dict().items():
        value = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value
        state[key] = value
        block = int(key.split(".")[1])
        state[ALIASES[block] + key.split(".", 2)[2]] = value.clone()
    state.update({"conv_last.conv.weight": torch.randn(1024, 1024, 1, 1), "conv_last.bn.weight": torch.ones(1024),
                  "fc.weight": torch.randn(1024, 1024), "bn.weight": torch.ones(1024),
                  "linear.weight": torch.randn(1000, 1024)})
    return state


def test_stdc1_structure():
    net = STDCNet(3, layers=(2, 2, 2), out_strides=(2, 4, 8, 16, 32)).eval()
    outs = net(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 32, 32), (64, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    assert net.channels == (32, 64, 256, 512, 1024)


def test_isdnet_shallow_trunk():
    # spec §2.4 / §2.10: STDC1 stem + stages 3-4 on 6 channels, 1.279 M parameters, (feat8, feat16)
    net = STDCNet(6, layers=(2, 2), out_strides=(8, 16)).eval()
    assert sum(p.numel() for p in net.parameters()) == 1_278_976
    feat8, feat16 = net(torch.randn(2, 6, 96, 128))
    assert feat8.shape == (2, 256, 12, 16) and feat16.shape == (2, 512, 6, 8)
    assert not any(k.startswith("x") for k in net.state_dict())  # no duplicated alias keys of our own


@pytest.mark.parametrize("wrap", ["state_dict", "module_state_dict"])
def test_load_official_layout_widens_first_conv(tmp_path, wrap):
    official = official_stdc1_state()
    state = {f"module.{k}": v for k, v in official.items()} if wrap == "module_state_dict" else official
    path = tmp_path / "STDCNet813M_73.91.tar"
    torch.save({"state_dict": state, "epoch": 300}, path)

    net = STDCNet(6, layers=(2, 2))
    unused = load_stdc_pretrained(net, str(path))
    assert unused == ["features.6", "features.7"]
    loaded = net.state_dict()
    w = official["features.0.conv.weight"]
    # upstream ShallowNet.init_weight: torch.cat([v, v], dim=1), no rescale
    assert torch.equal(loaded["features.0.conv.weight"], torch.cat([w, w], dim=1))
    for key, value in loaded.items():
        if key != "features.0.conv.weight":
            assert torch.equal(value, official[key]), key


def test_load_rgb_trunk_keeps_first_conv(tmp_path):
    # RUE feeds RGB patches: the first conv loads unchanged
    official = official_stdc1_state()
    path = tmp_path / "stdc.tar"
    torch.save({"state_dict": official}, path)
    net = STDCNet(3, layers=(2, 2))
    load_stdc_pretrained(net, str(path))
    assert torch.equal(net.state_dict()["features.0.conv.weight"], official["features.0.conv.weight"])


def test_aliases_alone_are_enough():
    official = official_stdc1_state()
    only_aliases = {k: v for k, v in official.items() if not k.startswith("features.")}
    folded = stdc_state_dict(only_aliases)
    assert torch.equal(folded["features.3.conv_list.1.conv.weight"], official["features.3.conv_list.1.conv.weight"])


def test_missing_key_is_named(tmp_path):
    official = official_stdc1_state()
    for key in [k for k in official if ".4.avd_layer.1.running_var" in k]:
        del official[key]
    path = tmp_path / "stdc.tar"
    torch.save({"state_dict": official}, path)
    with pytest.raises(MethodError, match=r"features\.4\.avd_layer\.1\.running_var"):
        load_stdc_pretrained(STDCNet(6, layers=(2, 2)), str(path))


def test_inconsistent_alias_and_foreign_keys_raise():
    official = official_stdc1_state()
    official["x8.0.2.conv_list.0.conv.weight"] = official["x8.0.2.conv_list.0.conv.weight"] + 1
    with pytest.raises(MethodError, match="alias"):
        stdc_state_dict(official)
    with pytest.raises(MethodError, match="backbone.layer1"):
        stdc_state_dict({"backbone.layer1.0.conv1.weight": torch.zeros(1)})
