"""A segmentation_models_pytorch network as a generic network (U-Net, DeepLabv3+): built once in `self.network`,
fed padded inputs, read and written in smp's own state-dict layout."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import LoadReport
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter


class SmpSegmenter(GenericSegmenter):
    """Subclasses build `self.network` (an smp model with `classes=num_classes`) and set `size_divisor`."""

    size_divisor: ClassVar[int] = 32  # smp asserts that both sides divide by the encoder's output stride

    def network_outputs(self, x):
        # pad to the divisor (zeros = the mean colour after normalisation), then crop the logits back
        h, w = x.shape[-2:]
        ph, pw = -h % self.size_divisor, -w % self.size_divisor
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return [self.network(x)[..., :h, :w]]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """The smp model's state dict (optionally under "state_dict" / "model")."""
        state = {f"network.{k}": v for k, v in read_state_dict(path).items()}
        return self.load_mapped_state(state, path, strict)

    def save_official(self, path: str) -> None:
        torch.save({k[len("network."):]: v for k, v in self.state_dict().items()}, path)
