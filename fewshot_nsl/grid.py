"""Benchmark grids: many (method, backbone, shots) cells, each over one or more training seeds.

A grid comes from a YAML file (``configs/table6.yaml``: explicit ``rows``, or a ``grid:``
mapping whose lists are crossed) or from the command line (``--method a,b|all``,
``--backbone``, ``--shots 1,5``). Each cell runs once per seed; its leaderboard row
aggregates the seeds (:func:`fewshot_nsl.runner.aggregate`).

Planning decides, per cell, before anything trains:

* ``not registered``: the grid names a method no plugin provides (yet): reported, skipped;
* ``complete``: every seed's run has a ``summary.json`` under the same identity (config, dataset
  content, episode list and split, code, world size: :mod:`fewshot_nsl.identity`), and the
  leaderboard row names exactly those runs: skipped;
* ``aggregate``: the runs are complete but the leaderboard row is missing or stale: the row
  is rebuilt from the runs' CSVs (no training, no evaluation);
* ``run``: some seed is missing or unfinished: handed to the executor, which resumes it.

So a second invocation of the same command does nothing, and says so.
"""
from __future__ import annotations

import dataclasses
import itertools
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


from .config import check_buildable  # noqa: F401 (re-exported: the planning check lives with the config)
from .config import RunConfig, check_seed, load_yaml, resolve_config
from .data.episodes import EpisodeList
from .data.store import ImageStore
from .errors import ConfigError, FewShotError
from .registry import METHODS, PLUGIN_ERRORS, list_methods
from .leaderboard import (
    board_row,
    cell_summaries,
    check_leaderboard,
    forget_rows,
    paper_comparable,
    read_leaderboard,
    upsert_row,
)
from .reporting import n_seeds_of, render_reports
from .runner import (
    aggregate,
    is_complete,
    load_episodes,
    load_store,
    run_dir_of,
    run_identity,
    store_key,
    validate_against_store,
)


@dataclass(frozen=True)
class Cell:
    """One grid cell; ``None`` fields take the config's value (``--backbone``, ``--shots``, profile)."""

    method: str
    backbone: Optional[str] = None
    shots: Optional[int] = None
    label: str = ""

    def describe(self, cfg: Optional[RunConfig] = None) -> str:
        b = cfg.backbone if cfg else self.backbone or "(default backbone)"
        s = cfg.shots if cfg else self.shots
        w = f"{cfg.ways}-way " if cfg else ""
        return f"{self.method} {b} {w}{s}-shot"


#: Keys of a grid file: the cells (``rows``, ``grid``) and notes about the paper's values.
GRID_FILE_KEYS = ("rows", "grid", "paper_only", "dataset_of_paper_values", "ways")
#: Keys of one ``rows:`` entry; a row chooses a cell, everything else comes from the command line.
ROW_KEYS = ("method", "backbone", "shots", "label", "paper", "paper_ci")
CELL_KEYS = ("method", "backbone", "shots")


def _cell_value(path: Path, where: str, key: str, value: Any) -> Any:
    """A cell's ``method`` (a name), ``backbone`` (a name or null) or ``shots`` (a positive integer or
    null: ``1.9`` and ``true`` are refused, not rounded), as written in a grid file.

    Raises:
        ConfigError: one line naming the file, the entry and the value.
    """
    if key == "shots":
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        want = "a positive integer (or null)"
    elif key == "backbone":
        if value is None or isinstance(value, str) and value:
            return value
        want = "a backbone name (or null)"
    else:
        if isinstance(value, str) and value:
            return value
        want = "a method name"
    raise ConfigError(f"grid file {path}: {where}.{key} must be {want}, got {value!r}")


def _rows(path: Path, rows: Any) -> List[Cell]:
    """The cells of a grid file's ``rows:`` list."""
    if not isinstance(rows, list):
        raise ConfigError(f"grid file {path}: rows must be a list of mappings (one per cell, e.g. "
                          f"- {{method: protonet, backbone: cnn4, shots: 5}}), got {rows!r}")
    cells = []
    for i, r in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(r, dict) or "method" not in r:
            raise ConfigError(f"grid file {path}: {where} must be a mapping with at least a 'method'")
        unknown = sorted(str(k) for k in set(r) - set(ROW_KEYS))
        if unknown:
            raise ConfigError(f"grid file {path}: {where} sets {', '.join(unknown)}, which a grid row cannot set; "
                              f"a row takes {', '.join(ROW_KEYS)} (ways, dataset, profile and the rest come from the "
                              f"command line: --ways, --dataset, --profile, --set, --config)")
        for key in ("label", "paper", "paper_ci"):
            value = r.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number if key != "label" else number or isinstance(value, str)):
                want = "a text (or null)" if key == "label" else "a number (or null)"
                raise ConfigError(f"grid file {path}: {where}.{key} must be {want}, got {value!r}")
        m, b, s = (_cell_value(path, where, k, r.get(k)) for k in CELL_KEYS)
        cells.append(Cell(m, b, s, str(r.get("label") or "")))
    return cells


def _crossed(path: Path, grid: Any) -> List[Cell]:
    """The cells of a grid file's ``grid:`` mapping (its lists crossed)."""
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path}: grid must be a mapping of method, backbone, shots to a value or a "
                          f"list (e.g. grid: {{method: [protonet, maml], shots: [1, 5]}}), got {grid!r}")
    unknown = sorted(str(k) for k in set(grid) - set(CELL_KEYS))
    if unknown:
        raise ConfigError(f"grid file {path}: unknown grid key(s) {', '.join(unknown)}; use method, backbone, shots")
    lists = []
    for key in CELL_KEYS:
        values = grid.get(key)
        values = values if isinstance(values, list) else [values]
        lists.append([_cell_value(path, "grid", key, v) for v in values])
    return [Cell(m, b, s) for m, b, s in itertools.product(*lists)]


def load_grid(path: Path) -> Tuple[str, List[Cell]]:
    """Cells of a grid file: ``rows: [{method, backbone, shots, ...}]`` and/or
    ``grid: {method: [...], backbone: [...], shots: [...]}`` (crossed).

    Raises:
        ConfigError: one line naming the file and the entry: an unknown key, a row or grid of the
            wrong type, a method or backbone that is not a name, shots that are not a positive
            integer (``1.9`` and ``true`` are refused, not rounded), or no cell at all.
    """
    path = Path(path)
    data = load_yaml(path, what="grid file", flag="--grid")
    unknown = sorted(str(k) for k in set(data) - set(GRID_FILE_KEYS))
    if unknown:
        raise ConfigError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; a grid file holds rows: and grid: "
                          f"(and the notes {', '.join(GRID_FILE_KEYS[2:])}); give the rest on the command line "
                          f"(--profile, --dataset, --set, --config)")
    if not isinstance(data.get("paper_only") or [], list):
        raise ConfigError(f"grid file {path}: paper_only must be a list of rows, got {data['paper_only']!r}")
    cells: List[Cell] = []
    if data.get("rows") is not None:
        cells += _rows(path, data["rows"])
    if data.get("grid") is not None:
        cells += _crossed(path, data["grid"])
    if not cells:
        raise ConfigError(f"grid file {path} lists no cells; give 'rows:' or 'grid:'")
    return path.stem, list(dict.fromkeys(cells))


def filter_cells(cells: Sequence[Cell], methods: Optional[Sequence[str]], backbones: Optional[Sequence[str]],
                 shots: Optional[Sequence[int]]) -> List[Cell]:
    """Keep the cells matching ``--method`` / ``--backbone`` / ``--shots`` (None: no filter)."""
    out = [c for c in cells
           if (not methods or c.method in methods) and (not backbones or c.backbone is None or c.backbone in backbones)
           and (not shots or c.shots is None or c.shots in shots)]
    if not out:
        raise ConfigError("no grid cell matches the given --method/--backbone/--shots; check the grid file")
    return out


def cells_from_args(methods: Sequence[str], backbones: Optional[Sequence[str]], shots: Optional[Sequence[int]]) -> List[Cell]:
    """The cross product of ``--method`` x ``--backbone`` x ``--shots`` (None: the config's value).

    Raises:
        ConfigError: a shot count that is not a positive integer (``1.9`` and ``True`` are refused, not rounded).
    """
    for s in shots or []:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"shots must be positive integers (--shots 1,5 or shots=[1, 5]), got {s!r}")
        if s < 1:
            raise ConfigError(f"--shots must be at least 1, got {s}")
    if list(methods) == ["all"]:
        methods = list_methods()
    cells = [Cell(m, b, s) for m, b, s in itertools.product(methods, backbones or [None], shots or [None])]
    return list(dict.fromkeys(cells))  # --shots 1,1 is one cell, run once


# ----------------------------------------------------------------------------- planning
@dataclass
class RunJob:
    """One (cell, seed) run to execute."""

    cfg: RunConfig
    store: ImageStore
    episodes: EpisodeList
    cell: "PlannedCell"


@dataclass
class PlannedCell:
    cell: Cell
    status: str  # "not registered" | "complete" | "aggregate" | "run"
    reason: str = ""
    cfgs: List[RunConfig] = field(default_factory=list)
    summaries: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # seed -> finished run summary
    jobs: List[RunJob] = field(default_factory=list)
    row: Optional[Dict[str, Any]] = None
    error: Optional[str] = None

    def describe(self) -> str:
        return self.cell.describe(self.cfgs[0] if self.cfgs else None)


def _not_registered(method: str) -> Optional[str]:
    if method in METHODS:
        return None
    broken = [f"{Path(w).name} ({why})" for w, why in PLUGIN_ERRORS.items() if Path(w).stem == method]
    if broken:
        return f"method '{method}' is not available: its plugin failed to import: {broken[0]}"
    return f"method '{method}' is not registered (yet); skipped"


def check_outputs(cfg: RunConfig, checked: set) -> None:
    """Before anything is loaded or trained: the results and cache folders take files and have
    room, and the results folder's ``leaderboard.csv`` (if any) is one this suite wrote."""
    from .data.store import default_cache_dir
    from .safe_io import check_writable

    for folder, what in ((Path(cfg.results_dir), "results folder"),
                         (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), "cache folder")):
        if (folder, what) not in checked:
            check_writable(folder, what)
            checked.add((folder, what))
    if ("board", cfg.results_dir) not in checked:
        check_leaderboard(Path(cfg.results_dir) / "leaderboard.csv")
        checked.add(("board", cfg.results_dir))


def plan(
    cells: Sequence[Cell],
    cli: Dict[str, Any],
    config_file: Optional[str],
    seeds: Optional[Sequence[int]],
    skip_unregistered: bool,
    rerun: bool = False,
) -> List[PlannedCell]:
    """Resolve every cell's configs, load data once per dataset config, and classify the cells.

    Input errors (bad dataset, impossible ways/shots, bad options) raise here, before any training.
    With ``rerun`` every runnable cell is planned as ``run`` (its finished runs are discarded by
    :func:`run_grid`).
    """
    list_methods()  # load plugins
    checked: set = set()
    stores: Dict[str, ImageStore] = {}
    episode_lists: Dict[Tuple, EpisodeList] = {}
    results_dir = None
    board = None
    out: List[PlannedCell] = []
    for cell in cells:
        why = _not_registered(cell.method)
        if why is not None:
            if not skip_unregistered:
                from .registry import get_method_class

                get_method_class(cell.method)  # raises the registry's one-line error
            out.append(PlannedCell(cell, "not registered", why))
            continue
        over = dict(cli, method=cell.method)
        if cell.backbone is not None:
            over["backbone"] = cell.backbone
        if cell.shots is not None:
            over["shots"] = cell.shots
        base = resolve_config(over, config_file)  # checks the cell can be built (check_buildable)
        check_outputs(base, checked)
        cfgs = [dataclasses.replace(base, seed=int(s)) for s in seeds] if seeds else [base]
        pc = PlannedCell(cell, "run", cfgs=cfgs)
        cfg = cfgs[0]
        skey = store_key(cfg)
        if skey not in stores:
            stores[skey] = load_store(cfg)
        store = stores[skey]
        validate_against_store(cfg, store)
        ekey = (skey, cfg.episodes_file, cfg.ways, cfg.shots, cfg.eval.queries, cfg.eval.split, cfg.results_dir)
        if ekey not in episode_lists:
            episode_lists[ekey] = load_episodes(cfg, store)
        episodes = episode_lists[ekey]
        n = min(cfg.eval.episodes, len(episodes))
        for c in cfgs:
            s = None if rerun else is_complete(c, run_identity(c, store, episodes), n)
            if s is not None:
                pc.summaries[c.seed] = s
            else:
                pc.jobs.append(RunJob(c, store, episodes, pc))
        if not pc.jobs:
            if board is None or results_dir != cfg.results_dir:
                results_dir = cfg.results_dir
                board = read_leaderboard(Path(results_dir) / "leaderboard.csv")
            expected = ";".join(s["run_id"] for s in cell_summaries(list(pc.summaries.values()), cfg.results_dir))
            row = board_row(board, pc.summaries[cfgs[0].seed])
            if row is not None and str(row.get("run_id")) == expected and \
                    str(row.get("episode_hash")) == episodes.sha256 and str(row.get("config_hash")) == pc.summaries[cfgs[0].seed]["config_hash"]:
                pc.status, pc.row = "complete", dict(row)
                pc.reason = (f"complete for config {pc.summaries[cfgs[0].seed]['config_hash'][:8]} and episode list "
                             f"{episodes.sha256[:8]}; skipped")
            else:
                pc.status, pc.reason = "aggregate", "runs complete; leaderboard row rebuilt from their CSVs"
        else:
            done = len(pc.summaries)
            pc.reason = f"to run: {len(pc.jobs)} of {len(cfgs)} seed(s)" + (f" ({done} already complete)" if done else "")
        out.append(pc)
    return out



# ----------------------------------------------------------------------------- running
@dataclass
class GridResult:
    cells: List[PlannedCell]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)

    @property
    def failed(self) -> List[PlannedCell]:
        return [c for c in self.cells if c.status == "failed"]


def result_line(row: Dict[str, Any]) -> str:
    """``protonet cnn4 5-way 5-shot on glyphs: 61.23 +- 0.80 over 600 episodes ...``"""
    note = " (synthetic dataset: not comparable with Mini-ImageNet)" if str(row.get("synthetic")) in ("True", "true") else ""
    pv = row.get("paper_value")
    paper = ""
    if pv is not None and pv == pv:
        how = ""
        if str(row.get("paper_comparable")) not in ("True", "true"):
            _, why = paper_comparable(row.get("dataset"), row.get("profile"), row.get("image_size"), row.get("split", "test"))
            how = f", for orientation only: {why}" if why else ", for orientation only"
        paper = f"; paper (Mini-ImageNet{how}): {float(pv):.2f} +- {float(row['paper_ci']):.2f}"
    seeds = f" x {row['n_seeds']} seeds (seed sd {float(row['seed_std']):.2f})" if n_seeds_of(row) > 1 else ""
    split = "" if str(row.get("split", "test")) == "test" else f" ({row['split']} split)"
    return (f"{row['method']} {row['backbone']} {row['ways']}-way {row['shots']}-shot on {row['dataset']}{split}: "
            f"{float(row['accuracy']):.2f} +- {float(row['ci95']):.2f} over {row['episodes']} episodes{seeds}{paper}{note}")


def check_seeds(seeds: Any) -> Optional[List[int]]:
    """``--seeds`` / ``seeds=`` as a list of distinct seeds in first-seen order (``None`` when not given).

    Raises:
        ConfigError: not a list of integers in ``0 .. 2**63-1`` (``-1``, ``2**63``, ``1.5`` and ``True`` refused).
    """
    if seeds is None or isinstance(seeds, (list, tuple)) and not seeds:
        return None
    if not isinstance(seeds, (list, tuple)):
        raise ConfigError(f"seeds must be a list of integers (--seeds 0,1,2 or seeds=[0, 1, 2]), got {seeds!r}")
    return list(dict.fromkeys(check_seed(s, "each of --seeds (seeds=)") for s in seeds))


# ----------------------------------------------------------------------------- --dry-run: config and cost
#: Where results and caches go: not part of a run's identity, left out of the --dry-run difference.
LOCATION_KEYS = ("results_dir", "cache_dir")


def config_diff(cfg: RunConfig, cell: Cell, config_file: Optional[str]) -> str:
    """What the resolved config of ``cell`` changes against the cell run with nothing but its profile (or, with
    ``config_file``, the file): ``episodic.steps 10 (2000), ...``, or ``as profile quick`` (the results and cache
    folders are not shown)."""
    from .tracking import flatten

    over: Dict[str, Any] = {"method": cell.method, "profile": cfg.profile}
    if cell.backbone is not None:
        over["backbone"] = cell.backbone
    if cell.shots is not None:
        over["shots"] = cell.shots
    what = f"config file {Path(config_file).name}" if config_file else f"profile {cfg.profile}"
    try:
        base = flatten(resolve_config(over, config_file).to_dict())
    except FewShotError as exc:
        return f"(no difference shown: the {what} alone does not resolve: {exc})"
    mine = flatten(cfg.to_dict())
    diff = [f"{k} {mine.get(k)!r} ({base.get(k)!r})" for k in sorted(set(mine) | set(base))
            if mine.get(k) != base.get(k) and k not in LOCATION_KEYS]
    return f"as {what}" if not diff else f"differs from {what} (its value in brackets): " + ", ".join(diff)


#: The measured cost tables of a git checkout (not in the wheel).
PAPER_COSTS = Path("benchmarks") / "paper_cells.json"
QUICK_COSTS = Path("results") / "reference" / "glyphs_quick" / "leaderboard.csv"
#: Image size the paper cost table was measured at.
PAPER_COSTS_IMAGE_SIZE = 84


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def cost_estimate(cfg: RunConfig, store: ImageStore, n_seeds: int = 1) -> str:
    """A cell's cost from the measured cost tables of the checkout, naming the table, or ``no estimate (why)``.

    * paper profile: ``benchmarks/paper_cells.json`` (per-step and per-episode costs of each paper cell at 84 px
      on the CPU it was measured on) times this config's pretraining steps, episodic steps (scaled by the
      meta-batch) and test plus validation episodes; a cached pretraining costs nothing;
    * quick profile on glyphs: the reference leaderboard ``results/reference/glyphs_quick/leaderboard.csv``
      (training time plus evaluation time per episode, measured with 2 CPU threads).
    """
    import json
    import math

    from .resources import checkout_root

    root = checkout_root()
    if root is None:
        return "no estimate (the measured cost tables ship with the git checkout, not the installed package)"
    runs = f" x {n_seeds} seeds to run" if n_seeds > 1 else ""
    if cfg.profile == "paper":
        table = root / PAPER_COSTS
        cells = json.loads(table.read_text()) if table.is_file() else {}
        hit = next((c for c in cells.values() if (c.get("method"), c.get("backbone"), c.get("shots")) ==
                    (cfg.method, cfg.backbone, cfg.shots)), None)
        if hit is None:
            return f"no estimate ({PAPER_COSTS} has no cell {cfg.method} {cfg.backbone} {cfg.shots}-shot)"
        if cfg.image_size != PAPER_COSTS_IMAGE_SIZE:
            return f"no estimate ({PAPER_COSTS} was measured at {PAPER_COSTS_IMAGE_SIZE} px, this cell runs at {cfg.image_size})"
        from .inputs import conv_spec_of
        from .registry import get_method_class
        from .training import pretrain_cache_path
        from .data.store import default_cache_dir

        stages = get_method_class(cfg.method).stages(cfg.method_options)
        pre = epi = 0.0
        notes = []
        if "pretrain" in stages:
            cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
            if pretrain_cache_path(cfg, store, conv_spec_of(cfg), get_method_class(cfg.method), cache).is_file():
                notes.append("pretraining cached")
            elif hit.get("pretrain_step_s"):
                n = sum(len(store.class_members(c)) for c in store.classes_in_split("train"))
                steps = math.ceil(n / cfg.pretrain.batch_size) * cfg.pretrain.epochs
                steps = min(steps, cfg.pretrain.max_steps) if cfg.pretrain.max_steps is not None else steps
                pre = steps * float(hit["pretrain_step_s"])
                notes.append(f"pretraining {_hours(pre)}")
        if "episodic" in stages and hit.get("episodic_step_s"):
            epi = cfg.episodic.steps * float(hit["episodic_step_s"]) * cfg.episodic.meta_batch / max(int(hit.get("meta_batch") or 1), 1)
            notes.append(f"episodic {_hours(epi)}")
        episodes = cfg.eval.episodes + int(hit.get("validation_episodes_full") or 0)
        ev = episodes * float(hit["eval_episode_s"])
        notes.append(f"evaluation and validation {_hours(ev)}")
        return (f"about {_hours(pre + epi + ev)} per seed{runs} ({', '.join(notes)}; from {PAPER_COSTS}, per-step "
                f"costs measured on its CPU)")
    if cfg.profile == "quick":
        table = root / QUICK_COSTS
        if not table.is_file():
            return f"no estimate ({QUICK_COSTS} is missing)"
        import pandas as pd

        board = pd.read_csv(table)
        hit = board[(board["method"] == cfg.method) & (board["backbone"] == cfg.backbone) & (board["shots"] == cfg.shots)
                    & (board["ways"] == cfg.ways) & (board["dataset"] == store.name)]
        if hit.empty:
            return f"no estimate ({QUICK_COSTS} has no row {store.name} {cfg.method} {cfg.backbone} {cfg.ways}-way {cfg.shots}-shot)"
        r = hit.iloc[0]
        if int(r["image_size"]) != cfg.image_size:
            return f"no estimate ({QUICK_COSTS} was measured at {int(r['image_size'])} px, this cell runs at {cfg.image_size})"
        train_s = float(r["train_time_s"]) if r["train_time_s"] == r["train_time_s"] else 0.0
        ev = float(r["eval_time_s"]) * cfg.eval.episodes / max(int(r["episodes"]), 1)
        return (f"about {_hours(train_s + ev)} per seed{runs} (training {_hours(train_s)}, evaluation {_hours(ev)}; from "
                f"{QUICK_COSTS}, measured with {r['threads']} threads on {r['device_name']})")
    return f"no estimate (no measured cost table for profile {cfg.profile})"


def run_grid(
    cells: Sequence[Cell],
    cli: Dict[str, Any],
    config_file: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    executor: Any = None,
    reference: Optional[str] = None,
    skip_unregistered: bool = True,
    grid_name: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    fail_fast: bool = False,
    dry_run: bool = False,
    rerun: bool = False,
    replace_row: bool = False,
    progress_every: Optional[float] = None,
    tracking: Optional[str] = None,
) -> GridResult:
    """Plan the cells, run what is missing with ``executor`` (default: local), aggregate the seeds
    of every finished cell into its leaderboard row, and re-render the reports.

    Args:
        fail_fast: re-raise a cell's error instead of reporting it and going on.
        dry_run: plan and print what would run, then stop.
        rerun: recompute the cells deliberately: their finished runs (trained method, episode
            results, summaries) are deleted and run again; the shared pretraining cache is kept.
        replace_row: write each cell's row even over a leaderboard row measured on more episodes
            or seeds (by default that row is kept, and the log says so in one line).
        progress_every: print a timestamped progress line every this many seconds while a run trains
            or evaluates (for output that is not a terminal; None or 0: none).
        tracking: ``"mlflow"`` logs every finished run to MLflow (:mod:`fewshot_nsl.tracking`); None: no tracker.
    """
    from .executors import LocalExecutor

    from .console import ProgressMode
    from .tracking import check_tracking, make_tracker

    executor = executor or LocalExecutor()
    seeds = check_seeds(seeds)
    if progress_every is not None and (isinstance(progress_every, bool) or not isinstance(progress_every, (int, float))
                                       or not 0 <= progress_every < float("inf")):
        raise ConfigError(f"--progress-every (progress_every=) must be a number of seconds, 0 or more, got {progress_every!r}")
    check_tracking(tracking)  # a missing package is one line before anything runs
    planned = plan(cells, cli, config_file, seeds, skip_unregistered, rerun)
    runnable = [p for p in planned if p.cfgs]
    results_dir = Path(runnable[0].cfgs[0].results_dir if runnable else cli.get("results_dir") or "results")
    head = runnable[0].cfgs[0] if runnable else None
    if head is not None:
        used = [c.seed for c in runnable[0].cfgs]
        log(f"{'grid ' + grid_name if grid_name else 'benchmark'}: {len(planned)} cell(s) x {len(used)} seed(s) "
            f"({','.join(map(str, used))}) on {head.dataset}, {head.ways}-way, profile {head.profile}, "
            f"executor {executor.name}")
    for p in planned:
        if p.status != "run":
            log(f"  {p.status:>14}: {p.describe()}: {p.reason}")
        else:
            log(f"  {'run':>14}: {p.describe()}: {p.reason}")
        if dry_run and p.cfgs:
            log(f"{'':18}config: {config_diff(p.cfgs[0], p.cell, config_file)}")
            if p.status == "run":
                log(f"{'':18}cost: {cost_estimate(p.cfgs[0], p.jobs[0].store, len(p.jobs))}")

    if dry_run:
        return GridResult(planned)
    tracker = make_tracker(tracking, results_dir, log)
    if rerun:
        for job in (j for p in planned if p.status == "run" for j in p.jobs):
            d = run_dir_of(job.cfg, run_identity(job.cfg, job.store, job.episodes))
            if d.is_dir():
                shutil.rmtree(d)
                # a row naming the removed run has lost its evidence: it goes too (the rerun adds it back)
                gone = forget_rows(Path(job.cfg.results_dir) / "leaderboard.csv", run_ids=[d.name])
                log(f"  rerun: removed {d}" + (" and its leaderboard row" if len(gone) else ""))

    def finish_cell(p: PlannedCell, status: str) -> None:
        row = aggregate(list(p.summaries.values()), results_dir)
        total, failed = int(row["episodes"]) * int(row["n_seeds"]), int(row["episodes_failed"])
        if total and failed >= total:  # nothing measured: a 0.00 row would read as a result
            p.status = "failed"
            p.error = (f"every one of its {total} test episodes failed (the method raised or gave non-finite logits; "
                       f"see episodes.csv in runs/{str(row['run_id']).split(';')[0]}): no leaderboard row")
            log(f"FAILED {p.describe()}: {p.error}")
            return
        p.row, p.status = row, status
        log(result_line(row))
        if failed:
            log(f"warning: {failed} of {total} test episodes of {p.describe()} failed (non-finite logits) and count "
                f"as wrong (episodes.csv status 'nonfinite'); the row says so ('episodes_failed')")
        upsert_row(results_dir / "leaderboard.csv", row, reference=reference, replace=replace_row, log=log)

    for p in planned:
        if p.status == "aggregate":
            finish_cell(p, "aggregated")

    jobs = [j for p in planned if p.status == "run" for j in p.jobs]
    if jobs:
        def on_done(job: RunJob, summary: Dict[str, Any]) -> None:
            p = job.cell
            p.summaries[job.cfg.seed] = summary
            if tracker is not None:
                tracker.log_run(summary, Path(job.cfg.results_dir) / "runs" / str(summary["run_id"]))
            if p.status == "run" and len(p.summaries) == len(p.cfgs):
                finish_cell(p, "ran")

        def on_error(job: RunJob, exc: BaseException) -> None:
            p = job.cell
            if fail_fast:
                raise exc
            if p.status != "failed":
                p.status = "failed"
                p.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, FewShotError) else str(exc)
                log(f"FAILED {p.describe()} seed {job.cfg.seed}: {p.error}")
                if not isinstance(exc, FewShotError):
                    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    try:
                        d = run_dir_of(job.cfg, run_identity(job.cfg, job.store, job.episodes))
                        d.mkdir(parents=True, exist_ok=True)
                        (d / "error.txt").write_text(tb)
                        log(f"  traceback: {d / 'error.txt'}")
                    except OSError:
                        pass

        executor.run(jobs, on_done, on_error, progress=ProgressMode(bool(progress), progress_every) if progress_every
                     else progress, log=log)

    if runnable or (results_dir / "leaderboard.csv").is_file():
        grid = (grid_name, [{"method": p.cell.method, "backbone": p.cfgs[0].backbone, "shots": p.cfgs[0].shots}
                            for p in runnable]) if grid_name else None
        render_reports(results_dir, reference=reference, grid=grid, log=log)
    res = GridResult(planned)
    ran, agg, done = res.count("ran"), res.count("aggregated"), res.count("complete")
    unreg, failed = res.count("not registered"), len(res.failed)
    extra = f" ({unreg} not registered)" if unreg else ""
    if not jobs and not agg:
        log(f"nothing to do: all {done} runnable cell(s) are already complete for this config and episode list{extra}")
    else:
        log(f"done: {ran} cell(s) run, {agg} re-aggregated, {done} already complete, {unreg} not registered, "
            f"{failed} failed")
    return res
