"""Forward hooks that capture intermediate U-Net features without changing the network.

nnU-Net's PlainConvUNet / ResidualEncoderUNet keep ``encoder.stages`` and ``decoder.stages``
(decoder ordered from lowest to highest resolution). A hook leaves the state_dict untouched, works
with or without deep supervision, and keeps the autograd graph (docs/methods/README.md, 'Feature layers').
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

LAYER_HELP = ("'decoder' = decoder.stages[-1] (full resolution), 'decoder-2' = decoder.stages[-2] "
              "(half resolution), 'bottleneck' = encoder.stages[-1], 'encoder:<i>' = encoder.stages[i], "
              "'decoder:<i>' = decoder.stages[i] (lowest resolution first)")


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
    for prefix, modules in (("encoder:", encoder.stages), ("decoder:", stages)):
        if layer.startswith(prefix):
            try:
                return modules[int(layer[len(prefix):])]
            except (ValueError, IndexError):
                raise ValueError(f"feature layer {layer!r}: index must be an integer below {len(modules)}") from None
    raise ValueError(f"unknown feature layer {layer!r}; choose {LAYER_HELP}")


def layer_channels(arch_kwargs: dict, layer: str) -> int:
    """Output channels of a layer, from the plans' architecture kwargs (features_per_stage)."""
    feats = list(arch_kwargs["features_per_stage"])
    n_dec = len(feats) - 1
    if layer == "decoder":
        return feats[0]
    if layer == "decoder-2":
        return feats[1]
    if layer == "bottleneck":
        return feats[-1]
    if layer.startswith("encoder:"):
        return feats[int(layer.split(":")[1])]
    if layer.startswith("decoder:"):
        i = int(layer.split(":")[1])
        return feats[n_dec - 1 - i]
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
