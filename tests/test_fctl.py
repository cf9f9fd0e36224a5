"""FCtL (methods/fctl.py): context crops, the four training phases and what each starts from, test-time augmentation,
the released-checkpoint layout and bad inputs. Parity with the official code: tests/test_golden_fctl.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from methods import MethodError, build_method
from methods.blocks.patches import PatchGrid
from methods.fctl import ContextCorrelation, FCtL, context_crops

NARROW = {"patch_size": 64, "min_overlap": 8, "width": 0.0625, "fc_channels": 16, "patch_batch": 4,
          "train_patch_batch": 2}


def narrow(**extra) -> FCtL:
    torch.manual_seed(0)
    return build_method("fctl", 3, **{**NARROW, **extra})


def test_context_crops_are_upstreams_padded_centred_pil_resized_windows():
    """global2bigpatch: pad by int(p (f - 1) / 2) black pixels, crop int(p f) at the patch's corner, PIL bilinear."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    image = torch.from_numpy(array).permute(2, 0, 1)[None].float()
    grid = PatchGrid.build(150, 170, 64, 8)
    for factor in (2.0, 3.0):
        pad, size = int(64 * (factor - 1) / 2), int(64 * factor)
        big = ImageOps.expand(Image.fromarray(array), (pad,) * 4, fill="black")
        ours = context_crops(image, grid, range(len(grid)), factor)
        for j, (top, left) in enumerate(grid.coords):
            theirs = np.asarray(big.crop((left, top, left + size, top + size)).resize((64, 64), Image.BILINEAR))
            assert torch.equal(ours[j], torch.from_numpy(theirs.copy()).permute(2, 0, 1).float()), (factor, j)


def test_correlation_starts_as_identity_and_gates_are_a_softmax():
    block = ContextCorrelation(8).eval()
    x, y, z = (torch.randn(2, 8, 5, 5) for _ in range(3))
    assert torch.equal(block(x, y), x) and torch.equal(block(x, y, z), x)  # gammas start at 0
    with torch.no_grad():
        for gamma in (block.gamma, block.gamma_1, block.gamma_2):
            gamma.fill_(1.0)
    one, two = block(x, y), block(x, y, z)
    assert not torch.allclose(one, x) and not torch.allclose(two, one)
    # with three identical terms (same convs, same source) the gate weights, positive and summing to one, give back
    # that term: the two-context output equals the one-context one
    for suffix in ("_1", "_2"):
        for kind in ("query", "key", "value"):
            getattr(block, f"conv_{kind}{suffix}").load_state_dict(getattr(block, f"conv_{kind}").state_dict())
    assert torch.allclose(block(x, x, x), block(x, x), atol=1e-5)
    assert not torch.allclose(block(x, x, x), x + 3 * (block(x, x) - x), atol=1e-3)


def test_phases_start_from_the_release_scripts_weights_once():
    model = narrow().train()
    assert [p.name for p in model.phases] == ["fcn", "medium", "large", "all"]
    assert [p.name for p in narrow(pretrain_fcn=False).phases] == ["medium", "large", "all"]
    model.set_phase("fcn")
    with torch.no_grad():
        model.main.fc7.weight.fill_(0.5)  # "training" phase fcn
    model.set_phase("medium")  # train_B10.sh --pre_path Bfcn
    assert torch.equal(model.medium.fc7.weight, model.main.fc7.weight)
    with torch.no_grad():
        model.medium.fc7.weight.fill_(0.25)
    model.set_phase("medium")  # a resumed phase keeps what it trained
    assert float(model.medium.fc7.weight.detach()[0, 0]) == 0.25
    model.set_phase("large")  # train_B15.sh starts from Bfcn too, not from B10
    assert float(model.large.fc7.weight.detach()[0, 0]) == 0.5
    model.set_phase("all")  # train.sh --pre_path B10
    assert float(model.main.fc7.weight.detach()[0, 0]) == 0.25
    assert not model.medium.training and not model.large.training and model.main.training
    model.set_phase("fcn")
    assert not model.started.any()


@pytest.mark.parametrize("phase", ["fcn", "medium", "large", "all"])
def test_each_phase_trains_its_network_only(phase):
    model = narrow().train()
    model.set_phase(phase)
    images = torch.randint(0, 256, (1, 3, 96, 80), dtype=torch.uint8)
    labels = torch.randint(0, 3, (1, 96, 80))
    loss = sum(model.forward_train(images, labels).values())
    loss.backward()
    trained = {"fcn": "main", "medium": "medium", "large": "large", "all": "main"}[phase]
    for name, p in model.named_parameters():
        got = p.grad is not None and p.grad.abs().sum() > 0
        if not name.startswith(trained):
            assert not got, name
    ids = {id(p) for p in model.phase_parameters(next(p for p in model.phases if p.name == phase))}
    assert id(model.main.upscore8.weight) not in ids  # the bilinear upsampling stays fixed
    if phase == "all":  # the two-context layers learn only here (their gammas first: they start at 0)
        assert model.main.attention.gamma_1.grad.abs().sum() > 0 and model.main.attention.gamma_2.grad is not None


def test_checkpointed_and_plain_losses_agree():
    model = narrow(dropout=0.0).train()
    model.set_phase("all")
    images = torch.randint(0, 256, (1, 3, 96, 80), dtype=torch.uint8)
    labels = torch.randint(0, 3, (1, 96, 80))
    a = model.forward_train(images, labels)["loss_focal"]
    model.grad_checkpoint = False
    b = model.forward_train(images, labels)["loss_focal"]
    assert torch.allclose(a, b)


def test_tta_averages_the_eight_views():
    model = narrow().eval()
    model.started.fill_(True)
    image = torch.randint(0, 256, (1, 3, 100, 90), dtype=torch.uint8).float()
    single = model.predict(image)
    model.tta = True
    assert len(model.views()) == 8
    views = [torch.rot90(model.stitched(torch.rot90(image.flip(-1) if f else image, k, dims=(-2, -1))), -k,
                         dims=(-2, -1)) for f, k in model.views()]
    views = [v.flip(-1) if f else v for v, (f, _) in zip(views, model.views(), strict=True)]
    assert torch.allclose(model.predict(image), torch.stack(views).mean(0), atol=1e-6)
    assert torch.allclose(views[0], single) and not torch.allclose(views[1], single)


def test_released_layout_round_trip(tmp_path):
    model = narrow().eval()
    model.save_official(str(tmp_path))
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"all.epoch.pth", "B10.epoch.pth", "B15.epoch.pth"}
    b10 = torch.load(tmp_path / "B10.epoch.pth", weights_only=True)
    assert torch.equal(b10["module.big_pool5.0.weight"], b10["module.pool5.0.weight"])  # mode 2 shares the trunk
    assert "module.output.6.weight" in b10 and "module.big_attention.gamma_2" in b10
    other = narrow()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_official(str(tmp_path))
    other.eval()
    image = torch.randint(0, 256, (1, 3, 80, 70), dtype=torch.uint8)
    model.started.fill_(True)
    assert torch.equal(other.predict(image), model.predict(image))
    assert bool(other.started.all())


def test_bad_checkpoints_name_the_file_and_the_fix(tmp_path):
    model = narrow()
    model.save_official(str(tmp_path))
    state = torch.load(tmp_path / "B15.epoch.pth", weights_only=True)
    del state["module.adj_pool3.weight"]
    torch.save(state, tmp_path / "broken_B15.pth")
    with pytest.raises(MethodError, match="broken_B15.pth.*missing.*large.score_pool3.weight") as info:
        model.load_official(str(tmp_path / "broken_B15.pth"))
    assert "\n" not in str(info.value)
    (tmp_path / "all.epoch.pth").rename(tmp_path / "weights.pth")
    with pytest.raises(MethodError, match="lacks .*all.epoch.pth"):
        model.load_official(str(tmp_path))
    with pytest.raises(MethodError, match="cannot tell which network"):
        model.load_official(str(tmp_path / "weights.pth"))
    model.load_official(str(tmp_path / "weights.pth"), network="main")


@pytest.mark.parametrize(("keywords", "message"), [
    ({"tta": 0.5}, "tta must be 0"), ({"contexts": [2.0]}, "two factors"), ({"contexts": [1.0, 3.0]}, "two factors"),
    ({"patch_batch": 0}, ">= 1"), ({"width": 0.5, "pretrained": True}, "pretrained needs")])
def test_bad_settings_are_one_line_errors(keywords, message):
    with pytest.raises(MethodError, match=message) as info:
        narrow(**keywords)
    assert "\n" not in str(info.value)
