"""The ``compile: auto|on|off`` setting (fewshot_nsl.compiling): resolution, config and CLI handling, identity."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot_nsl import compiling
from fewshot_nsl.config import RunConfig, resolve_config
from fewshot_nsl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Plain(nn.Module):
    pass


class ThroughHigher(nn.Module):
    compilable = False


def test_off_never_compiles_and_auto_is_eager_on_cpu():
    assert compiling.resolve("off", CPU, Plain())[0] is False
    assert compiling.resolve("off", CUDA, Plain())[0] is False
    ok, why = compiling.resolve("auto", CPU, Plain())
    assert not ok and "eager on CPU" in why


def test_on_compiles_on_cpu_when_a_compiler_is_there(monkeypatch):
    monkeypatch.setattr(compiling, "backend_problem", lambda device: None)
    assert compiling.resolve("on", CPU, Plain())[0] is True
    assert compiling.resolve("auto", CUDA, Plain())[0] is True


def test_on_without_backend_says_why_and_runs_eager(monkeypatch):
    monkeypatch.setattr(compiling, "backend_problem", lambda device: "no C++ compiler on PATH")
    ok, why = compiling.resolve("on", CPU, Plain())
    assert not ok and "no C++ compiler on PATH; running eager" in why
    assert compiling.resolve("auto", CUDA, Plain())[0] is False


def test_methods_adapting_through_higher_stay_eager(monkeypatch):
    monkeypatch.setattr(compiling, "backend_problem", lambda device: None)
    ok, why = compiling.resolve("on", CPU, ThroughHigher())
    assert not ok and "ThroughHigher" in why and "higher" in why
    assert compiling.resolve("auto", CUDA, ThroughHigher())[0] is False


def test_cpu_backend_problem_names_the_missing_compiler(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in compiling.backend_problem(CPU)


def test_setting_values_yaml_booleans_and_bad_values(tmp_path):
    assert compiling.normalise_setting(True) == "on" and compiling.normalise_setting(False) == "off"
    with pytest.raises(ConfigError, match="compile must be one of auto, on, off"):
        compiling.normalise_setting("fast")
    assert resolve_config({"compile": False}).compile == "off"  # what YAML makes of `compile: off`
    with pytest.raises(ConfigError, match="compile must be one of"):
        resolve_config({"compile": "yes please"})
    (tmp_path / "c.yaml").write_text("compile: on\n")
    assert resolve_config({}, str(tmp_path / "c.yaml")).compile == "on"


def test_compile_is_not_part_of_what_a_row_is():
    assert RunConfig(compile="on").hash() == RunConfig(compile="off").hash() == RunConfig().hash()


def test_compile_in_place_keeps_parameter_names():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    names = list(net.state_dict())
    compiling.compile_in_place(net)
    assert compiling.is_compiled(net) and list(net.state_dict()) == names


def test_cli_refuses_an_unknown_compile_value_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run_benchmarks.py"), "--method", "protonet", "--compile", "fast",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "invalid choice: 'fast'" in out.stderr and "Traceback" not in out.stderr
