"""The Python API, for notebooks and scripts: run benchmarks, read results and paired comparisons
as DataFrames, and reuse a trained method.

    import fewshot_nsl

    rows = fewshot_nsl.benchmark(method="protonet", shots=[1, 5], dataset="glyphs", profile="smoke",
                                 episodic={"steps": 10}, results_dir="results")
    board = fewshot_nsl.load_results("results")
    stats = fewshot_nsl.compare(board.run_id[0], board.run_id[1], results_dir="results")
    model = fewshot_nsl.load_method("results/runs/<run_id>")
    predictions = model.predict(support_images, support_labels, query_images)
    fewshot_nsl.method_options("maml")   # a method's options, defaults and docs

The exported surface is :data:`__all__`: :func:`benchmark`, :func:`load_results`, :func:`compare`,
:func:`load_method` (:class:`TrainedMethod`) and :func:`method_options`.

:func:`benchmark` does what the command line does (the same configs, run folders, resume and
leaderboard), without printing unless asked. A plugin file (or a module beside it) edited since this
process imported it is imported again before the cells run, so calling :func:`benchmark` again after
an edit runs the new code under its new identity. Input errors raise
:class:`~fewshot_nsl.errors.FewShotError` subclasses with the command line's one-line message.
"""
from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .errors import ConfigError, FewShotError, RegistryError

StrOrList = Union[str, Sequence[str]]
PathOrList = Union[str, Path, Sequence[Union[str, Path]]]

__all__ = ["benchmark", "load_results", "compare", "load_method", "TrainedMethod", "method_options"]


class KeptRowWarning(UserWarning):
    """:func:`benchmark` (with ``log=None``) returned a row that is not on the leaderboard (``on_leaderboard`` is
    False in that row): the cell's leaderboard row was measured on more episodes or seeds and was kept (or another
    run changed that row meanwhile)."""

#: Command-line flags -> the API parameter that does the same (messages raised by the shared code
#: name the flag; :func:`benchmark` re-words them for its caller).
API_NAMES = {
    "--method": "method=", "--backbone": "backbone=", "--shots": "shots=", "--dataset-name": "dataset_name=",
    "--dataset": "dataset=", "--data-root": "data_root=", "--ways": "ways=", "--image-size": "image_size=",
    "--profile": "profile=", "--config": "config=", "--seeds": "seeds=", "--seed": "seed=",
    "--plugins": "plugins=", "--reference": "reference=", "--threads": "threads=", "--results-dir": "results_dir=",
    "--cache-dir": "cache_dir=", "--device": "device=", "--precision": "precision=", "--compile": "compile=",
    "--deterministic": "deterministic=", "--rerun": "rerun=True", "--replace-row": "replace_row=True",
    "--n-episodes": "eval={'episodes': N}", "--queries": "eval={'queries': N}", "--episodes": "episodes_file=",
    "--set": "benchmark(**overrides)",
}
#: A flag, with the value after it when one follows (a number, a quoted text, a path).
_FLAG = re.compile(r"(--[a-z][a-z-]*)(?: ([0-9'\"/.~][^\s;,]*)|( ?))")


def api_message(text: str) -> str:
    """``text`` with the command-line flags it names replaced by :func:`benchmark`'s parameters
    (``--ways 50 is more than ...; lower --ways`` -> ``ways=50 is more than ...; lower ways=``)."""
    def name(m: "re.Match[str]") -> str:
        api = API_NAMES.get(m.group(1))
        if api is None:
            return m.group(0)
        value = m.group(2)
        return f"{api}{value}" if value and api.endswith("=") else f"{api}{m.group(3) or ''}"

    return _FLAG.sub(name, text)


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"benchmark({name}={value!r}): {name} must be {expected}")


def _names(name: str, value: Any, allow_none: bool = True) -> Optional[List[str]]:
    """A name or list of names (``"a,b"``, ``["a", "b"]``) -> list of names.

    Raises:
        ConfigError: naming the parameter.
    """
    if value is None and allow_none:
        return None
    items = _as_list(value) if isinstance(value, (str, list, tuple)) else None
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise _bad(name, value, "a name, a comma-separated string of names or a list of names")
    return [v.strip() for v in items]


def _shots(value: Any) -> Optional[List[int]]:
    """``5``, ``"5"``, ``[1, 5]``, ``"1,5"`` -> ``[1, 5]``.

    Raises:
        ConfigError: anything else (``"five"``, ``1.5``, ``True``, ``0``), naming ``shots=``.
    """
    if value is None:
        return None
    items = _as_list(value)
    out = []
    for v in items or []:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise _bad("shots", value, "positive integers (shots=5, shots=[1, 5] or shots='1,5')")
        out.append(int(v))
    if not out:
        raise _bad("shots", value, "positive integers (shots=5, shots=[1, 5] or shots='1,5')")
    return out


def _paths(name: str, value: Any) -> List[Path]:
    """A folder (str or Path) or a list of them -> list of paths (never the characters of one string).

    Raises:
        ConfigError: naming the parameter.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, (str, Path)) and str(v).strip() for v in items):
        raise _bad(name, value, "a folder (str or pathlib.Path) or a list of folders")
    return [Path(v) for v in items]


def _as_list(value: Any) -> Optional[List[Any]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def benchmark(
    method: StrOrList = "protonet",
    shots: Union[int, Sequence[int], None] = None,
    dataset: Optional[str] = None,
    *,
    backbone: Optional[StrOrList] = None,
    config: Optional[Union[str, Path]] = None,
    seeds: Optional[Sequence[int]] = None,
    plugins: Optional[PathOrList] = None,
    dataset_name: Optional[str] = None,
    reference: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
    rerun: bool = False,
    replace_row: bool = False,
    tracking: Optional[str] = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Run (or resume, or reuse) benchmark cells and return their leaderboard rows.

    Args:
        method: method name(s) (a list, a comma-separated string, or ``"all"``).
        shots: shots (an int or a list: one cell per value); default the config's (5).
        dataset: ``glyphs`` (default), ``miniimagenet`` or ``custom`` (with ``data_root=``).
        backbone: backbone name(s), one cell per value; default the config's (``cnn4``).
        config: a YAML config file, as ``--config``.
        seeds: several training seeds, aggregated into one row per cell, as ``--seeds``.
        plugins: an extra plugin folder (str or Path) or a list of them, as ``--plugins``.
        dataset_name: name of a ``dataset="custom"`` in tables and run folders, as ``--dataset-name``.
        reference: reference method of the paired comparisons (default protonet).
        threads: torch CPU threads, as ``--threads``.
        progress: show progress bars.
        log: where info lines go (default: nowhere).
        rerun: recompute the cells deliberately, as ``--rerun``.
        replace_row: write each cell's row even over a leaderboard row measured on more episodes or seeds, as
            ``--replace-row`` (by default that row is kept and ``log`` says so in one line).
        tracking: ``"mlflow"`` logs every finished run to MLflow, as ``--tracking mlflow``; None (default): no tracker.
        **overrides: config keys over the config file, like ``--set``: top-level keys
            (``ways=5``, ``profile="smoke"``, ``image_size=32``, ``results_dir="results"``,
            ``cache_dir=...``, ``data_root=...``) and sections as dicts
            (``episodic={"steps": 10}``, ``method_options={"inner_lr": 0.05}``,
            ``eval={"episodes": 100}``). Unknown keys and wrong types raise
            :class:`~fewshot_nsl.errors.ConfigError`.

    Returns:
        One row per cell: what this call measured, with the columns of ``leaderboard.csv`` (accuracy, ci95,
        ci95_t, episodes, version, ...) and two more, ``on_leaderboard`` and ``leaderboard_run_id``. A cell's
        row is written to ``<results_dir>/leaderboard.csv`` (``on_leaderboard`` True; the row is returned as
        the leaderboard holds it, paired columns included) unless the leaderboard already holds a row of the
        same experiment measured on more episodes or more seeds: that row is kept (pass ``replace_row=True``
        to replace it), and the row returned is this call's own result with ``on_leaderboard`` False and
        ``leaderboard_run_id`` naming the run(s) of the kept row (read it with :func:`load_results`). Every
        kept row is said once: one line to ``log``, or, with ``log=None``, a :class:`KeptRowWarning`.

    Raises:
        ConfigError: a bad argument, in one line naming this function's parameter (``shots=``,
            ``ways=``), never a command-line flag.
        FewShotError: another input problem (one-line message), or a cell failed at run time.
    """
    try:
        return _benchmark(method, shots, dataset, backbone=backbone, config=config, seeds=seeds, plugins=plugins,
                          dataset_name=dataset_name, reference=reference, threads=threads, progress=progress, log=log,
                          rerun=rerun, replace_row=replace_row, tracking=tracking, **overrides)
    except FewShotError as exc:
        raise type(exc)(api_message(str(exc))) from None


def _benchmark(method: Any, shots: Any, dataset: Any, *, backbone: Any, config: Any, seeds: Any, plugins: Any,
               dataset_name: Any, reference: Any, threads: Any, progress: Any, log: Any, rerun: Any, replace_row: Any,
               tracking: Any = None, **overrides: Any) -> pd.DataFrame:
    """:func:`benchmark` with the command line's messages (re-worded by its caller)."""
    from .config import check_overrides
    from .executors import LocalExecutor
    from .cli import MAX_THREADS
    from .grid import cells_from_args, run_grid
    from .plugins import load_plugins, refresh_plugins

    for key in ("method", "backbone", "shots"):
        if key in overrides:
            raise ConfigError(f"pass {key}= as benchmark()'s own argument")
    methods = _names("method", method, allow_none=False)
    backbones = _names("backbone", backbone)
    shot_list = _shots(shots)
    plugin_dirs = _paths("plugins", plugins)
    for name, value in (("dataset", dataset), ("dataset_name", dataset_name), ("reference", reference)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _bad(name, value, "a name (a non-empty string)")
    if config is not None and (not isinstance(config, (str, Path)) or not str(config).strip()):
        raise _bad("config", config, "a YAML file (str or pathlib.Path)")  # a missing one: load_yaml's line
    if seeds is not None and (isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple))
                              or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in seeds)):
        raise _bad("seeds", seeds, "a list of integers (seeds=[0, 1, 2])")
    for name, value in (("progress", progress), ("rerun", rerun), ("replace_row", replace_row)):
        if not isinstance(value, (bool, np.bool_)):
            raise _bad(name, value, "True or False")
    if log is not None and not callable(log):
        raise _bad("log", log, "a function taking one line of text (e.g. print)")
    if tracking not in (None, "none", "mlflow"):
        raise _bad("tracking", tracking, "'mlflow' or None")
    for name, low in (("ways", 2), ("image_size", 8), ("seed", 0)):
        v = overrides.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
            raise _bad(name, v, f"an integer of at least {low}")
    from .config import PROFILES

    if overrides.get("profile") is not None and overrides["profile"] not in PROFILES:
        raise _bad("profile", overrides["profile"], f"one of {', '.join(PROFILES)}")
    cli: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if dataset is not None:
        cli["dataset"] = dataset
    if dataset_name is not None:
        if dataset not in (None, "custom"):
            raise _bad("dataset_name", dataset_name, f"left out for dataset={dataset!r} (it names a dataset='custom')")
        options = cli.get("dataset_options") if isinstance(cli.get("dataset_options"), dict) else {}
        cli["dataset_options"] = {**options, "label": dataset_name}
    check_overrides(cli, "benchmark()")
    # plugins edited since this process imported them are imported again, so the code that runs is
    # the code on disk, the code the run's identity records
    for folder in refresh_plugins():
        (log or (lambda line: None))(f"plugin folder {folder} changed on disk since it was imported: re-imported")
    load_plugins(plugin_dirs)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise ConfigError(f"benchmark(threads={threads!r}): threads must be an integer in 1..{MAX_THREADS}")
    if backbones and len(backbones) == 1:
        cli["backbone"] = backbones[0]
    if shot_list and len(shot_list) == 1:
        cli["shots"] = shot_list[0]
    cells = cells_from_args(methods, backbones, shot_list)
    result = run_grid(cells, cli, str(config) if config else None, seeds=seeds,
                      executor=LocalExecutor(threads=threads), reference=reference, skip_unregistered=False,
                      progress=progress, log=log or (lambda line: None), fail_fast=False, rerun=rerun,
                      replace_row=replace_row, tracking=None if tracking in (None, "none") else tracking)
    if result.failed:
        from .errors import FewShotError

        names = "; ".join(f"{p.describe()}: {p.error}" for p in result.failed)
        raise FewShotError(f"{len(result.failed)} cell(s) failed: {names}")
    from .cli import results_dir_of_result

    # the folder the cells ran into (a --config file's results_dir included), never a foreign results/
    results_dir = results_dir_of_result(result, Path(cli.get("results_dir") or "results"))
    frame, kept = _grid_rows(result, results_dir)
    if kept and log is None:  # with a log, upsert_row has said it there (one line per kept row)
        from .comparisons import key_text
        from .leaderboard import has_less_evidence, kept_row_line

        for old, new in kept:
            if old is not None and has_less_evidence(new, old):
                line = kept_row_line(old, new, results_dir, replace="replace_row=True")
            else:  # another process wrote (or removed) the cell's row after this call wrote its own
                now = f"run {key_text(old.get('run_id'))}'s" if old is not None else "no row"
                line = (f"leaderboard: {results_dir / 'leaderboard.csv'} holds {now} for {new.get('method')} "
                        f"{new.get('backbone')} {key_text(new.get('ways'))}-way {key_text(new.get('shots'))}-shot on "
                        f"{new.get('dataset')}, not this call's (run {key_text(new.get('run_id'))}): another run "
                        f"changed it meanwhile")
            warnings.warn(f"benchmark(): {line}; the row returned for this cell is this call's result, with "
                          f"on_leaderboard=False", KeptRowWarning, stacklevel=_outside_package_level())
    return frame


def _outside_package_level() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by this module's caller, that names the first frame
    outside the ``fewshot_nsl`` package (the user's call, through ``fewshot_nsl.benchmark`` or ``api.benchmark``)."""
    package = str(Path(__file__).resolve().parent)
    level, frame = 1, inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the function calling warnings.warn
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def grid_rows(result: Any, results_dir: Path) -> pd.DataFrame:
    """The rows of a :class:`~fewshot_nsl.grid.GridResult`'s finished cells, in cell order (what
    :func:`benchmark` returns and ``--json`` prints).

    A cell whose row went onto ``leaderboard.csv`` gives that row as written there (with the paired-comparison
    columns), ``on_leaderboard`` True and ``leaderboard_run_id`` its own ``run_id``. A cell whose row the
    leaderboard kept out (it holds a row of the same experiment measured on more episodes or seeds,
    :func:`fewshot_nsl.leaderboard.has_less_evidence`) gives the run's own row, never the kept one, with
    ``on_leaderboard`` False and ``leaderboard_run_id`` the kept row's ``run_id`` (None where the leaderboard
    holds no row for it, e.g. one removed meanwhile).
    """
    return _grid_rows(result, results_dir)[0]


def _grid_rows(result: Any, results_dir: Path):
    """:func:`grid_rows`, and the ``(the cell's leaderboard row or None, run's row)`` pairs of the cells whose
    row is not on the leaderboard."""
    from .comparisons import key_text
    from .leaderboard import board_row
    from .reporting import read_leaderboard

    rows = [p.row for p in result.cells if p.row is not None]
    if not rows:
        return pd.DataFrame(), []
    board = read_leaderboard(Path(results_dir) / "leaderboard.csv")
    run_ids = board["run_id"].map(key_text) if "run_id" in board.columns else pd.Series("", index=board.index)
    by_run = {r: i for i, r in zip(board.index, run_ids) if r}
    out: List[Dict[str, Any]] = []
    kept: List[Any] = []
    for row in rows:
        run_id = key_text(row.get("run_id"))
        if run_id in by_run:
            out.append({**board.loc[by_run[run_id]].to_dict(), "on_leaderboard": True, "leaderboard_run_id": run_id})
            continue
        old = board_row(board, row)
        out.append({**row, "on_leaderboard": False,
                    "leaderboard_run_id": (key_text(old.get("run_id")) or None) if old is not None else None})
        kept.append((old, row))
    return pd.DataFrame(out).reset_index(drop=True), kept


def load_results(results_dir: Union[str, Path] = "results") -> pd.DataFrame:
    """The leaderboard of a results folder (``<results_dir>/leaderboard.csv``) as a DataFrame.

    Args:
        results_dir: the folder a run wrote (``--results-dir``), or a ``leaderboard.csv`` itself.

    Raises:
        ConfigError: no leaderboard there, or a file the suite did not write.
    """
    from .reporting import read_leaderboard

    path = Path(results_dir)
    path = path if path.suffix == ".csv" else path / "leaderboard.csv"
    if not path.is_file():
        raise ConfigError(f"no leaderboard at {path}; run a benchmark into {path.parent} first")
    return read_leaderboard(path)


def compare(run_a: Union[str, Path], run_b: Union[str, Path], results_dir: Union[str, Path] = "results") -> pd.DataFrame:
    """Paired comparison of two finished runs on their common test episodes (``--compare RUN_A RUN_B``).

    Args:
        run_a: a run id (under ``<results_dir>/runs``) or a run folder.
        run_b: the same for the other run.
        results_dir: the results folder the run ids are in.

    Returns:
        One row: ``run_a``, ``run_b``, their methods, backbones and seeds, ``n_paired`` episodes,
        ``accuracy_a`` / ``ci95_a`` / ``accuracy_b`` / ``ci95_b`` (%, 95% CI), ``diff`` (A - B, points) with
        ``diff_ci95``, ``t_stat``, ``p_value`` (paired t-test), ``p_wilcoxon`` and ``warnings`` (text;
        see :func:`fewshot_nsl.comparisons.compare_stats`).

    Raises:
        ConfigError: a run is missing or unfinished, or the two runs are not one experiment on the same episodes.
    """
    from .comparisons import compare_stats

    for name, value in (("run_a", run_a), ("run_b", run_b), ("results_dir", results_dir)):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ConfigError(f"compare({name}={value!r}): {name} must be a run id or a folder (str or pathlib.Path)")
    stats = compare_stats(str(run_a), str(run_b), Path(results_dir))
    stats["warnings"] = "; ".join(stats["warnings"])
    return pd.DataFrame([stats])


class TrainedMethod:
    """A trained method restored from a run folder (:func:`load_method`), ready to classify new images.

    Attributes:
        method: the :class:`~fewshot_nsl.methods.FewShotMethod` (in eval mode, on ``device``).
        config: the run's resolved :class:`~fewshot_nsl.config.RunConfig`.
        run_dir: the run folder it was loaded from.
        device: where it runs.
    """

    def __init__(self, method: Any, config: Any, run_dir: Path, device: Any, store: Any) -> None:
        from .data.episodes import Materialiser

        self.method, self.config, self.run_dir, self.device = method, config, Path(run_dir), device
        self.image_size = int(config.image_size)
        self._materialiser = Materialiser(store, self.image_size, device)

    def __repr__(self) -> str:
        return f"TrainedMethod({self.config.method}, {self.config.backbone}, {self.image_size} px, from {self.run_dir})"

    def images(self, images: Any, name: str = "images") -> Any:
        """New images -> the normalised float tensor the method takes, ``(N, 3, S, S)`` on :attr:`device`.

        Args:
            images: ``uint8`` RGB images ``(N, H, W, 3)`` (numpy array or tensor, any ``H, W``: resized
                to the run's ``S x S`` as the run's data was), or an already normalised float tensor
                ``(N, 3, S, S)`` (passed through).

        Raises:
            ConfigError: another shape or dtype, naming ``name``.
        """
        import torch

        t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if t.dtype == torch.uint8 and t.ndim == 4 and t.shape[-1] == 3:
            return self._materialiser.to_device(t.contiguous())
        if t.is_floating_point() and t.ndim == 4 and tuple(t.shape[1:]) == (3, self.image_size, self.image_size):
            return t.to(self.device, torch.float32)
        raise ConfigError(f"{name} must be uint8 RGB images (N, H, W, 3) or a normalised float tensor "
                          f"(N, 3, {self.image_size}, {self.image_size}); got {t.dtype} {tuple(t.shape)}")

    def logits(self, support_images: Any, support_labels: Any, query_images: Any) -> Any:
        """Logits ``(n_query, ways)`` of the queries, classes in the order of ``np.unique(support_labels)``."""
        return self._logits(support_images, support_labels, query_images)[0]

    def _logits(self, support_images: Any, support_labels: Any, query_images: Any) -> Any:
        import torch

        from .evaluation import run_episode

        labels = np.asarray(support_labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ConfigError(f"support_labels must be one label per support image, got shape {labels.shape}")
        classes, y = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise ConfigError("support_labels must name at least 2 classes")
        sx, qx = self.images(support_images, "support_images"), self.images(query_images, "query_images")
        if len(sx) != len(labels):
            raise ConfigError(f"{len(sx)} support images but {len(labels)} support labels")
        sy = torch.as_tensor(y, dtype=torch.int64, device=self.device)
        logits = run_episode(self.method, sx, sy, qx, episode=0, split="new", ways=len(classes))
        return logits, classes

    def predict(self, support_images: Any, support_labels: Any, query_images: Any) -> np.ndarray:
        """Classify ``query_images`` from a labelled support set (one new episode).

        Args:
            support_images: ``(n_support, H, W, 3)`` uint8 RGB (or normalised ``(n_support, 3, S, S)`` floats).
            support_labels: ``(n_support,)`` labels of any kind (ints, strings): the episode's classes.
            query_images: ``(n_query, H, W, 3)`` uint8 RGB (or normalised floats).

        Returns:
            ``(n_query,)`` predicted labels, values taken from ``support_labels``.
        """
        logits, classes = self._logits(support_images, support_labels, query_images)
        return classes[logits.argmax(dim=1).cpu().numpy()]


def load_method(run_dir: Union[str, Path], device: str = "cpu", plugins: Optional[PathOrList] = None,
                log: Optional[Callable[[str], None]] = None, allow_changed_code: bool = False) -> TrainedMethod:
    """A trained method from a finished run folder, ready to classify new images.

    The run's config (``config.yaml``) is resolved again and the method restored as the runner does
    (:func:`fewshot_nsl.runner.train` with the run's ``method.pt`` present: the method is built, its
    pretraining stage restored from the pretraining cache, then the trained weights loaded), so it
    needs the run's dataset (for the pretraining cache; glyphs is regenerated) and, for a plugin
    method, its plugin folder. Nothing in the run folder is changed.

    The weights are those the run's code trained: where the code of the method now (its
    :func:`~fewshot_nsl.identity.run_code_hash`: the package, the method's files and what they import and
    read) differs from the ``code_hash`` in the run's ``identity.json``, the run is refused, naming the
    files that changed, unless ``allow_changed_code=True``.

    Args:
        run_dir: ``<results_dir>/runs/<run_id>`` (a ``run_id`` column of :func:`load_results`).
        device: ``cpu`` (default), ``cuda`` or ``auto``.
        plugins: plugin folder(s) of a plugin method, as in :func:`benchmark`.
        log: where info lines go (default: nowhere).
        allow_changed_code: load the run's weights into the method's current code even where that code
            changed since the run (``log`` says so in one line).

    Returns:
        A :class:`TrainedMethod`: ``.predict(support_images, support_labels, query_images)``.

    Raises:
        ConfigError: not a finished run folder, or a bad argument.
        RegistryError: the method's code changed since the run (and ``allow_changed_code`` is False), or
            a plugin file changed since this process imported it.
    """
    import dataclasses

    from .config import resolve_config
    from .identity import RunIdentity
    from .inputs import load_store
    from .plugins import load_plugins
    from .runner import RunContext, train
    from .training import resolve_device

    if not isinstance(run_dir, (str, Path)) or not str(run_dir).strip():
        raise ConfigError(f"load_method(run_dir={run_dir!r}): run_dir must be a run folder (str or pathlib.Path)")
    if not isinstance(device, str) or device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise ConfigError(f"load_method(device={device!r}): device must be cpu, cuda, cuda:N or auto")
    folder = Path(run_dir)
    missing = [f for f in ("config.yaml", "identity.json", "method.pt") if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"load_method({str(folder)!r}): not a trained run folder (no {', '.join(missing)}); pass "
                          f"<results_dir>/runs/<run_id> of a finished run")
    if not isinstance(allow_changed_code, (bool, np.bool_)):
        raise ConfigError(f"load_method(allow_changed_code={allow_changed_code!r}): allow_changed_code must be "
                          f"True or False")
    load_plugins(_paths("plugins", plugins))
    cfg = resolve_config({}, str(folder / "config.yaml"))
    cfg = dataclasses.replace(cfg, device=device)
    recorded = json.loads((folder / "identity.json").read_text())
    identity = RunIdentity(**{k: v for k, v in recorded.items()
                              if k in {f.name for f in dataclasses.fields(RunIdentity)}})
    changed = _code_changes(cfg, recorded)
    if changed is not None:
        what = f"the code of method '{cfg.method}' changed since run {folder.name} was trained ({changed})"
        if not allow_changed_code:
            raise RegistryError(f"load_method({str(folder)!r}): {what}, so its weights belong to other code; run it "
                                f"again with the current code, or pass allow_changed_code=True to load them anyway")
        (log or (lambda line: None))(f"warning: {what}; loading its weights anyway (allow_changed_code=True)")
    store = load_store(cfg)
    ctx = RunContext(cfg, store, None, resolve_device(device), folder, identity)  # type: ignore[arg-type]
    train(ctx, progress=False, log=log or (lambda line: None))
    ctx.method.eval()
    return TrainedMethod(ctx.method, cfg, folder, ctx.device, store)


def _code_changes(cfg: Any, recorded: Dict[str, Any]) -> Optional[str]:
    """What differs between the code of ``cfg``'s method now and the code a run recorded in its
    ``identity.json`` (``recorded``): None where the code hashes agree, else the changed files (from the
    ``code_files`` records) or, where the run recorded none, the two hashes.

    Raises:
        RegistryError: an unknown method, or a plugin file changed since this process imported it.
    """
    from .identity import code_files_of, run_code_hash
    from .registry import BACKBONES, get_method_class

    backbone = BACKBONES.get(cfg.backbone) if cfg.backbone in BACKBONES else None
    now = run_code_hash(get_method_class(cfg.method), backbone)
    if now == recorded.get("code_hash"):
        return None
    then = {str(f.get("path")): f.get("sha256") for f in recorded.get("code_files") or [] if isinstance(f, dict)}
    current = {str(f.get("path")): f.get("sha256") for f in code_files_of(now)}
    files = sorted(k for k in set(then) | set(current) if then.get(k) != current.get(k))
    if not then or not files:
        return f"code hash {recorded.get('code_hash')} then, {now} now"
    shown = ", ".join(f"{k} ({'new' if k not in then else 'gone' if k not in current else 'edited'})"
                      for k in files[:5])
    return f"{shown}{f' and {len(files) - 5} more' if len(files) > 5 else ''}"


#: Constructor parameters the harness passes itself (not options).
_HARNESS_ARGS = {"self", "backbone", "image_size"}


def _args_docs(doc: Optional[str]) -> Dict[str, str]:
    """``{name: first sentence}`` from a Google-style docstring's ``Args:`` section."""
    out: Dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:  # the next section
            inside = False
            continue
        m = re.match(r"\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)", line)
        if m and (indent is None or width == indent):
            indent, current = width, m.group(1).lstrip("*")
            out[current] = m.group(3).strip()
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return {k: _first_sentence(v) for k, v in out.items()}


def _first_sentence(text: str) -> str:
    m = re.search(r"\.(\s|$)", text)
    return text[: m.start() + 1] if m else text


def method_options(name: str) -> List[Dict[str, Any]]:
    """A method's options (``method_options`` / ``--set method_options.NAME=VALUE``) with defaults and
    one-line docs, from its constructor signature (along the classes that pass ``**kwargs`` on, as
    the option check does) and the ``Args:`` sections of its docstrings (``--list --method NAME``).

    Returns:
        One dict per option: ``name``, ``default`` (None when required), ``required``, ``doc``.

    Raises:
        RegistryError: an unknown method name (listing the known ones).
    """
    from .registry import get_method_class, list_methods

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"method_options(name={name!r}): name must be a method name (see --list)")
    list_methods()  # built-in baselines and plugins registered
    cls = get_method_class(name)
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_args_docs(klass.__doc__))
        if "__init__" in vars(klass):
            docs.update(_args_docs(vars(klass)["__init__"].__doc__))
    options: Dict[str, Dict[str, Any]] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        for prm in params:
            if prm.name in _HARNESS_ARGS or prm.kind not in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY):
                continue
            if prm.name not in options:
                required = prm.default is inspect.Parameter.empty
                options[prm.name] = {"name": prm.name, "default": None if required else prm.default,
                                     "required": required, "doc": docs.get(prm.name, "")}
        if not any(prm.kind is prm.VAR_KEYWORD for prm in params):
            break
    return list(options.values())
