"""The Python API, for notebooks and scripts: run benchmarks and read results as DataFrames.

    import fewshot_nsl

    rows = fewshot_nsl.benchmark(method="protonet", shots=[1, 5], dataset="glyphs", profile="smoke",
                                 episodic={"steps": 10}, results_dir="results")
    board = fewshot_nsl.load_results("results")

:func:`benchmark` does what the command line does (the same configs, run folders, resume and
leaderboard), without printing unless asked. A plugin file (or a module beside it) edited since this
process imported it is imported again before the cells run, so calling :func:`benchmark` again after
an edit runs the new code under its new identity. Input errors raise
:class:`~fewshot_nsl.errors.FewShotError` subclasses with the command line's one-line message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import pandas as pd

from .errors import ConfigError

StrOrList = Union[str, Sequence[str]]


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
    plugins: Sequence[Union[str, Path]] = (),
    reference: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
    rerun: bool = False,
    replace_row: bool = False,
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
        plugins: extra plugin folders, as ``--plugins``.
        reference: reference method of the paired comparisons (default protonet).
        threads: torch CPU threads, as ``--threads``.
        progress: show progress bars.
        log: where info lines go (default: nowhere).
        rerun: recompute the cells deliberately, as ``--rerun``.
        replace_row: write each cell's row even over a leaderboard row measured on more episodes or seeds, as
            ``--replace-row`` (by default that row is kept and ``log`` says so in one line).
        **overrides: config keys over the config file, like ``--set``: top-level keys
            (``ways=5``, ``profile="smoke"``, ``image_size=32``, ``results_dir="results"``,
            ``cache_dir=...``, ``data_root=...``) and sections as dicts
            (``episodic={"steps": 10}``, ``method_options={"inner_lr": 0.05}``,
            ``eval={"episodes": 100}``). Unknown keys and wrong types raise
            :class:`~fewshot_nsl.errors.ConfigError`.

    Returns:
        One row per cell (columns as in ``leaderboard.csv``: accuracy, ci95, ci95_t, episodes,
        version, ...). The rows are also written to ``<results_dir>/leaderboard.csv``.

    Raises:
        FewShotError: an input problem (one-line message), or a cell failed at run time.
    """
    from .config import check_overrides
    from .executors import LocalExecutor
    from .cli import MAX_THREADS
    from .grid import cells_from_args, run_grid
    from .plugins import load_plugins, refresh_plugins

    for key in ("method", "backbone", "shots"):
        if key in overrides:
            raise ConfigError(f"pass {key}= as benchmark()'s own argument")
    cli: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if dataset is not None:
        cli["dataset"] = dataset
    check_overrides(cli, "benchmark()")
    # plugins edited since this process imported them are imported again, so the code that runs is
    # the code on disk, the code the run's identity records
    for folder in refresh_plugins():
        (log or (lambda line: None))(f"plugin folder {folder} changed on disk since it was imported: re-imported")
    load_plugins([Path(p) for p in plugins])
    methods = _as_list(method) or ["protonet"]
    backbones = _as_list(backbone)
    # a digit string is a shot count; anything else (1.9, True, "five") is left for the grid's one-line refusal
    shot_list = ([int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in _as_list(shots)]
                 if shots is not None else None)
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
                      replace_row=replace_row)
    if result.failed:
        from .errors import FewShotError

        names = "; ".join(f"{p.describe()}: {p.error}" for p in result.failed)
        raise FewShotError(f"{len(result.failed)} cell(s) failed: {names}")
    return grid_rows(result, Path(cli.get("results_dir") or "results"))


def grid_rows(result: Any, results_dir: Path) -> pd.DataFrame:
    """The leaderboard rows of a :class:`~fewshot_nsl.grid.GridResult`'s finished cells, as written to
    ``leaderboard.csv`` (with the paired-comparison columns), in cell order."""
    from .reporting import read_leaderboard

    rows = [p.row for p in result.cells if p.row is not None]
    if not rows:
        return pd.DataFrame()
    board = read_leaderboard(Path(results_dir) / "leaderboard.csv")
    if "run_id" not in board.columns:
        return pd.DataFrame(rows)
    by_run = {str(r): i for i, r in zip(board.index, board["run_id"])}
    out = [board.loc[by_run[str(r["run_id"])]].to_dict() if str(r["run_id"]) in by_run else r for r in rows]
    return pd.DataFrame(out).reset_index(drop=True)


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
