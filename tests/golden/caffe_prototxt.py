"""Parameter count of a caffe network from its prototxt alone (no caffe needed), for the `count_<name>.py` scripts of
the caffe-released generic networks (FCN-8s, SegNet); never imported by the tests.

The prototxt text format is parsed into nested dicts; the blobs' channel counts are followed from the data layer
(3 channels) through the layers, and each layer's learnable blobs are counted with caffe's shapes:
`Convolution` / `Deconvolution` weight out x in/group x kh x kw plus out biases unless `bias_term: false`;
`BN` (caffe-segnet) scale and shift of C each; `Scale` C (+ C with `bias_term`). Every other layer type listed in
`PASS_THROUGH` keeps its first bottom's channels and has no parameters; any other type is an error.
"""
from __future__ import annotations

import re
from pathlib import Path

PASS_THROUGH = {"ReLU", "Pooling", "Dropout", "Crop", "Eltwise", "Upsample", "SoftmaxWithLoss", "Accuracy", "Softmax"}
DATA = {"Python", "DenseImageData", "Data", "Input"}


def parse(text: str) -> dict:
    """prototxt -> {key: [values]} (every key may repeat; nested messages are dicts)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}:]|[^\s{}:"]+', re.sub(r"#[^\n]*", "", text))
    pos = 0

    def message() -> dict:
        nonlocal pos
        out: dict[str, list] = {}
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                value = message()
                pos += 1  # the closing brace
            else:
                value = tokens[pos].strip('"')
                pos += 1
            out.setdefault(key, []).append(value)
        return out

    return message()


def _one(msg: dict, key: str, default=None):
    values = msg.get(key)
    return values[0] if values else default


def count(path: Path, num_classes: int | None = None, dataset_classes: int | None = None
          ) -> tuple[int, list[tuple[str, str, int]]]:
    """(total, [(layer, type, params)]) of the prototxt at `path`; with `num_classes`, every `num_output` equal to
    `dataset_classes` (the release's class count) is counted as `num_classes`."""
    layers = parse(Path(path).read_text())["layer"]
    channels: dict[str, int] = {}
    total, rows = 0, []
    for layer in layers:
        kind, name = _one(layer, "type"), _one(layer, "name")
        bottoms, tops = layer.get("bottom", []), layer.get("top", [])
        params = 0
        if kind in DATA:
            channels[tops[0]] = 3
            continue
        cin = channels[bottoms[0]]
        if kind in ("Convolution", "Deconvolution"):
            conv = _one(layer, "convolution_param")
            out = int(_one(conv, "num_output"))
            if num_classes is not None and out == dataset_classes:
                out = num_classes
            k = int(_one(conv, "kernel_size"))
            group = int(_one(conv, "group", 1))
            params = out * (cin // group) * k * k + (0 if _one(conv, "bias_term") == "false" else out)
            cout = out
        elif kind == "BN":
            params, cout = 2 * cin, cin
        elif kind == "Scale":
            params = cin * (2 if _one(_one(layer, "scale_param", {}), "bias_term") == "true" else 1)
            cout = cin
        elif kind in PASS_THROUGH:
            cout = cin
        else:
            raise SystemExit(f"{path}: layer {name} of type {kind} is not handled")
        for top in tops:  # a pooling's mask top has its output's channels too
            channels[top] = cout
        total += params
        if params:
            rows.append((name, kind, params))
    return total, rows
