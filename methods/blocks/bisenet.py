"""What BiSeNetV1 and BiSeNetV2 (`methods/bisenetv1.py`, `methods/bisenetv2.py`) share: mmseg 0.30's
`EncoderDecoder` with an `FCNHead` decode head and `FCNHead` auxiliary heads over the backbone's outputs, in the
mmseg checkpoint layout, and the ConvModule that follows a global pooling.

Module names mirror mmseg's (`backbone`, `decode_head`, `auxiliary_head.<i>`, mmcv ConvModule `.conv` / `.bn`), so
the checkpoint mapping is one rename: the shared `FCNHead`'s `classifier` is mmseg's `conv_seg`.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from methods.base import LoadReport
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter
from methods.blocks.heads import FCNHead, SampleSafeBatchNorm2d
from methods.blocks.mmseg import init_conv_modules, init_conv_seg, map_official_keys, mmseg_cross_entropy, official_keys


def pooled_conv_bn(in_channels: int, out_channels: int, act: bool = True) -> nn.Sequential:
    """mmcv ConvModule (1x1 conv without bias, BN, optional ReLU) applied to a globally pooled map. Its BN uses the
    running statistics when a training batch holds one value per channel (batch size 1), where mmseg's BN raises;
    otherwise, and in the state-dict layout (`conv`, `bn`), it is the ConvModule."""
    layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         bn=SampleSafeBatchNorm2d(out_channels))
    if act:
        layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class FCNHeadsSegmenter(GenericSegmenter):
    """mmseg `EncoderDecoder`: `backbone(x)` returns a list of feature maps; `decode_head` (FCNHead on output 0)
    gives the logits, each `auxiliary_head.<i>` (FCNHead on output `aux_inputs[i]`) an auxiliary prediction for
    training. Heads are initialised as mmseg's (ConvModule kaiming fan_out, `conv_seg` N(0, 0.01)), dropout 0.1."""
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30's CrossEntropyLoss (mean over all pixels)

    def __init__(self, num_classes: int, backbone: nn.Module, decode: tuple[int, int, int],
                 aux: tuple[tuple[int, int, int, int], ...], **kwargs) -> None:
        """`decode` = (in_channels, channels, num_convs); `aux` = one (in_index, in_channels, channels, num_convs)
        per auxiliary head, in the config's order."""
        super().__init__(num_classes, **kwargs)
        self.backbone = backbone
        self.decode_head = FCNHead(decode[0], decode[1], num_classes, num_convs=decode[2])
        self.auxiliary_head = nn.ModuleList(FCNHead(c_in, ch, num_classes, num_convs=n) for _, c_in, ch, n in aux)
        self.aux_inputs = tuple(index for index, *_ in aux)
        for head in (self.decode_head, *self.auxiliary_head):
            init_conv_modules(head)
            init_conv_seg(head.classifier)

    def network_outputs(self, x):
        feats = self.backbone(x)
        outputs = [self.decode_head(feats[0])]
        if self.training:  # the auxiliary heads only shape training
            outputs += [head(feats[i]) for head, i in zip(self.auxiliary_head, self.aux_inputs, strict=True)]
        return outputs

    def _renames(self) -> tuple[tuple[str, str], ...]:
        """mmseg key prefix -> ours."""
        heads = ["decode_head."] + [f"auxiliary_head.{i}." for i in range(len(self.auxiliary_head))]
        return tuple((f"{h}conv_seg.", f"{h}classifier.") for h in heads)

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg 0.30 checkpoint of the config (`{"state_dict": {backbone.*, decode_head.*, auxiliary_head.*}}`,
        or the bare state dict). With `strict`, any missing, unexpected or mis-shaped key raises MethodError."""
        return self.load_mapped_state(map_official_keys(read_state_dict(path), self._renames())[0], path, strict)

    def save_official(self, path: str) -> None:
        """This model in the mmseg layout `load_official` reads (and mmseg's `load_checkpoint` loads)."""
        import torch

        torch.save({"state_dict": official_keys(self.state_dict(), self._renames())}, path)
