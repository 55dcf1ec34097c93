"""transformers CNN classifiers against the autograd Hessian of the real model (float64); loading, preprocessing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm.data
import torch
from helpers.adapters import RTOL
from hessian_reference import randomise_norms, relative_error, trace_and_flatness
from hub_server import HubServer
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    BitConfig,
    BitForImageClassification,
    BitImageProcessor,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    EfficientNetImageProcessor,
    FocalNetConfig,
    FocalNetForImageClassification,
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV1ImageProcessor,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessor,
    PoolFormerConfig,
    PoolFormerForImageClassification,
    PoolFormerImageProcessor,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

import flatscan
from flatscan.io.data import DataOptions, open_eval_data
from flatscan.io.models import ModelLoadError, load_model

CLASSES = 5
SIZE = 40
MAX_LOGIT = 4.0  # keeps the softmax away from one-hot (see test_adapters_common.MAX_LOGIT)


def tiny_efficientnet(**overrides: object) -> EfficientNetForImageClassification:
    """Two blocks (one with squeeze-excitation and expansion), 32 features (the pooler's kernel), overall stride 4."""
    config = dict(
        width_coefficient=0.025,
        depth_coefficient=1.0,
        hidden_dim=32,  # round_filters(1280 * 0.025): top_conv's channels, and the pooler's kernel
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 24],
        strides=[1, 2],
        num_block_repeats=[1, 1],
        expand_ratios=[1, 6],
        num_labels=CLASSES,
    )
    return EfficientNetForImageClassification(EfficientNetConfig(**(config | overrides)))


def tiny_bit(**overrides: object) -> BitForImageClassification:
    """Two stages (stem stride 4, then 2): a 5 x 5 final map at 40 px; GroupNorms of 4 groups."""
    config = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_groups=4, num_labels=CLASSES)
    return BitForImageClassification(BitConfig(**(config | overrides)))


def tiny_poolformer(**overrides: object) -> PoolFormerForImageClassification:
    config = dict(
        hidden_sizes=[8, 16],
        depths=[1, 2],
        num_encoder_blocks=2,
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
        mlp_ratio=2.0,
        num_labels=CLASSES,
    )
    return PoolFormerForImageClassification(PoolFormerConfig(**(config | overrides)))


def tiny_focalnet(**overrides: object) -> FocalNetForImageClassification:
    """Two stages (widths 8, 16; two layers in the last): a 5 x 5 final map at 40 px."""
    config = dict(embed_dim=8, depths=[1, 2], focal_levels=[2, 2], patch_size=4, num_labels=CLASSES)
    return FocalNetForImageClassification(FocalNetConfig(**(config | overrides)))


MODELS = {
    # ResNetBottleNeckLayer: conv+BN (no activation), += shortcut, then the layer's own activation module.
    "resnet_bottleneck": lambda: ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck", num_labels=CLASSES)
    ),
    # ResNetBasicLayer with transformers' own GELUActivation after the add: the curvature term.
    "resnet_basic_gelu": lambda: ResNetForImageClassification(
        ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 4],
            depths=[1, 1],
            layer_type="basic",
            hidden_act="gelu",
            num_labels=CLASSES,
        )
    ),
    # RegNet-Y: squeeze-excitation before the last conv, grouped 3x3 conv.
    "regnet_y": lambda: RegNetForImageClassification(
        RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=8, layer_type="y", num_labels=CLASSES
        )
    ),
    "regnet_x": lambda: RegNetForImageClassification(
        RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, layer_type="x", num_labels=CLASSES
        )
    ),
    # ConvNeXt: pwconv2 (Linear, channels last) with layer scale; mean -> LayerNorm -> Linear (general head).
    "convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, num_labels=CLASSES)
    ),
    # ConvNeXt-V2: GRN before pwconv2, no layer scale.
    "convnextv2": lambda: ConvNextV2ForImageClassification(
        ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=CLASSES)
    ),
    # top_conv ('same' padding), top_bn, SiLU, AvgPool2d(32, ceil_mode=True) on a 10 x 10 map.
    "efficientnet": tiny_efficientnet,
    # conv_1x1 with ReLU6, TF padding; AdaptiveAvgPool2d.
    "mobilenetv2": lambda: MobileNetV2ForImageClassification(
        MobileNetV2Config(depth_multiplier=0.025, finegrained_output=False, num_labels=CLASSES)
    ),
    # The last pointwise layer (10 -> 10 channels), BatchNorm, ReLU6, TF padding; AdaptiveAvgPool2d.
    "mobilenetv1": lambda: MobileNetV1ForImageClassification(
        MobileNetV1Config(depth_multiplier=0.01, num_labels=CLASSES)
    ),
    # BiT (pre-activation): weight-standardised conv3 (inference form) + shortcut -> GroupNorm(4) -> ReLU -> GAP.
    "bit_preact": lambda: flatscan.inference_form(tiny_bit()),
    # Bottleneck layers, dynamic 'SAME' padding: conv3 -> GroupNorm(4) + shortcut -> GELU.
    "bit_bottleneck": lambda: flatscan.inference_form(
        tiny_bit(layer_type="bottleneck", global_padding="SAME", hidden_act="gelu")
    ),
    # PoolFormer: output.conv2 (1x1), layer_scale_2, + shortcut -> GroupNorm(1) over (C, H, W) -> mean -> Linear.
    "poolformer": tiny_poolformer,
    # ... without layer scale (scale 1).
    "poolformer_no_layer_scale": lambda: tiny_poolformer(use_layer_scale=False, hidden_act="relu"),
    # FocalNet: mlp.fc2 (a Linear on the (N, L, C) tokens), + shortcut -> LayerNorm across channels -> mean -> Linear.
    "focalnet": tiny_focalnet,
    # ... with a per-channel layer scale gamma_2 on fc2's output.
    "focalnet_layer_scale": lambda: tiny_focalnet(use_layerscale=True),
}

FAMILIES = {
    "resnet_bottleneck": ("resnet", "relu"),
    "resnet_basic_gelu": ("resnet", "gelu"),
    "regnet_y": ("regnet", "relu"),
    "regnet_x": ("regnet", "relu"),
    "convnext": ("convnext", "identity"),
    "convnextv2": ("convnext", "identity"),
    "efficientnet": ("efficientnet", "silu"),
    "mobilenetv2": ("mobilenetv2", "relu6"),
    "mobilenetv1": ("mobilenetv1", "relu6"),
    "bit_preact": ("bit", "relu"),
    "bit_bottleneck": ("bit", "gelu"),
    "poolformer": ("poolformer", "identity"),
    "poolformer_no_layer_scale": ("poolformer", "identity"),
    "focalnet": ("focalnet", "identity"),
    "focalnet_layer_scale": ("focalnet", "identity"),
}


class Logits(nn.Module):
    """The reference differentiates the model's own graph; this only unwraps its ModelOutput."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).logits


def images_and_labels(size: int = SIZE, n: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64),
        torch.randint(0, CLASSES, (n,), generator=generator),
    )


def prepare(model: nn.Module, seed: int = 0, size: int = SIZE) -> nn.Module:
    """float64, eval, non-trivial BatchNorm statistics, GroupNorm and LayerNorm affines, and ConvNeXt's /
    PoolFormer's / FocalNet's layer scales (initialised at 1e-6 / 1e-5 / 1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    randomise_norms(model, generator)
    with torch.no_grad():
        for module in model.modules():
            for name in ("layer_scale_parameter", "layer_scale_1", "layer_scale_2", "gamma_2"):
                gamma = getattr(module, name, None)
                if isinstance(gamma, nn.Parameter):
                    gamma.copy_(0.5 + torch.rand(gamma.shape, generator=generator))
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(0.5 + 1.5 * torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    model = model.double().eval()
    images, _ = images_and_labels(size)
    head = flatscan.describe(model)
    with torch.no_grad():
        peak = model(images).logits.abs().max()
        if peak > MAX_LOGIT:
            classifier = model.get_submodule(head.classifier)
            classifier.weight.mul_(MAX_LOGIT / peak)
            classifier.bias.mul_(MAX_LOGIT / peak)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_family_matches_autograd(name: str) -> None:
    torch.manual_seed(0)
    model = prepare(MODELS[name]())
    head = flatscan.describe(model)
    assert (head.family, head.activation.name) == FAMILIES[name]
    images, labels = images_and_labels()
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert result.feature_layer == head.feature_layer
    trace, kappa = trace_and_flatness(Logits(model), f"model.{head.feature_layer}.weight", images, labels)
    assert abs(trace) > 1e-8 and abs(kappa) > 1e-8, "degenerate test case"
    assert relative_error(result.trace, trace) <= RTOL, (result.trace, trace)
    assert relative_error(result.relative_flatness, kappa) <= RTOL, (result.relative_flatness, kappa)


@pytest.mark.parametrize(
    ("hidden_act", "expected"),
    [
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("silu", "silu"),
        ("mish", "mish"),
        ("linear", "identity"),
    ],
)
def test_transformers_activations_are_read(hidden_act: str, expected: str) -> None:
    # The scan checks that the pooled vector is the mean of the activation of the pre-activation (float64: ~1e-13).
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 4],
        depths=[1, 1],
        layer_type="basic",
        hidden_act=hidden_act,
        num_labels=CLASSES,
    )
    model = prepare(ResNetForImageClassification(config))
    result = flatscan.scan(model, [images_and_labels()], device="cpu")
    assert result.activation == expected


@pytest.mark.parametrize("name", ["convnext", "bit_preact", "poolformer", "focalnet_layer_scale"])
def test_verify_certifies(name: str) -> None:
    torch.manual_seed(0)
    model = prepare(MODELS[name]())
    result = flatscan.verify(model, images_and_labels(), pairs=8)
    assert result.passed and not result.degenerate, result
    assert result.downstream_layers == []


@pytest.mark.parametrize("padding", [None, "SAME"])
def test_bit_inference_form_keeps_the_function(padding: str | None) -> None:
    # transformers' WeightStandardizedConv2d standardises its weight in every forward; the inference form holds
    # the kernel it applies in a plain convolution ('SAME': timm's Conv2dSame for the strided 3x3 convs).
    torch.manual_seed(0)
    model = tiny_bit(global_padding=padding).double().eval()
    images, _ = images_and_labels(size=37)  # odd: the dynamic 'SAME' padding is asymmetric
    with torch.no_grad():
        expected = model(images).logits
    with pytest.raises(flatscan.UnsupportedModel, match=r"conv3 is WeightStandardizedConv2d, .*inference_form"):
        flatscan.describe(model)
    fused = flatscan.inference_form(model)
    assert not any(type(m).__name__ == "WeightStandardizedConv2d" for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(images).logits, expected, rtol=1e-12, atol=1e-12)


def test_saved_bit_loads_in_its_inference_form(tmp_path: Path) -> None:
    model = tiny_bit(global_padding="SAME").eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.architecture == "BitForImageClassification"
    images, _ = images_and_labels(size=37, n=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images.float()).logits, model(images.float()).logits)
    head = flatscan.describe(loaded.model)
    assert (head.family, head.coupling.label) == ("bit", "GroupNorm(4)")


def test_focalnet_post_layernorm_is_refused() -> None:
    with pytest.raises(flatscan.UnsupportedModel, match=r"^use_post_layernorm: .* two LayerNorms in a row"):
        flatscan.describe(tiny_focalnet(use_post_layernorm=True))


def test_efficientnet_pooler_beyond_its_window_is_refused() -> None:
    # hidden_dim 8 is the pooler's kernel; a 40 px image leaves a 10 x 10 map, which it pools to 2 x 2.
    model = prepare(tiny_efficientnet(width_coefficient=0.005, hidden_dim=8), size=32)
    flatscan.scan(model, [images_and_labels(size=32)], device="cpu")  # an 8 x 8 map: one window, a global pool
    with pytest.raises(flatscan.UnsupportedModel, match=r"leaves 2x2 positions .* not a global pool"):
        flatscan.scan(model, [images_and_labels(size=40)], device="cpu")
    with pytest.raises(flatscan.UnsupportedModel, match=r"MaxPool2d \(pooling_type='max'\), not an average"):
        flatscan.describe(tiny_efficientnet(pooling_type="max"))


def test_no_classifier_is_refused() -> None:
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=0)
    with pytest.raises(flatscan.UnsupportedModel, match="num_labels=0 has no classifier"):
        flatscan.describe(ResNetForImageClassification(config))


def _photo(height: int = 61, width: int = 83) -> PIL.Image.Image:
    """A structured (not smooth) RGB image, so that a wrong resize or crop changes many pixels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (255 * np.sin(x / 5.0) ** 2 + y) % 256], axis=-1)
    return PIL.Image.fromarray(rgb.astype(np.uint8))


PROCESSORS = {
    # ConvNeXt's processor below 384 px: shortest edge to 40 / crop_pct, centre crop 40.
    "convnext_crop": ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=0.8, resample=3),
    # ... and from 384 px on: resized to 384 x 384, no crop.
    "convnext_warp": ConvNextImageProcessor(size={"shortest_edge": 384}, resample=2),
    # EfficientNet: resized to 48 x 48 (nearest), normalised, divided by the std again (include_top).
    "efficientnet": EfficientNetImageProcessor(size={"height": 48, "width": 48}, resample=0),
    # MobileNetV2: shortest edge 46, centre crop 40, mean = std = 0.5.
    "mobilenetv2": MobileNetV2ImageProcessor(
        size={"shortest_edge": 46}, crop_size={"height": 40, "width": 40}, resample=2
    ),
    "mobilenetv1": MobileNetV1ImageProcessor(size={"shortest_edge": 46}, crop_size={"height": 38, "width": 38}),
    "bit": BitImageProcessor(size={"shortest_edge": 46}, crop_size={"height": 40, "width": 40}),
    # PoolFormer: shortest edge to int(40 / 0.8) = 50, centre crop 36 (not the edge, unlike ConvNeXt's).
    "poolformer": PoolFormerImageProcessor(
        size={"shortest_edge": 40}, crop_pct=0.8, crop_size={"height": 36, "width": 36}, resample=3
    ),
    # ... also from 384 px on (no ConvNeXt-style switch to a warp).
    "poolformer_large": PoolFormerImageProcessor(
        size={"shortest_edge": 400}, crop_pct=0.96, crop_size={"height": 384, "width": 384}
    ),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_preprocessing_follows_the_image_processor(name: str, tmp_path: Path) -> None:
    model = MODELS["resnet_bottleneck"]()
    model.save_pretrained(tmp_path)
    PROCESSORS[name].save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), pretrained=False)
    config = timm.data.resolve_model_data_config(loaded.model)
    ours = timm.data.create_transform(**config, is_training=False)(_photo())
    # transformers' PIL backend resizes with PIL, as timm's transforms do.
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    theirs = processor(_photo(), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()


def test_saved_model_loads_with_the_same_logits(tmp_path: Path) -> None:
    model = tiny_efficientnet(num_labels=10).eval()  # as many classes as the digits
    model.save_pretrained(tmp_path, safe_serialization=True)
    EfficientNetImageProcessor(size={"height": 36, "width": 36}).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert (loaded.source, loaded.architecture) == ("local", "EfficientNetForImageClassification")
    assert type(loaded.model) is EfficientNetForImageClassification
    images, _ = images_and_labels(n=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images.float()).logits, model(images.float()).logits, rtol=0, atol=0)
    data = open_eval_data(loaded.model, DataOptions(dataset="digits", batch_size=4, workers=0))
    assert data.data_config["input_size"] == (3, 36, 36)
    batch, labels = next(iter(data.batches))
    assert batch.shape == (4, 3, 36, 36)
    result = flatscan.scan(loaded.model, [(batch, labels)], device="cpu")
    assert result.family == "efficientnet" and result.n_samples == 4


def test_hub_repo_loads_with_its_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS["convnext"]().eval()
    model.save_pretrained(tmp_path / "repo")
    ConvNextImageProcessor(size={"shortest_edge": 44}, crop_pct=0.9).save_pretrained(tmp_path / "repo")
    with HubServer() as hub:
        hub.patch(monkeypatch, tmp_path / "hf-cache")
        commit = hub.add_repo("test-org/tiny-convnext", tmp_path / "repo", library_name="transformers")
        (tmp_path / "repo" / "preprocessor_config.json").unlink()
        hub.add_repo("test-org/no-processor", tmp_path / "repo", library_name="transformers")
        loaded = load_model("test-org/tiny-convnext")
        assert (loaded.name, loaded.source, loaded.revision) == ("hf-hub:test-org/tiny-convnext", "hub", commit)
        bare = load_model("test-org/no-processor")
    images, _ = images_and_labels(n=2)
    for found in (loaded, bare):
        with torch.no_grad():
            torch.testing.assert_close(found.model(images.float()).logits, model(images.float()).logits, rtol=0, atol=0)
    assert timm.data.resolve_model_data_config(loaded.model)["input_size"] == (3, 44, 44)
    assert timm.data.resolve_model_data_config(bare.model)["input_size"] == (3, 224, 224)  # timm's default
    offline = load_model("test-org/tiny-convnext", offline=True)  # the processor config came into the cache too
    assert timm.data.resolve_model_data_config(offline.model)["crop_pct"] == 0.9
    assert "input_size" not in load_model("test-org/no-processor", offline=True).model.pretrained_cfg


def test_transformers_problems_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS["resnet_bottleneck"]()
    model.save_pretrained(tmp_path)
    messages = []
    with pytest.raises(
        ModelLoadError, match=r"do not fit ResNetForImageClassification: shapes differ: classifier"
    ) as e:
        load_model(str(tmp_path), num_classes=3)
    messages.append(str(e.value))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": ["ViTForImageClassification"]}))
    with pytest.raises(
        ModelLoadError, match=r"transformers ViTForImageClassification, which flatscan has no adapter"
    ) as e:
        load_model(str(tmp_path))
    messages.append(str(e.value))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'flatscan\[transformers\]'") as e:
        load_model(str(tmp_path))
    messages.append(str(e.value))
    assert not any("\n" in message for message in messages), messages
