"""Loading transformers image classifiers (``save_pretrained`` directories): the model, weights checked strictly, and
its image processor's preprocessing as a timm data config. transformers is imported only when such a model loads."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from flatscan.io.errors import ModelLoadError
from flatscan.io.messages import few, first_line
from flatscan.registry import list_adapters

# A transformers repo's image processor settings: its preprocessing.
PREPROCESSOR = "preprocessor_config.json"
_NO_PROCESSOR = (
    f"fix or remove its {PREPROCESSOR} (without one, timm's default preprocessing applies, which --img-size, "
    "--crop-pct, --interpolation, --mean and --std override)"
)
# transformers' ``resample`` (PIL filter numbers) as timm interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def transformers_architecture(config: Any) -> str | None:
    """The model class a transformers config.json names in ``architectures``, else None."""
    names = config.get("architectures") if isinstance(config, dict) else None
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def build_transformers(
    directory: Path, where: str, arch: str, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, str]:
    """The transformers classifier ``arch`` in ``directory``, weights from safetensors (or torch.load with
    weights_only=True) loaded strictly, preprocessing from its preprocessor_config.json as ``model.pretrained_cfg``."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            f"{where} is not a timm model but a transformers {arch}: install flatscan's transformers extra, "
            "pip install 'flatscan[transformers]'"
        ) from None
    supported = sorted(
        {cls.__name__ for a in list_adapters() for cls in a.model_types if cls.__module__.startswith("transformers.")}
    )
    if arch not in supported:
        raise ModelLoadError(
            f"{where} is not a timm model but a transformers {arch}, which flatscan has no adapter for "
            f"(it reads the transformers {', '.join(supported)})"
        )
    local = {"trust_remote_code": False, "local_files_only": True}
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(
                directory, **local, **({} if num_classes is None else {"num_labels": num_classes})
            )
            if weights is None:
                model = transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
            else:
                # Mismatched shapes are collected (not raised) so that the error below names them on one line.
                model, info = transformers.AutoModelForImageClassification.from_pretrained(
                    directory, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **local
                )
            has_processor = (directory / PREPROCESSOR).is_file()
            processor = transformers.AutoImageProcessor.from_pretrained(directory, **local) if has_processor else None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(
            f"cannot load {where} ({arch}) with transformers ({first_line(error)}): re-export or re-download it"
        ) from None
    if weights is not None:
        wrong = [f"{key} {tuple(saved)} vs {tuple(built)}" for key, saved, built in sorted(info["mismatched_keys"])]
        problems = [
            f"{kind} {few(sorted(info[f'{kind}_keys']), 3)}"
            for kind in ("missing", "unexpected")
            if info[f"{kind}_keys"]
        ]
        problems += [f"shapes differ: {few(wrong, 3)}"] if wrong else []
        if problems:
            raise ModelLoadError(
                f"the weights in {directory} do not fit {arch}: {'; '.join(problems)}; check that they were saved "
                "from it"
            )
    # timm's place for a model's preprocessing, which flatscan.io.data resolves (timm.data.resolve_model_data_config).
    model.pretrained_cfg = {"architecture": arch, "num_classes": model.config.num_labels}
    if processor is not None:
        model.pretrained_cfg |= _processor_data_config(processor, where)
    return model.eval(), arch


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers without its progress bars and load reports (flatscan reports a mismatch itself)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _processor_data_config(processor: Any, where: str) -> dict[str, Any]:
    """timm data-config entries that resize, crop and normalise as the transformers image ``processor`` does."""
    size = processor.size  # a dict (transformers 5: a SizeDict, which reads the same)
    edge, resized = size.get("shortest_edge"), (size.get("height"), size.get("width"))
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    if (
        not processor.do_resize
        or getattr(processor, "rescale_offset", False)
        or (processor.do_rescale and not math.isclose(processor.rescale_factor, 1 / 255))
    ):
        raise ModelLoadError(
            f"the image processor of {where} ({type(processor).__name__}) does not resize, or rescales pixels other "
            f"than to [0, 1]: flatscan cannot reproduce it; {_NO_PROCESSOR}"
        )
    scaled = getattr(processor, "crop_pct", None)
    if edge and scaled and crop is None:
        # ConvNeXt's processor (ResNet, RegNet, ConvNeXt): below 384 px it resizes the shortest edge to
        # int(edge / crop_pct) and crops edge x edge, as timm does; from 384 px on it resizes to edge x edge.
        height, width = edge, edge
        crop_pct, crop_mode = (processor.crop_pct, "center") if edge < 384 else (1.0, "squash")
    elif edge and crop is not None:
        # Resize the shortest edge (PoolFormer's processor: to int(edge / crop_pct)), crop (MobileNetV1/V2, BiT).
        height, width = crop["height"], crop["width"]
        crop_pct, crop_mode = _crop_pct(height, int(edge / scaled) if scaled else edge), "center"
    elif all(resized) and not scaled:  # resize to height x width, aspect ratio not kept (EfficientNet), crop
        height, width = (crop["height"], crop["width"]) if crop is not None else resized
        crop_pct, crop_mode = _crop_pct(height, resized[0]), "squash"
    else:
        raise ModelLoadError(
            f"the image processor of {where} ({type(processor).__name__}) resizes to {_size_text(size)}: flatscan "
            f"cannot reproduce it; {_NO_PROCESSOR}"
        )
    mean: tuple[float, ...] = (0.0,) * 3
    std: tuple[float, ...] = (1.0,) * 3
    if processor.do_normalize:
        mean, std = (_channels(processor.image_mean), _channels(processor.image_std))
    if getattr(processor, "include_top", False):  # EfficientNet's processor divides by the std a second time
        std = tuple(s * s for s in std)
    return {
        "input_size": (3, height, width),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "interpolation": _RESAMPLE.get(getattr(processor, "resample", None), "bilinear"),  # type: ignore[arg-type]
        "mean": mean,
        "std": std,
    }


def _size_text(size: Any) -> str:
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return ", ".join(f"{key}={size.get(key)}" for key in keys if size.get(key)) or "nothing"


def _crop_pct(crop: int, resized: int) -> float:
    """The crop_pct for which timm resizes to ``resized`` = floor(crop / crop_pct) before cropping ``crop``."""
    crop_pct = crop / resized
    while math.floor(crop / crop_pct) < resized:  # crop / (crop / resized) can round to just below ``resized``
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def _channels(values: Any) -> tuple[float, float, float]:
    values = [float(v) for v in values] if isinstance(values, (list, tuple)) else [float(values)]
    return tuple(values * 3 if len(values) == 1 else values)  # type: ignore[return-value]
