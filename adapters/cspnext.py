"""timm CspNext (RTMDet's backbone): the last CSP layer's final_conv (ConvNormAct: 1x1 conv, BatchNorm, SiLU).

Its channel attention (eSE) gates the concatenation *before* final_conv, so nothing but BatchNorm and the
activation sits between the feature layer and the ClassifierHead's GAP -> Linear.
"""

from __future__ import annotations

from timm.models.cspnext import CspNext, CspNextLayer

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("cspnext", CspNext)
def describe_cspnext(model: CspNext) -> NormalisedHead:
    layer_name = f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}"  # type: ignore[arg-type]
    if not isinstance(submodule(model, layer_name), CspNextLayer):
        raise UnsupportedModel(f"the last stage does not end in a CspNextLayer ({layer_name}): not the layout it knows")
    conv, norm, act = conv_norm_act(model, f"{layer_name}.final_conv")
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=act,
        pool="head.global_pool",
        classifier="head.fc",
    )
