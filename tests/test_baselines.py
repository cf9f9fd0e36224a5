"""The global and local baselines and the shared sliding-window machinery."""
import pytest
import timm
import torch

from methods import build_method, method_class
from methods.blocks.windows import sliding_window_logits, window_grid, window_starts

SMALL = dict(channels=16)


def test_window_starts_cover_and_end_flush():
    assert window_starts(1024, 256, 192) == [0, 192, 384, 576, 768]
    assert window_starts(1000, 256, 192) == [0, 192, 384, 576, 744]  # last window flush with the end
    assert window_starts(100, 256, 192) == [0]
    grid = window_grid(1000, 600, 256, 192)
    assert len(grid) == 5 * 3 and grid[-1] == (744, 344)


def test_window_starts_rounding_and_validation():
    # (length - window) % stride == 1: one more window is needed for the end (11 = 3 + 3 + 1 + 4)
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(10, 4, 3) == [0, 3, 6]  # exact fit: no extra window
    assert window_starts(8, 8, 4) == [0] and window_starts(5, 1, 1) == [0, 1, 2, 3, 4]  # window 1 is valid
    for window, stride in ((0, 4), (4, 0), (-1, 2), (2, -1)):
        with pytest.raises(ValueError, match=f"window and stride must be positive, got {window} and {stride}"):
            window_starts(10, window, stride)


def test_image_smaller_than_the_window_in_one_dimension_is_padded():
    images = torch.randn(1, 3, 40, 100)  # only the height is below the 64 window

    def fixed_size(crops):  # a network fed whole windows only
        assert crops.shape[-2:] == (64, 64)
        return crops

    out = sliding_window_logits(fixed_size, images, 3, window=64, stride=48)
    assert out.shape == images.shape and torch.allclose(out, images)


def test_stitching_averages_overlaps():
    images = torch.zeros(2, 3, 100, 130)

    def constant(crops):  # every window predicts ones in channel 0 and its batch index in channel 1
        out = torch.zeros(crops.shape[0], 2, *crops.shape[-2:])
        out[:, 0] = 1
        return out

    logits = sliding_window_logits(constant, images, 2, window=48, stride=32, batch=3)
    assert logits.shape == (2, 2, 100, 130)
    assert torch.equal(logits[:, 0], torch.ones(2, 100, 130))


def test_stitching_matches_position_dependent_truth():
    # windows that return the input itself must stitch back to the input exactly
    images = torch.randn(1, 3, 90, 70)
    out = sliding_window_logits(lambda crops: crops, images, 3, window=40, stride=25, batch=2)
    assert torch.allclose(out, images, atol=1e-6)


def test_small_image_is_padded_then_cropped():
    images = torch.randn(1, 3, 20, 30)
    out = sliding_window_logits(lambda crops: crops, images, 3, window=64, stride=48)
    assert out.shape == images.shape and torch.allclose(out, images)


@pytest.mark.parametrize("name", ["global", "local"])
def test_predict_returns_full_resolution_logits(name):
    cfg = dict(SMALL, window=64, overlap=16) if name == "local" else SMALL
    model = build_method(name, 7, **cfg).eval()
    images = torch.randint(0, 256, (1, 3, 160, 128), dtype=torch.uint8)
    with torch.inference_mode():
        logits = model.predict(images)
    assert logits.shape == (1, 7, 160, 128)
    assert torch.isfinite(logits).all()


def test_local_single_window_equals_plain_network():
    model = build_method("local", 5, window=64, overlap=16, **SMALL).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        direct = model._window_logits(model.normalize(images))
        assert torch.allclose(model.predict(images), direct, atol=1e-5)


def test_global_sees_downsampled_image():
    model = build_method("global", 3, downsample=4, **SMALL)
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.inference_mode():
        model.eval().predict(torch.zeros(1, 3, 256, 192, dtype=torch.uint8))
    assert seen[0][-2:] == (64, 48)


def test_backbone_is_dilated_output_stride_8():
    model = build_method("global", 3, **SMALL)
    assert model.backbone.feature_info.reduction()[-1] == 8
    stem = model.backbone.conv1  # timm resnet18d: deep stem of three 3x3 convs
    assert isinstance(stem, torch.nn.Sequential) and len([m for m in stem if isinstance(m, torch.nn.Conv2d)]) == 3


def test_forward_train_gives_named_finite_losses_with_gradients():
    model = build_method("local", 4, window=32, overlap=8, **SMALL)
    losses = model.forward_train(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                                 torch.randint(0, 4, (2, 32, 32)))
    assert set(losses) == {"loss_seg"}
    losses["loss_seg"].backward()
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0


def test_all_ignored_batch_gives_zero_loss_not_nan():
    model = build_method("global", 4, **SMALL)
    loss = model.forward_train(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.full((1, 64, 64), 255))
    assert loss["loss_seg"].item() == 0.0


def test_pretrained_weights_file_is_loaded(tmp_path):
    # a weights file in timm's layout, written by the test, stands in for the ImageNet download
    reference = timm.create_model("resnet18d", pretrained=False)
    with torch.no_grad():
        reference.conv1[0].weight.fill_(0.125)
    path = tmp_path / "resnet18d.pth"
    torch.save(reference.state_dict(), path)
    model = build_method("global", 7, pretrained=str(path), **SMALL)
    assert torch.equal(model.backbone.conv1[0].weight, reference.conv1[0].weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    from methods import MethodError

    with pytest.raises(MethodError, match="does not exist"):
        method_class("global")(7, pretrained=str(tmp_path / "absent.pth"))


def test_batch_of_one_trains():
    # the ASPP image-pool branch sees one value per channel at batch 1; plain BN would raise there
    model = build_method("global", 3, **SMALL)
    loss = model.forward_train(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8),
                               torch.randint(0, 3, (1, 64, 64)))["loss_seg"]
    loss.backward()
    assert torch.isfinite(loss)
