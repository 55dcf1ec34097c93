"""The `flatscan describe` command, through typer's runner and as an installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flatscan.cli import app

runner = CliRunner()


def test_describe_prints_the_normalised_head_as_json() -> None:
    result = runner.invoke(app, ["describe", "test_resnet", "--random-init", "--json"])
    assert result.exit_code == 0, result.output
    head = json.loads(result.stdout)
    assert head["model"] == "test_resnet"
    assert head["feature_layer"] == "layer4.0.conv2"
    assert head["activation"] == "relu" and head["head_type"] == "linear"


def test_describe_refusal_is_one_line_with_the_reason() -> None:
    result = runner.invoke(app, ["describe", "convit_tiny", "--random-init"])
    assert result.exit_code == 3
    assert "unsupported: convit_tiny:" in result.stderr and "vision transformer" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_model_is_a_clear_error() -> None:
    result = runner.invoke(app, ["describe", "no_such_net"])
    assert result.exit_code == 2
    assert "unknown timm model 'no_such_net'" in result.stderr


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "flatscan"  # where pip puts the environment's console scripts
    assert exe.exists(), f"no console script at {exe}"
    out = subprocess.run(
        [str(exe), "describe", "test_convnext", "--random-init", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["head_type"] == "general"
