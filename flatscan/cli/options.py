"""Option definitions shared by the commands, declared once: the model source, the run settings, and the 14 data
options that :func:`with_data_options` adds to a command as one ``DataOptions``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

ModelName = Annotated[
    str | None,
    typer.Argument(
        help="timm name (resnet50, resnet50.a1_in1k), Hub id (hf-hub:timm/resnet50.a1_in1k), or a local dir"
    ),
]
Checkpoint = Annotated[Path | None, typer.Option(help="local weights file (.safetensors / .pth) for --arch")]
Arch = Annotated[str | None, typer.Option(help="timm architecture of --checkpoint")]
Offline = Annotated[bool, typer.Option("--offline", help="load from the local cache only (also HF_HUB_OFFLINE=1)")]
RandomInit = Annotated[bool, typer.Option("--random-init", help="build the architecture without loading weights")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
DatasetOpt = Annotated[
    str | None, typer.Option(help="digits (built in), a HF dataset id, an image folder, or parquet/arrow files")
]
ConfigOpt = Annotated[str | None, typer.Option(help="HF dataset config")]
SplitOpt = Annotated[str | None, typer.Option(help="dataset split (default: validation, test, then train)")]
ImageColumnOpt = Annotated[str | None, typer.Option(help="image column (default: auto-detect)")]
LabelColumnOpt = Annotated[str | None, typer.Option(help="label column (default: auto-detect)")]
ClassMapOpt = Annotated[Path | None, typer.Option(help="file mapping dataset labels to model classes")]
ImgSizeOpt = Annotated[int | None, typer.Option(help="input size (default: the model's pretrained config)")]
CropPctOpt = Annotated[float | None, typer.Option(help="center-crop fraction")]
InterpolationOpt = Annotated[str | None, typer.Option(help="resize interpolation (bilinear, bicubic, ...)")]
MeanOpt = Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation mean")]
StdOpt = Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation std")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1)]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="data loading processes")]
NumSamplesOpt = Annotated[int | None, typer.Option(min=1, help="stop after this many images")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="mixed-precision forward pass (the measure stays >= fp32)")]
SeedOpt = Annotated[int, typer.Option(help="seed for data order and splits")]
UntilSeOpt = Annotated[float | None, typer.Option(help="stop once the relative standard error of kappa is below this")]
TraceOnlyOpt = Annotated[bool, typer.Option("--trace-only", help="measure Tr(H) only (skip kappa)")]
KappaRtolOpt = Annotated[
    float | None,
    typer.Option(
        min=0,
        max=1,
        help="compute kappa over the likeliest classes only, the rest certified within this fraction of their part "
        "(the bound is printed beside kappa; default: all classes, exact)",
    ),
]
PresetOpt = Annotated[str, typer.Option(help="demo (10 models, a minute) or study (64 models)")]
ZooSizeOpt = Annotated[int | None, typer.Option("--size", min=1, help="number of models (default: the preset's)")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="training epochs of every model (default: the grid's)")]

# The fields of flatscan.io.data.DataOptions as command-line options: (name, option, default).
DATA_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("dataset", DatasetOpt, None),
    ("config", ConfigOpt, None),
    ("split", SplitOpt, None),
    ("image_column", ImageColumnOpt, None),
    ("label_column", LabelColumnOpt, None),
    ("class_map", ClassMapOpt, None),
    ("img_size", ImgSizeOpt, None),
    ("crop_pct", CropPctOpt, None),
    ("interpolation", InterpolationOpt, None),
    ("mean", MeanOpt, None),
    ("std", StdOpt, None),
    ("batch_size", BatchSizeOpt, 64),
    ("workers", WorkersOpt, 4),
    ("seed", SeedOpt, 0),
)


def with_data_options(seed_before: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator: the command with the data options (:data:`DATA_OPTIONS`) in place of its ``data`` parameter, which
    receives them as one ``DataOptions`` (imported when the command runs); ``--seed`` goes before ``seed_before``."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        options = {
            name: inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=option)
            for name, option, default in DATA_OPTIONS
        }
        seed = options.pop("seed")
        parameters: list[inspect.Parameter] = []
        for parameter in inspect.signature(command).parameters.values():
            if parameter.name == "data":
                parameters += options.values()
                continue
            if parameter.name == seed_before:
                parameters.append(seed)
            annotation = parameter.annotation  # the command module's own names, evaluated as Typer needs them
            if isinstance(annotation, str):
                annotation = eval(annotation, command.__globals__)
            parameters.append(parameter.replace(annotation=annotation))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            from flatscan.io.data import DataOptions

            values = {name: kwargs.pop(name) for name, _, _ in DATA_OPTIONS}
            command(data=DataOptions(**values), **kwargs)

        wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters} | {"return": None}
        del wrapper.__wrapped__  # Typer must read the signature above, not the command's
        return wrapper

    return decorate
