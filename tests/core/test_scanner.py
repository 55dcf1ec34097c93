"""Scanner behaviour: streaming, limits, errors, hooks, devices, dtypes, the adapter consistency check."""

from __future__ import annotations

import pytest
import timm
import torch
from hessian_reference import randomise_norms, relative_error
from torch import nn

import flatscan
from flatscan.contract import NormalisedHead, Tap, batchnorm_scale
from flatscan.flatness import Activation

CLASSES = 8


def small_resnet(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=CLASSES, channels=(8, 8, 8, 12))
    randomise_norms(model, torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def make_batches(n_batches: int = 3, size: int = 4):
    generator = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(size, 3, 32, 32, generator=generator, dtype=torch.float64),
            torch.randint(0, CLASSES, (size,), generator=generator),
        )
        for _ in range(n_batches)
    ]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_result_fields_and_dict() -> None:
    model = small_resnet()
    result = flatscan.scan(model, make_batches(), device="cpu")
    record = result.to_dict()
    assert record["n_samples"] == 12
    assert record["feature_layer"] == "layer4.0.conv2"
    assert record["family"] == "resnet" and record["activation"] == "relu" and record["head_type"] == "linear"
    assert 0.0 <= record["accuracy"] <= 1.0
    assert record["trace_se"] > 0 and record["relative_flatness_se"] > 0
    logits = torch.cat([model(x) for x, _ in make_batches()])
    labels = torch.cat([y for _, y in make_batches()])
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert relative_error(result.loss, expected_loss) <= 1e-12
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    top5 = (logits.argsort(1, descending=True)[:, :5] == labels[:, None]).any(1).double().mean().item()
    assert result.accuracy_top5 == pytest.approx(top5) and result.accuracy_top5 >= result.accuracy


def test_max_samples_truncates_the_stream() -> None:
    batches = make_batches()
    consumed = []

    def stream():
        for item in batches:
            consumed.append(1)
            yield item

    result = flatscan.scan(small_resnet(), stream(), device="cpu", max_samples=6)
    assert result.n_samples == 6
    assert len(consumed) == 2  # the third batch is never pulled
    first_six = [batches[0], (batches[1][0][:2], batches[1][1][:2])]
    assert result.trace == pytest.approx(flatscan.scan(small_resnet(), first_six, device="cpu").trace, rel=1e-12)


def test_trace_only_gives_the_same_trace() -> None:
    full = flatscan.scan(small_resnet(), make_batches(), device="cpu")
    trace_only = flatscan.scan(small_resnet(), make_batches(), device="cpu", trace_only=True)
    assert trace_only.relative_flatness is None and trace_only.relative_flatness_se is None
    assert relative_error(trace_only.trace, full.trace) <= 1e-12


def test_float32_model_agrees_with_float64() -> None:
    exact = flatscan.scan(small_resnet(torch.float64), make_batches(), device="cpu")
    batches32 = [(x.float(), y) for x, y in make_batches()]
    single = flatscan.scan(small_resnet(torch.float32), batches32, device="cpu")
    assert relative_error(single.trace, exact.trace) < 1e-4
    assert relative_error(single.relative_flatness, exact.relative_flatness) < 1e-4


def test_label_outside_classes_is_a_clear_error_and_hooks_are_removed() -> None:
    model = small_resnet()
    model.train()
    images, labels = make_batches(1)[0]
    labels[2] = CLASSES + 3
    with pytest.raises(flatscan.ScanError, match=f"label {CLASSES + 3} is outside the model's {CLASSES} classes"):
        flatscan.scan(model, [(images, labels)], device="cpu")
    assert hook_count(model) == 0
    assert model.training  # the caller's mode is restored, even on error


def test_no_samples_is_an_error() -> None:
    with pytest.raises(flatscan.ScanError, match="no samples"):
        flatscan.scan(small_resnet(), [], device="cpu")
    with pytest.raises(ValueError, match="max_samples must be positive"):
        flatscan.scan(small_resnet(), make_batches(), device="cpu", max_samples=0)


def test_huge_finite_weights_are_not_taken_for_nan() -> None:
    # The weight check sums each tensor in float64; these sum to inf though every value is finite.
    model = small_resnet()
    model.register_buffer("unused", torch.full((4,), 1e308, dtype=torch.float64))
    assert flatscan.scan(model, make_batches(1), device="cpu").n_samples == 4
    model.unused[1] = float("inf")
    with pytest.raises(flatscan.NonFiniteValue, match=r"the model's unused holds 1 NaN/Inf value\(s\) of 4"):
        flatscan.scan(model, make_batches(1), device="cpu")


def test_scan_keeps_no_autograd_graph_and_restores_mode() -> None:
    model = small_resnet()
    model.train()
    flatscan.scan(model, make_batches(1), device="cpu")
    assert model.training
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


class WrongActivationNet(nn.Module):
    """conv -> bn -> ReLU -> GAP -> fc, described by a (wrong) adapter as having no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


@flatscan.register("wrong-activation", WrongActivationNet)
def describe_wrongly(model: WrongActivationNet) -> NormalisedHead:
    return NormalisedHead(
        feature_layer="conv",
        pre_activation=Tap("act", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=batchnorm_scale(model.bn, "bn"),
        activation=Activation("identity"),
        classifier="fc",
    )


def test_a_wrong_adapter_is_caught_before_measuring() -> None:
    model = WrongActivationNet().double()
    with pytest.raises(flatscan.UnsupportedModel, match="is not the average of identity"):
        flatscan.scan(model, make_batches(1), device="cpu")
    assert hook_count(model) == 0


def test_registered_adapters_cover_the_first_families() -> None:
    families = {adapter.family for adapter in flatscan.list_adapters()}
    assert {"resnet", "efficientnet", "convnext"} <= families


def test_on_batch_sees_the_running_result_and_can_stop() -> None:
    seen: list[int] = []

    def stop_after_two(running: flatscan.ScanResult) -> bool:
        seen.append(running.n_samples)
        return len(seen) == 2

    result = flatscan.scan(small_resnet(), make_batches(), device="cpu", on_batch=stop_after_two)
    assert seen == [4, 8]
    assert result.n_samples == 8


def test_ctrl_c_keeps_the_partial_result() -> None:
    batches = make_batches()

    def interrupted_stream():
        yield from batches[:2]
        raise KeyboardInterrupt

    model = small_resnet()
    with pytest.raises(flatscan.ScanInterrupted, match="interrupted after 8 samples") as info:
        flatscan.scan(model, interrupted_stream(), device="cpu")
    partial = info.value.partial
    assert partial is not None and partial.n_samples == 8
    assert partial.trace == pytest.approx(flatscan.scan(small_resnet(), batches[:2], device="cpu").trace, rel=1e-12)
    assert hook_count(model) == 0


def test_amp_forward_keeps_the_measure_close() -> None:
    batches32 = [(x.float(), y) for x, y in make_batches()]
    exact = flatscan.scan(small_resnet(torch.float32), batches32, device="cpu")
    amp = flatscan.scan(small_resnet(torch.float32), batches32, device="cpu", amp=True)
    # bfloat16 keeps ~3 significant digits of each activation.
    assert relative_error(amp.relative_flatness, exact.relative_flatness) < 5e-2
    assert relative_error(amp.trace, exact.trace) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    batches32 = [(x.float(), y) for x, y in make_batches()]
    cpu = flatscan.scan(small_resnet(torch.float32), batches32, device="cpu")
    gpu = flatscan.scan(small_resnet(torch.float32), batches32, device="cuda")
    assert gpu.device.startswith("cuda")
    assert relative_error(gpu.trace, cpu.trace) < 1e-3
    assert relative_error(gpu.relative_flatness, cpu.relative_flatness) < 1e-3
