"""SegNet reference parameter count (never imported by the tests; runs in the project venv).

The official network is caffe-only (`alexgkendall/SegNet-Tutorial` `Models/segnet_train.prototxt`, run by
`alexgkendall/caffe-segnet`); there is no official PyTorch code to run, so no logit parity: the count is taken from
the prototxt layer by layer with its 11 CamVid classes read as 7 (`caffe_prototxt.count`: Convolution weights and
biases, caffe-segnet `BN` scale and shift), and our per-layer shapes are checked against it in order.

    .venv/bin/python tests/golden/count_segnet.py --upstream <SegNet-Tutorial tree at bb68b64>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from torch import nn  # noqa: E402

from tests.golden import mmseg_side  # noqa: E402
from tests.golden.caffe_prototxt import count  # noqa: E402

REPOSITORY = "alexgkendall/SegNet-Tutorial"
COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
PROTOTXT = "Models/segnet_train.prototxt"
FILES = {PROTOTXT: "d7075f326801cfb2b204f66d657da8805e2dd101"}
NUM_CLASSES = 7
RELEASE_CLASSES = 11  # CamVid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help=f"{REPOSITORY} tree at {COMMIT[:7]}")
    args = parser.parse_args()
    mmseg_side.check_files(args.upstream.resolve(), FILES)

    from methods import build_method

    ours = build_method("segnet-global", NUM_CLASSES)
    total, rows = count(args.upstream / PROTOTXT, NUM_CLASSES, RELEASE_CLASSES)
    # our layers in forward order: encoder features, decoder stages, classifier
    layers = [m for m in [*ours.features, *ours.decoder.modules(), ours.conv1_1_D]
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    print(f"caffe {PROTOTXT} with {NUM_CLASSES} classes: {total:,} parameters")
    mismatched = []
    for (name, kind, params), layer in zip(rows, layers, strict=True):
        mine = sum(p.numel() for p in layer.parameters())
        mismatched += [name] if mine != params else []
        print(f"  {name:14s} {kind:12s} {params:>10,}  ours {mine:>10,}{'' if mine == params else '  <- differs'}")
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"ours (segnet-global): {n_ours:,} ({100 * (n_ours - total) / total:+.3f}%); layers that differ: "
          f"{mismatched or 'none'}")


if __name__ == "__main__":
    main()
