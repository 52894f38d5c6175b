"""The installed-tool route (issue 12): build the wheel, install it into a fresh virtual
environment and use it from an empty folder, then the same with a third-party plugin package.

The fresh environment does not reinstall torch (gigabytes): a ``.pth`` file puts the running
interpreter's site-packages (the project's ``.venv``) after its own, so the dependencies are
found there while ``fewshot_nsl`` itself comes from the wheel (checked: ``fewshot_nsl.__file__``
is inside the fresh environment; a ``.pth`` path is not scanned for further ``.pth`` files, so the
checkout's editable finder does not leak in). Everything is offline: ``pip wheel --no-deps
--no-build-isolation --no-index`` with the setuptools of the running environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

import fewshot_nsl

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PACKAGE = Path(__file__).resolve().parent / "plugin_package"
#: What the wheel is built from (a copy: an in-tree build would write build/ and *.egg-info here).
SOURCES = ["pyproject.toml", "README.md", "fewshot_nsl", "baselines", "configs", "episodes"]
SMOKE = ["--profile", "smoke", "--n-episodes", "5", "--image-size", "32", "--threads", "1",
         "--set", "episodic.steps=2", "--json", "--quiet"]


def _run(cmd: List[str], cwd: Path, env: Dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _copy_sources(src: Path, dst: Path, names: List[str]) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    dst.mkdir(parents=True)
    for name in names:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dst / name, ignore=ignore)
        else:
            shutil.copy2(path, dst / name)
    return dst


def _build_wheel(src: Path, out: Path, env: Dict[str, str]) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)], cwd=src, env=env)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def env() -> Dict[str, str]:
    """Subprocess environment: offline pip, no PYTHONPATH, the session's hermetic cache."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory, env) -> Dict[str, Path]:
    """The fewshot-nsl wheel installed into a fresh virtual environment."""
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(REPO, base / "src", SOURCES)
    wheel = _build_wheel(src, base / "dist", env)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=env)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=base, env=env).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "fewshot_nsl_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # --ignore-installed: the checkout's editable install is visible through the .pth; never touch it
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         cwd=base, env=env)
    empty = base / "work"
    empty.mkdir()
    return {"base": base, "wheel": wheel, "venv": venv, "py": py, "purelib": purelib, "bin": venv / "bin",
            "work": empty}


def _site_files(purelib: Path) -> List[str]:
    return sorted(str(p.relative_to(purelib)) for p in purelib.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_wheel_carries_baselines_configs_episodes(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = {f"fewshot_nsl/{p.relative_to(REPO / 'fewshot_nsl').as_posix()}"
                for p in (REPO / "fewshot_nsl").rglob("*.py") if "__pycache__" not in p.parts}
    for folder, pattern in (("baselines", "*.py"), ("configs", "**/*.yaml"), ("episodes", "**/*.json")):
        expected |= {f"fewshot_nsl/{folder}/{p.relative_to(REPO / folder).as_posix()}"
                     for p in (REPO / folder).glob(pattern)}
    expected |= {f"fewshot_nsl/data/miniimagenet_ravi/{n}.csv" for n in ("train", "val", "test")}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing[:10]}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert "[fewshot_nsl.methods]" in text and "protonet = fewshot_nsl.baselines.protonet" in text


def test_installed_copy_is_the_wheel_not_the_checkout(installed, env):
    code = ("import fewshot_nsl, fewshot_nsl.registry as r, fewshot_nsl.config as c, fewshot_nsl.data.episodes as e; "
            "print(fewshot_nsl.__file__); print(r.BASELINES_DIR); print(c.CONFIG_DIR); print(e.EPISODES_DIR)")
    out = _run([str(installed["py"]), "-c", code], cwd=installed["work"], env=env).stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(installed["venv"].resolve()), (path, out)
    version = _run([str(installed["bin"] / "fewshot-nsl"), "--version"], cwd=installed["work"], env=env).stdout
    assert version.strip() == f"fewshot-nsl {fewshot_nsl.__version__}"
    version = _run([str(installed["py"]), "-m", "fewshot_nsl", "--version"], cwd=installed["work"], env=env).stdout
    assert version.strip() == f"python -m fewshot_nsl {fewshot_nsl.__version__}"
    bad = subprocess.run([str(installed["bin"] / "fewshot-nsl"), "--bogus"], cwd=installed["work"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("see fewshot-nsl --help"), bad.stderr


def test_list_and_a_smoke_cell_from_an_empty_folder(installed, env):
    work, tool = installed["work"], str(installed["bin"] / "fewshot-nsl")
    site_before = _site_files(installed["purelib"])
    listed = _run([tool, "--list"], cwd=work, env=env).stdout
    for name in ("protonet", "nearest_neighbor", "maml", "dynamic_nsn", "cnn4", "glyphs"):
        assert name in listed, listed
    proc = _run([tool, "--method", "protonet", *SMOKE], cwd=work, env=env)
    (row,) = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert row["method"] == "protonet" and row["episodes"] == 5 and row["profile"] == "smoke"
    assert row["version"] == fewshot_nsl.__version__ and row["git_commit"] is None  # installed: no commit
    assert row["episode_list"] == "episodes/glyphs/test_5w5s15q_600_seed0.json"  # the committed list, from the wheel
    run = work / "results" / "runs" / row["run_id"]
    for name in ("summary.json", "episodes.csv", "training_curve.csv", "training_curves.png"):
        assert (run / name).is_file(), name
    assert (work / "results" / "leaderboard.csv").is_file()
    assert _site_files(installed["purelib"]) == site_before, "the run wrote into site-packages"


def test_third_party_plugin_package_by_entry_point(installed, env):
    work, tool = installed["work"], str(installed["bin"] / "fewshot-nsl")
    src = _copy_sources(PLUGIN_PACKAGE, installed["base"] / "plugin_src",
                        [p.name for p in PLUGIN_PACKAGE.iterdir() if p.name not in ("build", "__pycache__")])
    wheel = _build_wheel(src, installed["base"] / "plugin_dist", env)
    _run([str(installed["py"]), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
          str(wheel)], cwd=installed["base"], env=env)
    listed = _run([tool, "--list"], cwd=work, env=env).stdout
    assert "demo_centroid" in listed and "Demo plugin (third-party package)" in listed, listed
    proc = _run([tool, "--method", "demo_centroid", *SMOKE], cwd=work, env=env)
    (row,) = json.loads(proc.stdout)
    assert row["method"] == "demo_centroid" and row["episodes"] == 5


def test_pyproject_lists_every_subpackage():
    """``packages`` in pyproject.toml is explicit (the package-dir mapping needs it): a new sub-package
    of fewshot_nsl must be added there, or the wheel would lack it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "fewshot_nsl").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    mapped = {f"fewshot_nsl.{name}" for name in ("baselines", "configs", "episodes")}
    assert listed == found | mapped, f"pyproject.toml [tool.setuptools] packages: add {sorted(found - listed)}"
