"""ISDNet (Guo et al., CVPR 2022): a deep branch on the 4x-downsampled image and a shallow STDC branch on the
full-resolution Laplacian residuals, fused by Relation-Aware Fusion (RAF). Clean-room re-implementation of the
official release `cedricgsh/ISDNet` as specified in `docs/specs/isdnet.md` ("§" below refers to that file).

Module names follow the release (`backbone`, `decode_head`, `auxiliary_head`, `refine_head.{stdc_net, fuse16,
fuse8, conv_seg, sr_decoder}`) so `load_official` is a short list of renames; the two auxiliary heads get their
correct names (upstream `conv_seg_aux_16` runs at 1/8 and `conv_seg_aux_8` at 1/16, §2.6, §9.1 #8).

Ablations (paper Tables 5-7, `ISDNet.ablations`, `bench.py ablation --method isdnet`). The official code has only
the full model, so the switches below are OUR reading of the paper's text; the defaults build exactly the full
model (same modules, keys and outputs).
- `branches` ("both" | "deep" | "shallow", Table 5 D / S): deep only predicts the deep ASPP logits upsampled to the
  input size and trains decode CE + the FCN auxiliary (no refine head is built). Shallow only (our choice): the STDC
  trunk alone, its 1/8 features projected to 128 ch by a ConvBNReLU 3x3 (`refine_head.project8`, like RAF's own
  projection) into the usual `conv_seg`, and an auxiliary SegmentationHead directly on the 1/16 features
  (`refine_head.aux_head16`, 512 -> 64 -> classes). Keywords of a branch that is not built have no effect.
- scales (Table 5 input): the deep branch sees the image at 1/`down_ratio` (4 = 1/4, 1 = full); `shallow_scale`
  (1.0 = full, 0.25 = 1/4) bilinearly resizes the shallow branch's input; predictions are upsampled to input size.
- `shallow_input` (Table 7 H): "laplacian" = the 6-channel cat[H0, up(H1)]; "rgb" = the normalised RGB image
  (STDC `in_channels=3`). The SR target H0 + up(H1) always comes from the full-size image's Laplacian pyramid.
- RAF (Table 6): `channel_weights` (CW) = the sigmoid channel gates on both branches (without them the ChannelAtt
  projections are kept, the attention convs are neither built nor run); `relation` lists the gates that get the
  relation-MLP term: "shallow" = M_s (`g1 * relu(spatial_mlp(relation))` in the spatial gate), "deep" = M_d (the
  same with `g2`, `context_mlp` in the context gate); it needs CW. `fusion`: "add" = smooth(s' + head(up(c'))) as
  upstream; "cat" (our choice) = smooth(ConvBNReLU 1x1 (2C -> C)(cat[s', head(up(c'))])), ADD + CW being BiSeNet's
  ARM and CAT + CW its FFM as the paper says.
- losses (Table 7): `recon_weight` = L_SR, `fa_weight` = L_SD. At 0 the term is not returned; with both at 0 the SR
  decoder is neither built nor run (so nothing untrained sits in the model and DDP needs no unused-parameter
  search). L_SD distils the SR decoder's features, which only L_SR trains, so fa_weight > 0 needs recon_weight > 0;
  both need the deep branch. L_AUX (aux heads + FCN auxiliary head) is on in every configuration.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from methods.base import Ablation, LoadReport, MethodError, ParamCount, UHRMethod, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.heads import ASPPHead, FCNHead
from methods.blocks.isd import FUSIONS, RELATIONS, ISDHead, isd_loss_terms
from methods.blocks.mmseg import (
    ASPP_HEAD_RENAMES,
    RESNET_V1C_RENAMES,
    init_conv_modules,
    init_conv_seg,
    map_official_keys,
    mmseg_cross_entropy,
    official_keys,
)
from methods.blocks.stdc import init_stdc, load_stdc_pretrained

# ---------------------------------------------------------------------------------------------------------------
# official checkpoint layout (§8)

# (release prefix, our prefix); first match wins
_OFFICIAL_RENAMES = (
    *RESNET_V1C_RENAMES, *ASPP_HEAD_RENAMES,
    ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."),
    ("refine_head.conv_seg_aux_16.", "refine_head.aux_head8."),
    ("refine_head.conv_seg_aux_8.", "refine_head.aux_head16."),
)


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release keys -> our keys (§8)."""
    return map_official_keys(state, _OFFICIAL_RENAMES)[0]


# ---------------------------------------------------------------------------------------------------------------
# the method

BRANCHES = ("both", "deep", "shallow")
SHALLOW_INPUTS = ("laplacian", "rgb")


def check_ablation_keywords(branches: str, shallow_input: str, shallow_scale: float, fusion: str,
                            channel_weights: bool, relation: Sequence[str], recon_weight: float,
                            fa_weight: float) -> tuple[str, ...]:
    """One-line MethodErrors for the ablation keywords (module docstring), before anything is built; returns
    `relation` as a tuple in canonical order."""

    def choice(key: str, value: object, options: tuple[str, ...]) -> None:
        if value not in options:
            raise MethodError(f"isdnet: {key} must be one of {', '.join(options)}, got {value!r}")

    choice("branches", branches, BRANCHES)
    choice("shallow_input", shallow_input, SHALLOW_INPUTS)
    choice("fusion", fusion, FUSIONS)
    if not isinstance(shallow_scale, int | float) or isinstance(shallow_scale, bool) or not 0 < shallow_scale <= 1:
        raise MethodError(f"isdnet: shallow_scale must be a number in (0, 1] (1 = full resolution, 0.25 = 1/4), "
                          f"got {shallow_scale!r}")
    if not isinstance(channel_weights, bool):
        raise MethodError(f"isdnet: channel_weights must be true or false, got {channel_weights!r}")
    if isinstance(relation, str) or not isinstance(relation, Sequence):
        raise MethodError(f"isdnet: relation must be a list drawn from {list(RELATIONS)} (e.g. [shallow] or []), "
                          f"got {relation!r}")
    unknown = [r for r in relation if r not in RELATIONS]
    if unknown:
        raise MethodError(f"isdnet: relation entries must be drawn from {list(RELATIONS)}, got {unknown}")
    if relation and not channel_weights:
        raise MethodError(f"isdnet: relation {list(relation)} adds M_s/M_d to the channel gates, which "
                          "channel_weights: false removes; set relation: [] as well")
    for key, value in (("recon_weight", recon_weight), ("fa_weight", fa_weight)):
        if value < 0:
            raise MethodError(f"isdnet: {key} must be >= 0 (0 switches the loss off), got {value}")
    if branches != "both" and (recon_weight > 0 or fa_weight > 0):
        raise MethodError(f"isdnet: branches={branches!r} trains L_SEG + L_AUX only (Table 5); "
                          "set recon_weight: 0 and fa_weight: 0")
    if fa_weight > 0 and recon_weight == 0:
        raise MethodError("isdnet: fa_weight > 0 (L_SD) distils the SR decoder's features, which only L_SR trains; "
                          "set recon_weight > 0 or fa_weight: 0")
    return tuple(r for r in RELATIONS if r in relation)



@register_method
class ISDNet(UHRMethod):
    name = "isdnet"
    description = "ISDNet: ResNet18-D8+ASPP on the 4x-downsampled image + STDC on Laplacian residuals, RAF fusion"
    published = {"ISDNet": {}}
    # spec §2.10 (17.78 M total, 17.23 M on the inference path, 7 classes); exact counts as the official code's
    param_counts = (ParamCount("spec §2.10, official code @7341335", total=17_780_554, inference=17_225_010),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, stdc_pretrained: bool | str = False,
                 down_ratio: int = 4, deep_stem: bool = True, dilations: Sequence[int] = (1, 12, 24, 36),
                 dropout: float = 0.1, aux_weight: float = 0.4,
                 recon_weight: float = 0.1, fa_weight: float = 1.0, branches: str = "both",
                 shallow_input: str = "laplacian", shallow_scale: float = 1.0, fusion: str = "add",
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS,
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if down_ratio < 1:
            raise MethodError(f"isdnet: down_ratio must be >= 1, got {down_ratio}")
        if stdc_pretrained is True:
            raise MethodError("isdnet: stdc_pretrained must be false or a path to STDCNet813M_73.91.tar "
                              "(the STDC-Seg ImageNet file has no download URL)")
        relation = check_ablation_keywords(branches, shallow_input, shallow_scale, fusion, channel_weights, relation,
                                           recon_weight, fa_weight)
        self.down_ratio = down_ratio
        self.branches = branches
        self.loss_weights = {"aux": aux_weight, "recon": recon_weight, "fa": fa_weight}
        channels = 128  # fixed by RAF's 16 x 8 relation matrix (r^2 = 2C, §2.5)
        if branches != "shallow":  # deep branch (§2.2)
            self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8, deep_stem=deep_stem)
            self.decode_head = ASPPHead(512, channels, num_classes, tuple(dilations), dropout)  # RefineASPPHead
            self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)  # training only
        if branches != "deep":
            self.refine_head = ISDHead(num_classes, channels, dropout, deep=branches == "both",
                                       shallow_input=shallow_input, shallow_scale=float(shallow_scale), fusion=fusion,
                                       channel_weights=channel_weights, relation=relation,
                                       sr=recon_weight > 0 or fa_weight > 0)
        self._init_weights(stdc_pretrained)

    @property
    def has_deep(self) -> bool:
        return self.branches != "shallow"

    @property
    def has_shallow(self) -> bool:
        return self.branches != "deep"

    def _init_weights(self, stdc_pretrained: bool | str) -> None:
        heads = ((self.decode_head, self.auxiliary_head) if self.has_deep else ()) + \
            ((self.refine_head,) if self.has_shallow else ())
        for head in heads:
            init_conv_modules(head)
        if self.has_deep:
            init_conv_seg(self.decode_head.classifier)
            init_conv_seg(self.auxiliary_head.classifier)
        if not self.has_shallow:
            return
        init_conv_seg(self.refine_head.conv_seg)
        if stdc_pretrained:
            load_stdc_pretrained(self.refine_head.stdc_net, str(stdc_pretrained))
        else:
            init_stdc(self.refine_head.stdc_net)

    # -- forward ----------------------------------------------------------------------------------------------
    def _deep(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Deep branch on the nearest-downsampled normalised image (== x[..., ::4, ::4] for sizes divisible by 4,
        §2.1): (ResNet stages, D, deep logits)."""
        size = (x.shape[-2] // self.down_ratio, x.shape[-1] // self.down_ratio)
        stages = self.backbone.forward_intermediates(F.interpolate(x, size=size, mode="nearest"),
                                                     indices=[1, 2, 3, 4], intermediates_only=True)
        deep_feat, deep_logits = self.decode_head(stages[3])
        return stages, deep_feat, deep_logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if not self.has_shallow:  # Table 5 "D only": the deep ASPP logits
            logits = self._deep(x)[2]
        elif not self.has_deep:  # Table 5 "S only"
            logits = self.refine_head(x)["logits"]
        else:
            # the deep classifier runs and its logits are discarded, as upstream (counted in its FPS, §2.1)
            _, deep_feat, _ = self._deep(x)
            logits = self.refine_head(x, deep_feat)["logits"]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms under the upstream log keys (§3), each already weighted; a term switched off (weight 0) or
        without its module (single-branch ablations) is absent."""
        x = self.normalize(images)
        ce = partial(mmseg_cross_entropy, labels=labels, ignore_index=self.ignore_index)
        w = self.loss_weights
        terms: dict[str, torch.Tensor] = {}
        deep_feat = None
        if self.has_deep:
            stages, deep_feat, deep_logits = self._deep(x)
            terms["decode.loss_seg"] = ce(deep_logits)
        if self.has_shallow:
            out = self.refine_head(x, deep_feat, train=True)
            terms.update(isd_loss_terms(out, deep_feat, ce, w["recon"], w["fa"]))
        if self.has_deep:
            terms["aux.loss_seg"] = w["aux"] * ce(self.auxiliary_head(stages[2]))
        return terms

    # -- checkpoints --------------------------------------------------------------------------------------------
    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """Load a released ISDNet checkpoint (mmseg layout, §8). Returns a LoadReport naming every key that could
        not be placed. With `strict` (default) any missing, unexpected or mismatched key raises MethodError and
        nothing is loaded; with `strict=False` the matching tensors are loaded and the report says what was
        skipped (the released files are known not to match the released code: ASPP norms, SR decoder, §8)."""
        return self.load_mapped_state(official_to_ours(read_state_dict(path)), path, strict)

    def save_official(self, path: str) -> None:
        """This model in the release's mmseg layout (`{"state_dict": ...}`, §8 key names)."""
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)


# ---------------------------------------------------------------------------------------------------------------
# the paper's ablations (Tables 5-7, DeepGlobe; our reading of the switches: module docstring)

# Table 5's baseline: D + S, L_SEG + L_AUX only, RGB shallow input, fusion by plain addition (no CW, no M_s/M_d)
_TABLE5_BASE = {"shallow_input": "rgb", "recon_weight": 0.0, "fa_weight": 0.0, "fusion": "add",
                "channel_weights": False, "relation": []}


def _table5(key: str, label: str, branches: str, scale: str, model: dict) -> Ablation:
    """Table 5 baseline with the branches and the input scales of the row."""
    return Ablation(key, label, {"branches": branches, **_TABLE5_BASE, **model},
                    marks={"D": branches != "shallow", "S": branches != "deep", "input": scale}, table="Table 5")


def _table6(key: str, label: str, model: dict) -> Ablation:
    """Baseline + H + all losses, fusion per row (marks read off the keywords); M_s / M_d print "-" in the rows
    without either relation term, as the paper."""
    relation = model.get("relation", RELATIONS)
    marks = {"ADD": model.get("fusion", "add") == "add", "CAT": model.get("fusion", "add") == "cat",
             "CW": model.get("channel_weights", True),
             "M_s": "shallow" in relation if relation else "-", "M_d": "deep" in relation if relation else "-"}
    return Ablation(key, label, model, marks=marks, table="Table 6")


def _table7(key: str, label: str, model: dict) -> Ablation:
    """RAF fusion (the defaults) with L_SEG + L_AUX; L_SR, L_SD and the Laplacian input H per row (marks read off
    the keywords)."""
    marks = {"baseline": True, "L_SR": model.get("recon_weight", 0.1) > 0, "L_SD": model.get("fa_weight", 1.0) > 0,
             "H (Laplacian input)": model.get("shallow_input", "laplacian") == "laplacian"}
    return Ablation(key, label, model, marks=marks, table="Table 7")


ISDNet.ablations = (
    _table5("deep_quarter", "D only, 1/4 scale", "deep", "1/4 scale", {"down_ratio": 4}),
    _table5("deep_full", "D only, full scale", "deep", "full scale", {"down_ratio": 1}),
    _table5("shallow_quarter", "S only, 1/4 scale", "shallow", "1/4 scale", {"shallow_scale": 0.25}),
    _table5("shallow_full", "S only, full scale", "shallow", "full scale", {"shallow_scale": 1.0}),
    _table5("deep_shallow_add", "D + S, D at 1/4, S at full", "both", "D at 1/4, S at full",
            {"down_ratio": 4, "shallow_scale": 1.0}),
    _table6("add", "ADD", {"fusion": "add", "channel_weights": False, "relation": []}),
    _table6("add_cw", "ADD + CW", {"fusion": "add", "channel_weights": True, "relation": []}),
    _table6("cat", "CAT", {"fusion": "cat", "channel_weights": False, "relation": []}),
    _table6("cat_cw", "CAT + CW", {"fusion": "cat", "channel_weights": True, "relation": []}),
    _table6("add_cw_ms", "ADD + CW + M_s", {"fusion": "add", "channel_weights": True, "relation": ["shallow"]}),
    _table6("isdnet", "ADD + CW + M_s + M_d", {}),
    _table7("baseline", "baseline", {"shallow_input": "rgb", "recon_weight": 0.0, "fa_weight": 0.0}),
    _table7("sr", "baseline + L_SR", {"shallow_input": "rgb", "fa_weight": 0.0}),
    _table7("sr_sd", "baseline + L_SR + L_SD", {"shallow_input": "rgb"}),
    _table7("isdnet", "baseline + L_SR + L_SD + H", {}),
)
