"""Published numbers (anchors) as data, with provenance, transcribed from specs/anchors.md.

Nothing here is measured by the suite; `pipelines/report.py` puts our MLflow measurements beside these.
A value the sources do not give is None; `*_text` overrides how a published cell is printed when the
source gives only a bound or an approximate reading (e.g. "< 1"). `ours` names the uhrbench method that
truly corresponds to the published row, or None ("published only"): the papers' DeepLabv3+/FCN "global /
local inference" baselines are ResNet-50 networks, not our DeepLabv3-ResNet-18 `global`/`local`, so they
stay published only.

Provenance tags (specs/anchors.md §0): [paper] the method's own paper; [readme] upstream README; [table] BPT
(AAAI'25) Tables 1-3, copied from GPWFormer (IJCAI'23), which carry ISDNet's comparison rows; [fig] read from
RUE's `Figure/FPS.png` (±0.1 mIoU, ±0.2 FPS; DeepGlobe ±0.5); [F2Net note] third-party summary of F2Net.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    method: str                 # the published row name
    miou: float | None          # headline metric in % (DeepGlobe 6-class mIoU, Inria building IoU, ...)
    fps: float | None = None
    memory_mb: float | None = None
    provenance: str = ""
    ours: str | None = None     # our method name where it truly corresponds
    k: float | None = None      # RUE's share of refined patches
    fps_text: str | None = None
    miou_text: str | None = None
    note: str = ""


# ISDNet (CVPR'22) comparison tables: method, mIoU, FPS, memory (MB). Rows as quoted by BPT/GPWFormer [table]
# plus the methods' own papers; specs/anchors.md §1-3.
ISDNET_TABLES: dict[str, tuple[Anchor, ...]] = {
    "deepglobe": (
        Anchor("FCN-8s (local inference)", 71.8, provenance="[table]"),
        Anchor("FCN-8s (global inference)", 68.8, provenance="[table]"),
        Anchor("U-Net (local inference)", 37.3, provenance="[table]"),
        Anchor("U-Net (global inference)", 38.4, provenance="[table]"),
        Anchor("DeepLabv3+ (local inference)", 63.1, provenance="[table]",
               note="ResNet-50 DeepLabv3+; our `local` is DeepLabv3-ResNet-18"),
        Anchor("DeepLabv3+ (global inference)", 63.5, provenance="[table]",
               note="ResNet-50 DeepLabv3+; our `global` is DeepLabv3-ResNet-18"),
        Anchor("ICNet", 40.2, provenance="[table]"),
        Anchor("BiSeNetV1", 53.0, provenance="[table]"),
        Anchor("PSPNet", 56.6, provenance="[table]"),
        Anchor("DANet", 53.8, provenance="[table]"),
        Anchor("STDC", 70.3, memory_mb=2580, provenance="[table]"),
        Anchor("GLNet", 71.6, 0.17, 1865, "[paper], [table]; FPS ≈0.17 as quoted in ISDNet's table (3rd-party)",
               ours="glnet"),
        Anchor("CascadePSP", 68.5, None, 3236, "[table]; FPS [fig]", fps_text="< 1"),
        Anchor("PPN", 71.9, None, 1193, "[table]", fps_text="~13 [fig, by eye]"),
        Anchor("PointRend", 71.8, None, 1593, "[table]"),
        Anchor("MagNet", 72.9, None, 1559, "[paper] 72.96, [table]"),
        Anchor("MagNet-Fast", 71.8, 3.4, 1559, "[table]; FPS [fig]"),
        Anchor("FCtL", 73.5, None, 3167, "[table]", fps_text="< 1"),
        Anchor("ISDNet", 73.30, 27.70, 1948, "[paper]; memory most likely max_memory_allocated (ISDNet#24)",
               ours="isdnet"),
    ),
    "inria": (
        Anchor("FCN-8s", 69.1, None, 2447, "[table]"),
        Anchor("DeepLabv3+", 55.9, provenance="[table]", note="ResNet-50 DeepLabv3+; not our `global`/`local`"),
        Anchor("GLNet", 71.2, None, 2663, "[table] (medium confidence)", ours="glnet", fps_text="< 1"),
        Anchor("CascadePSP", 69.4, None, 3236, "[table]", fps_text="< 1"),
        Anchor("STDC", 72.4, 5.0, 7410, "[table]; FPS [fig]"),
        Anchor("FCtL", 73.7, None, 4332, "[table]", fps_text="< 1"),
        Anchor("ISDNet", 74.23, 6.90, 4680, "[paper], [table]", ours="isdnet"),
    ),
    "cityscapes": (
        Anchor("DenseCRF", 62.9, provenance="[table]"),
        Anchor("DGF", 63.3, provenance="[table]"),
        Anchor("SegFix", 65.8, provenance="[table]"),
        Anchor("MagNet", 67.6, None, 2007, "[table]",
               note="different low-resolution-backbone protocol: not comparable"),
        Anchor("BiSeNetV1", 74.4, provenance="[table]"),
        Anchor("PSPNet", 74.9, provenance="[table]"),
        Anchor("BiSeNetV2", 75.8, provenance="[table]"),
        Anchor("DeepLabv3", 76.7, None, 1468, "[table]",
               note="ResNet-101-class DeepLabv3; not our ResNet-18 baselines"),
        Anchor("ISDNet", 76.02, 50.79, 1510, "[paper], [table]", ours="isdnet"),
    ),
}

# RUE (CVPR'25) accuracy-vs-FPS figure (`Figure/FPS.png`), per dataset, including its K settings;
# specs/anchors.md §1, §2, §4. Memory is drawn as unscaled circle size: not a number.
RUE_FIGURE: dict[str, tuple[Anchor, ...]] = {
    "deepglobe": (
        Anchor("GLNet", 71.6, None, 1865, "[paper]; FPS [fig]", ours="glnet", fps_text="< 1"),
        Anchor("CascadePSP", 68.5, 0.11, 3236, "[table]; FPS [fig]"),
        Anchor("PPN", 71.7, 15.0, 1193, "[fig]"),
        Anchor("MagNet-Fast", 71.8, 3.4, 1559, "[table]; FPS [fig]"),
        Anchor("FCtL", 72.7, None, 3167, "[fig]", fps_text="< 1"),
        Anchor("ISDNet", 73.30, 27.70, 1948, "[paper]", ours="isdnet"),
        Anchor("WSDNet", 74.1, 30.3, 1876, "[table]; FPS [fig]"),
        Anchor("SGHRQ", 73.5, 24.3, None, "[fig]"),
        Anchor("RUE (K = 100%)", 75.1, 44.4, None, "[fig]; 44.38 FPS [F2Net note]", ours="rue", k=1.0),
        Anchor("RUE (K = 75%)", 74.5, 48.2, None, "[fig]", ours="rue", k=0.75),
        Anchor("RUE (K = 50%)", 73.7, 57.0, None, "[fig]", ours="rue", k=0.5),
    ),
    "inria": (
        Anchor("GLNet", 71.2, None, 2663, "[fig]", ours="glnet", fps_text="< 1"),
        Anchor("CascadePSP", 69.4, 0.22, 3236, "[fig]"),
        Anchor("STDC", 72.4, 5.0, 7410, "[fig]"),
        Anchor("FCtL", 73.7, None, 4332, "[fig]", fps_text="< 1"),
        Anchor("ISDNet", 74.23, 6.90, 4680, "[paper]; FPS [fig] 6.9", ours="isdnet"),
        Anchor("WSDNet", 75.2, 7.8, 4379, "[table]; FPS [fig]"),
        Anchor("SGHRQ", 77.3, 5.5, None, "[fig]"),
        Anchor("RUE (K = 100%)", 79.0, 10.9, None, "[fig]; 79.00 [F2Net note]", ours="rue", k=1.0),
        Anchor("RUE (K = 75%)", 78.2, 11.7, None, "[fig]", ours="rue", k=0.75),
        Anchor("RUE (K = 50%)", 76.3, 14.0, None, "[fig]", ours="rue", k=0.5),
    ),
    "urur": (
        Anchor("GLNet", 41.2, None, None, "[fig] (from the +7.0 annotation)", ours="glnet", fps_text="< 1"),
        Anchor("FCtL", 43.1, 0.03, None, "[fig]"),
        Anchor("ISDNet", 45.8, 6.3, None, "[fig]", ours="isdnet"),
        Anchor("WSDNet", 46.9, 7.1, None, "[fig]"),
        Anchor("RUE (K = 100%)", 48.2, 10.8, None, "[fig]", ours="rue", k=1.0),
        Anchor("RUE (K = 75%)", 47.9, 11.2, None, "[fig]", ours="rue", k=0.75),
        Anchor("RUE (K = 50%)", 47.4, 13.7, None, "[fig]", ours="rue", k=0.5),
    ),
}

# UHRSNet (ICPR'20) DeepGlobe ablation (Table III layout): only the full model's two outputs are known,
# under the paper's own protocol ([paper, unverified]; specs/uhrsnet.md §1, §6). The figures are
# ("global" output, "local" output); the rows themselves are methods/uhrsnet.py's ABLATION_ROWS.
UHRSNET_ABLATION = {"deepglobe": {"global_local_lff": (72.0, 71.4)}}
UHRSNET_ABLATION_PROVENANCE = "UHRSNet, ICPR 2020, DeepGlobe test, own protocol; [paper, unverified]"

# How the papers measured (specs/protocol.md §1.2, §2.2; specs/anchors.md §0), for results/README.md.
PROTOCOL_FLAGS = (
    "FPS: ISDNet/RUE-lineage FPS most likely comes from `tools/fps_test.py`, whose default input is 0.8x native "
    "(1958² DeepGlobe, 4000² Inria, 4096² URUR, 1638×819 Cityscapes); ours is measured at the scale "
    "listed with each run (1.0 = native). FPS is not hardware-normalised across papers.",
    "Memory: ISDNet's MB are most likely torch `max_memory_allocated` of one forward pass (ISDNet#24, unconfirmed); "
    "BPT uses device-wide gpustat; GLNet's method is unknown. Our `memory` column is torch peak allocated (MiB) of "
    "batch-1 inference; the NVML per-process peak (CUDA context included) is in compare_<dataset> tables.",
    "Metric: DeepGlobe = mean IoU over 6 classes excluding `unknown`; Inria = building IoU; Cityscapes = 19-class val "
    "mIoU; URUR = 8-class mIoU. Ours: one int64 confusion matrix over the whole split.",
    "RUE numbers are read from its figure (±0.1 mIoU, ±0.2 FPS; DeepGlobe ±0.5); K = 75%/50% are inference-time "
    "settings of the K = 100%-trained model.",
    "UHRSNet's numbers come from its own re-run protocol (its GLNet row is 69.4/68.9, not 71.6): do not mix them "
    "with the other tables' rows.",
)
