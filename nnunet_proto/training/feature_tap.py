"""Forward hooks that capture intermediate U-Net features without changing the network.

nnU-Net's PlainConvUNet / ResidualEncoderUNet keep ``encoder.stages`` and ``decoder.stages``
(decoder ordered from lowest to highest resolution). A hook leaves the state_dict untouched, works
with or without deep supervision, and keeps the autograd graph (NNUNET_NOTES.md §2.6).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

LAYER_HELP = ("'decoder' = decoder.stages[-1] (full resolution), 'decoder-2' = decoder.stages[-2] "
              "(half resolution), 'bottleneck' = encoder.stages[-1]")


def resolve_layer(network: nn.Module, layer: str) -> nn.Module:
    """The submodule named by ``layer`` in an nnU-Net U-Net (unwrapped), or a clear error."""
    decoder = getattr(network, "decoder", None)
    encoder = getattr(network, "encoder", None)
    stages = getattr(decoder, "stages", None)
    if stages is None or encoder is None or not hasattr(encoder, "stages"):
        raise TypeError(f"nnunet_proto needs a U-Net with encoder.stages and decoder.stages (nnU-Net's "
                        f"PlainConvUNet or ResidualEncoderUNet); got {type(network).__name__}. Use a plans "
                        f"file with one of those architectures.")
    if layer == "decoder":
        return stages[-1]
    if layer == "decoder-2":
        if len(stages) < 2:
            raise ValueError("feature_layer 'decoder-2' needs at least two decoder stages")
        return stages[-2]
    if layer == "bottleneck":
        return encoder.stages[-1]
    raise ValueError(f"unknown feature layer {layer!r}; choose {LAYER_HELP}")


class FeatureTap:
    """Keeps the output of one submodule from the latest forward pass.

    Usage: ``tap = FeatureTap(net, 'decoder'); out = net(x); feats = tap.pop()``. ``pop`` returns
    the tensor (with its graph) and clears it so that a stale feature is never used twice; it raises
    if the hooked layer did not run. ``remove()`` detaches the hook.
    """

    def __init__(self, network: nn.Module, layer: str):
        self.layer = layer
        self._features: Optional[torch.Tensor] = None
        module = resolve_layer(network, layer)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        # encoder stages of ResidualEncoder may return tuples in some versions: keep the tensor
        self._features = output[0] if isinstance(output, (tuple, list)) else output

    def pop(self) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError(f"feature layer {self.layer!r} produced no output in the last forward pass")
        feats, self._features = self._features, None
        return feats

    def clear(self) -> None:
        self._features = None

    def remove(self) -> None:
        self._handle.remove()
        self._features = None
