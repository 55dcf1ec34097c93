"""flatscan.io.models: every model source, its errors, offline mode and the Hub revision, against a loopback Hub."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hessian_reference import randomise_norms
from hub_server import HubServer
from huggingface_hub import constants
from timm.models import save_for_hf
from torch import nn

import flatscan
from flatscan.io.models import ModelLoadError, OfflineCacheMiss, load_model

REPO = "test-org/tiny-resnet"
TIMM_REPO = "timm/test_resnet.r160_in1k"  # where timm's registry finds the weights of test_resnet
ROOT = Path(__file__).resolve().parents[2]


def _tiny(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A test_resnet whose every weight and BatchNorm statistic is random (so a wrong load shows)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    randomise_norms(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_same(loaded: nn.Module, reference: nn.Module) -> None:
    assert not loaded.training
    got, expected = loaded.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), reference(_inputs()))


@pytest.fixture(autouse=True)
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A loopback Hub and empty caches for every test, so that none can reach the real Hub."""
    with HubServer() as server:
        server.patch(monkeypatch, tmp_path / "hf-cache")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        yield server


@pytest.fixture
def saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = _tiny()
    save_for_hf(model, tmp_path / "tiny", safe_serialization=True)
    return model, tmp_path / "tiny"


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_local_directory_loads_as_saved(tmp_path: Path, safe: bool) -> None:
    model = _tiny()
    save_for_hf(model, tmp_path / "tiny", safe_serialization=safe)
    loaded = load_model(str(tmp_path / "tiny"))
    assert (loaded.name, loaded.architecture, loaded.source, loaded.revision) == (
        str((tmp_path / "tiny").resolve()),
        "test_resnet",
        "local",
        None,
    )
    _assert_same(loaded.model, model)
    assert tuple(loaded.model.pretrained_cfg["input_size"]) == (3, 160, 160)  # preprocessing from config.json
    assert load_model(f"local-dir:{tmp_path / 'tiny'}").name == loaded.name


def test_names_resolve_to_their_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: HubServer, saved: tuple[nn.Module, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_resnet").mkdir()  # a directory that happens to share a timm name does not shadow it
    assert load_model("test_resnet", pretrained=False).source == "random"
    assert load_model("tiny").name == str(saved[1].resolve())  # a bare directory name that is no timm name
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("tiny/more/deeply")  # a path (two separators), not a Hub id
    assert hub.requests == []


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "training_checkpoint"])
def test_checkpoint_with_arch(tmp_path: Path, form: str) -> None:
    model = _tiny()
    state = model.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(state, path)
    elif form == "state_dict":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    else:  # as timm's train.py writes it: DDP prefixes, its args, and an EMA copy that must not be picked
        path = tmp_path / "checkpoint-3.pth.tar"
        wrapped = {f"module.{key}": value for key, value in state.items()}
        ema = {key: torch.zeros_like(value) for key, value in state.items()}
        torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": wrapped, "state_dict_ema": ema}, path)
    loaded = load_model(checkpoint=path, arch="test_resnet")  # 10 classes, read off the checkpoint's classifier
    assert (loaded.name, loaded.architecture, loaded.source, loaded.revision) == (
        f"test_resnet@{path.resolve()}",
        "test_resnet",
        "checkpoint",
        None,
    )
    _assert_same(loaded.model, model)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_checkpoint_pickling_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    marker, path = tmp_path / "payload-ran", tmp_path / "w.pth"
    torch.save({"state_dict": _tiny().state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(ModelLoadError, match="refusing to unpickle") as info:
        load_model(checkpoint=path, arch="test_resnet")
    assert "io.open" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_corrupt_weights_are_named(tmp_path: Path, saved: tuple[nn.Module, Path]) -> None:
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as info:
        load_model(str(directory))
    assert str(weights) in str(info.value)
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as info:
        load_model(checkpoint=weights, arch="test_resnet")
    assert str(weights) in str(info.value)
    torn = tmp_path / "torn.pth"
    torch.save(_tiny().state_dict(), torn)
    torn.write_bytes(torn.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"cannot read .*torn.pth as weights .*corrupt"):
        load_model(checkpoint=torn, arch="test_resnet")


def test_weights_that_do_not_fit_are_one_line_with_the_keys(tmp_path: Path) -> None:
    state = _tiny().state_dict()
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(checkpoint=path, arch="test_resnet")
    message = str(info.value)
    assert "missing layer1.0.conv1.weight" in message and "unexpected extra.weight" in message
    assert "\n" not in message
    with pytest.raises(ModelLoadError, match=r"shapes differ: fc.weight \(10, 96\) vs \(5, 96\)"):
        load_model(checkpoint=tmp_path / "w.safetensors", arch="test_resnet", num_classes=5)


def test_local_directory_problems(tmp_path: Path, saved: tuple[nn.Module, Path]) -> None:
    _, directory = saved
    (directory / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"has no config.json.*save_for_hf"):
        load_model(str(directory))
    (tmp_path / "config.json").rename(directory / "config.json")
    (directory / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"has no model.safetensors or pytorch_model.bin.*--random-init"):
        load_model(str(directory))
    assert load_model(str(directory), pretrained=False).source == "random"
    (directory / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=r"is not a timm model.*transformers"):
        load_model(str(directory), pretrained=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match=r"is a file: .*--checkpoint"):
        load_model(str(tmp_path / "model.safetensors"))


def test_unknown_names_suggest_timm_names(tmp_path: Path, hub: HubServer) -> None:
    torch.save(_tiny().state_dict(), tmp_path / "w.pth")
    with pytest.raises(ModelLoadError, match=r"unknown timm model 'resnet5o'; did you mean .*resnet50"):
        load_model("resnet5o")
    with pytest.raises(ModelLoadError, match=r"unknown timm model 'tset_resnet'; did you mean test_resnet"):
        load_model(checkpoint=tmp_path / "w.pth", arch="tset_resnet")
    with pytest.raises(ModelLoadError, match=r"no weights 'test_resnet.nope'.*r160_in1k"):
        load_model("test_resnet.nope")
    assert hub.requests == []


def test_random_init_downloads_nothing(hub: HubServer) -> None:
    loaded = load_model("test_resnet", pretrained=False)
    assert (loaded.name, loaded.architecture, loaded.source, loaded.revision) == (
        "test_resnet",
        "test_resnet",
        "random",
        None,
    )
    assert not loaded.model.training and loaded.model.num_classes == 1000
    assert hub.requests == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no model given"),
        ({"checkpoint": "w.pth"}, "--checkpoint needs --arch"),
        ({"arch": "resnet50"}, "--arch goes with --checkpoint"),
        ({"name": "resnet50", "checkpoint": "w.pth", "arch": "resnet50"}, "not both"),
        ({"checkpoint": "w.pth", "arch": "resnet50", "pretrained": False}, "exclude each other"),
        ({"checkpoint": "no/such/file.pth", "arch": "resnet50"}, "does not exist"),
    ],
)
def test_argument_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("switch", ["argument", "environment"])
def test_offline_cache_miss_names_the_repo_and_never_calls_the_hub(
    monkeypatch: pytest.MonkeyPatch, hub: HubServer, saved: tuple[nn.Module, Path], switch: str
) -> None:
    hub.add_repo(REPO, saved[1])
    hub.add_repo(TIMM_REPO, saved[1])
    if switch == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = True if switch == "argument" else None
    start = time.perf_counter()
    with pytest.raises(OfflineCacheMiss) as info:
        load_model(f"hf-hub:{REPO}", offline=offline)
    message = str(info.value)
    assert f"config.json of hf-hub:{REPO} is not in the Hugging Face cache" in message
    assert f"`hf download {REPO} config.json`" in message and "\n" not in message
    with pytest.raises(OfflineCacheMiss, match=f"model.safetensors \\(or pytorch_model.bin\\) of hf-hub:{TIMM_REPO}"):
        load_model("test_resnet", offline=offline)
    assert time.perf_counter() - start < 5
    assert hub.requests == []


def test_offline_cache_miss_for_github_release_weights(hub: HubServer) -> None:
    with pytest.raises(OfflineCacheMiss, match=r"legacy_seresnet18.in1k \(https://github.com/.*\) .*torch hub cache"):
        load_model("legacy_seresnet18.in1k", offline=True)
    assert hub.requests == []


def test_hub_id_and_pinned_revision_in_process(hub: HubServer, saved: tuple[nn.Module, Path]) -> None:
    model, directory = saved
    commit = hub.add_repo(REPO, directory)
    loaded = load_model(REPO)  # owner/name without the hf-hub: prefix
    assert (loaded.name, loaded.architecture, loaded.source, loaded.revision) == (
        f"hf-hub:{REPO}",
        "test_resnet",
        "hub",
        commit,
    )
    _assert_same(loaded.model, model)
    assert ("GET", f"/{REPO}/resolve/main/config.json") in hub.requests
    blob = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert ("GET", f"/{blob}") in hub.requests  # the weights came through the CDN redirect
    pinned = load_model(f"hf-hub:{REPO}@{commit}", offline=True)  # cached now: no request at all
    assert (pinned.name, pinned.revision) == (f"hf-hub:{REPO}@{commit}", commit)
    _assert_same(pinned.model, model)


def test_hub_errors(hub: HubServer, saved: tuple[nn.Module, Path]) -> None:
    bert = json.dumps({"architectures": ["BertModel"], "model_type": "bert"}).encode()
    hub.add_repo("test-org/bert", {"config.json": bert, "model.safetensors": b"0"})
    hub.add_repo("test-org/no-weights", {"config.json": (saved[1] / "config.json").read_bytes()})
    hub.add_repo(REPO, saved[1])
    with pytest.raises(ModelLoadError, match="hf-hub:test-org/missing is not on the Hub, or is private"):
        load_model("hf-hub:test-org/missing")
    with pytest.raises(ModelLoadError, match=r"hf-hub:test-org/bert is not a timm model.*transformers"):
        load_model("test-org/bert")
    with pytest.raises(ModelLoadError, match=r"no-weights has no model.safetensors \(or pytorch_model.bin\)"):
        load_model("test-org/no-weights")
    with pytest.raises(ModelLoadError, match=f"hf-hub:{REPO} has no revision 'v9'"):
        load_model(f"hf-hub:{REPO}@v9")


def test_no_network_is_one_line_that_suggests_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retry backoff (about 23 s)
    with pytest.raises(ModelLoadError) as info:
        load_model(f"hf-hub:{REPO}")
    assert not isinstance(info.value, OfflineCacheMiss)
    message = str(info.value)
    assert f"cannot download config.json of hf-hub:{REPO} from {dead}" in message
    assert "pass --offline" in message and "\n" not in message


_LOAD_SCRIPT = """
import json, sys
import safetensors.torch, torch
from flatscan.io.models import load_model
records = []
for i, name in enumerate(sys.argv[2:]):
    loaded = load_model(name)
    with torch.no_grad():
        logits = loaded.model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    safetensors.torch.save_file({**loaded.model.state_dict(), "LOGITS": logits}, f"{sys.argv[1]}/{i}.safetensors")
    records.append([loaded.name, loaded.architecture, loaded.source, loaded.revision])
print(json.dumps(records))
"""


def test_hub_end_to_end_in_fresh_processes(tmp_path: Path, hub: HubServer, saved: tuple[nn.Module, Path]) -> None:
    """Online, then with HF_HUB_OFFLINE=1 from the cache alone, as a user's process sees the environment."""
    model, directory = saved
    registry_model = _tiny(num_classes=1000, seed=1)
    save_for_hf(registry_model, tmp_path / "registry", safe_serialization=True)
    commit = hub.add_repo(REPO, directory)
    registry_commit = hub.add_repo(TIMM_REPO, tmp_path / "registry")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= hub.env(tmp_path / "hf-home") | {"TORCH_HOME": str(tmp_path / "torch")}
    expected = [
        [f"hf-hub:{REPO}", "test_resnet", "hub", commit],
        ["test_resnet.r160_in1k", "test_resnet", "timm", registry_commit],
    ]
    for phase, extra in (("online", {}), ("offline", {"HF_HUB_OFFLINE": "1"})):
        out = tmp_path / phase
        out.mkdir()
        before = len(hub.requests)
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(out), f"hf-hub:{REPO}", "test_resnet"],
            env=env | extra,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == expected
        for i, reference in enumerate((model, registry_model)):
            tensors = safetensors.torch.load_file(out / f"{i}.safetensors")
            with torch.no_grad():
                assert torch.equal(tensors.pop("LOGITS"), reference(_inputs()))
            assert all(torch.equal(tensors[key], value) for key, value in reference.state_dict().items())
        if phase == "online":
            assert ("HEAD", f"/{TIMM_REPO}/resolve/main/model.safetensors") in hub.requests[before:]
        else:
            assert hub.requests[before:] == []


@pytest.mark.parametrize(("arch", "family"), [("test_nfnet", "nfnet"), ("repvgg_a0", "byobnet")])
def test_models_load_in_their_inference_form(arch: str, family: str) -> None:
    """Weight-standardised and multi-branch layers come materialised and fused, computing the same function."""
    torch.manual_seed(0)
    built = timm.create_model(arch, pretrained=False).eval()
    randomise_norms(built, torch.Generator().manual_seed(0))
    built = built.double()
    with pytest.raises(flatscan.UnsupportedModel, match="inference_form"):
        flatscan.describe(built)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = built(images)
    loaded = load_model(arch, pretrained=False).model
    fused = flatscan.inference_form(built)
    assert flatscan.describe(fused).family == family
    assert flatscan.describe(loaded).family == family
    torch.testing.assert_close(fused(images), expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
