"""Command line: ``fewshot-nsl --method protonet --shots 5`` (installed), ``python -m fewshot_nsl ...``
or ``python run_benchmarks.py ...`` (a checkout); messages and ``--help`` name the one used.

Any problem with the user's input ends with one line ``error: ...`` and exit status 2;
cells of a grid that fail at run time are reported and the grid goes on (exit status 1);
Ctrl-C ends with a resume hint and status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from . import __version__
from .console import Console, command_name, show_progress
from .errors import ConfigError, FewShotError, RegistryError
from .host_memory import check_switch as check_malloc_switch

#: Report formats (:data:`fewshot_nsl.reporting.FORMATS`, kept here so that ``--help`` imports no pandas).
FORMATS = ("markdown", "latex")

EPILOG = """examples:
  {cmd}                                  # protonet, 5-way 5-shot, glyphs, quick profile
  {cmd} --method dynamic_nsn --shots 1,5
  {cmd} --grid table6 --profile smoke              # the whole Table 6 (configs/table6.yaml)
  {cmd} --grid table6 --seeds 0,1,2 --executor ray
  {cmd} --set episodic.steps=10 --set method_options.inner_lr=0.05 --method maml
  {cmd} --method protonet --profile smoke --json --quiet   # the leaderboard rows as JSON
  {cmd} --compare RUN_A RUN_B            # paired test of two runs on the same episodes
  {cmd} --dataset miniimagenet --data-root ~/data/mini --profile paper --device cuda
  {cmd} --list
  {cmd} --report                         # re-render table6.md, summaries and the plot from the CSVs
  {cmd} --report --profile quick --method protonet,maml --format latex   # a filtered report, + table6.tex
  {cmd} --forget RUN_ID                  # remove a leaderboard row (--delete-runs: its run folders too)
  {cmd} --list --method maml             # a method's options, defaults and docs
  torchrun --nproc_per_node 2 -m fewshot_nsl.distributed pretrain --method static_nsn   # data-parallel pretraining
"""


def _int_list(text: str) -> List[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (a typed ``\r`` becomes ``\\r``), so
    that an error line quoting what the user typed stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one ``error:`` line (no usage dump), like other input errors."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {printable(message)}; see {self.prog} --help\n")


def check_not_empty(args: argparse.Namespace) -> None:
    """Refuse a flag given an empty value (``--config ""``, ``--method "$UNSET"``): left alone it
    would silently mean the default (no config file, protonet, plugins from the working folder).

    Raises:
        ConfigError: naming the flag.
    """
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.strip():
                flag = "--set" if dest == "set_options" else f"--{dest.replace('_', '-')}"
                raise ConfigError(f"{flag} was given an empty value; give a value or leave {flag} out")


#: Flags that name files or folders (checked by :func:`check_path_flags`).
PATH_FLAGS = ("config", "grid", "episodes", "plugins", "data_root", "results_dir", "cache_dir", "log_file", "compare")
#: Longest file name and path the file systems the suite runs on accept (Linux NAME_MAX / PATH_MAX).
NAME_MAX, PATH_MAX = 255, 4096


def check_path_flags(args: argparse.Namespace) -> None:
    """Refuse a path no file system accepts (a name over 255 bytes, a path over 4096, a NUL byte) in
    one line, before the ``OSError: File name too long`` it would raise deep inside a loader.

    Raises:
        ConfigError: naming the flag.
    """
    for dest in PATH_FLAGS:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str):
                continue
            flag = f"--{dest.replace('_', '-')}"
            longest = max((len(part.encode()) for part in v.split("/")), default=0)
            why = ("it holds a NUL byte" if "\0" in v
                   else f"a name in it is {longest} bytes long, more than {NAME_MAX}" if longest > NAME_MAX
                   else f"it is {len(v.encode())} bytes long, more than {PATH_MAX}" if len(v.encode()) > PATH_MAX else "")
            if why:
                shown = printable(v if len(v) <= 60 else v[:57] + "...")
                raise ConfigError(f"{flag} {shown} is not a usable path: {why}; check the value")


def _plugin_failures(dirs: List[str]) -> List[str]:
    """One phrase per plugin file under ``dirs`` (or entry point) that failed to import."""
    from .registry import PLUGIN_ERRORS

    roots = [Path(d).resolve() for d in dirs]
    return [f"plugin {where} failed to import ({' '.join(why.split())})" for where, why in PLUGIN_ERRORS.items()
            if where.startswith("entry point") or any(Path(where).parent == r for r in roots)]


def build_parser() -> argparse.ArgumentParser:
    cmd = command_name()
    p = _Parser(
        prog=cmd,
        description="fewshot-nsl: few-shot benchmarks around Neural Similarity Learning.",
        epilog=EPILOG.format(cmd=cmd if cmd != "run_benchmarks.py" else "python run_benchmarks.py"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # '--way 5' must not silently mean '--ways 5'
    )
    p.add_argument("--method", help="method name(s), comma-separated, or 'all' (see --list); default protonet "
                                    "(with --grid: keep only these methods)")
    p.add_argument("--backbone", help="backbone name(s), comma-separated (cnn4, cnn9); with --grid: a filter")
    p.add_argument("--dataset", help="glyphs (embedded, default), miniimagenet, custom")
    p.add_argument("--data-root", help="folder holding the dataset (miniimagenet, custom)")
    p.add_argument("--dataset-name", metavar="NAME", help="name of a --dataset custom in tables, run folders and "
                   "--report filters (default custom)")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=_int_list, help="shots, comma-separated (e.g. 1,5); with --grid: a filter")
    p.add_argument("--queries", type=int, help="queries per class at test (default 15)")
    p.add_argument("--episodes", help="fixed episode list (JSON) to evaluate on")
    p.add_argument("--n-episodes", type=int, help="evaluate the first N episodes of the list")
    p.add_argument("--image-size", type=int)
    p.add_argument("--profile", choices=["smoke", "quick", "paper"], help="training/eval budget (default quick); "
                   "with --report/--forget: a filter")
    p.add_argument("--config", help="YAML config file (overrides the profile; --set and the flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                   help="override one config key (dotted, e.g. episodic.steps=10, method_options.inner_lr=0.05; "
                        "the value is read as YAML); repeatable; above --config, below the dedicated flags")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--seeds", type=_int_list, help="several training seeds, e.g. 0,1,2: one run per seed, "
                                                   "aggregated into one leaderboard row with a seed_std column")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels (slower on GPU)")
    p.add_argument("--compile", choices=("auto", "on", "off"), help="torch.compile the networks: auto (default: on CUDA "
                   "with Triton, eager on CPU), on, off; methods that adapt through higher always run eager")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision of training, validation and evaluation (default fp32); part of the "
                        "run's identity and of its row's key; fp16 adds loss scaling on CUDA")
    p.add_argument("--results-dir", help="where leaderboard.csv, table6.md and runs/ go (default results)")
    p.add_argument("--cache-dir", help="dataset/pretraining cache (default $FEWSHOT_NSL_CACHE or ~/.cache/fewshot_nsl)")
    p.add_argument("--plugins", action="append", default=[], metavar="DIR", help="extra folder of method plugins")
    g = p.add_argument_group("grids, statistics and scale-out")
    g.add_argument("--grid", metavar="FILE", help="run every cell of a grid file (e.g. configs/table6.yaml); "
                                                  "cells already complete are skipped")
    g.add_argument("--reference", help="reference method of the paired comparisons (default protonet)")
    g.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="paired comparison of two finished runs (run ids or run folders), then exit")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (this process, default) or ray (cells and episode shards as Ray tasks)")
    g.add_argument("--ray-address", help="join an existing Ray cluster ('auto' or ray://host:port); "
                                         "default: start a local one")
    g.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--shard-size", type=int, default=100, help="test episodes per Ray evaluation task (default 100)")
    g.add_argument("--threads", type=int, help="torch CPU threads per run/task (default: torch's); CPU results "
                                               "are bit-identical across executors for equal threads")
    g.add_argument("--dry-run", action="store_true", help="print what a grid would run or skip, then exit")
    g.add_argument("--rerun", action="store_true", help="recompute the selected cells: delete their finished runs "
                                                        "(trained method, episode results) and run them again; the "
                                                        "shared pretraining cache is kept")
    g.add_argument("--replace-row", action="store_true",
                   help="write each cell's leaderboard row even over one measured on more episodes or seeds "
                        "(by default that row is kept, said in one line, and the new run stays in runs/)")
    p.add_argument("--list", action="store_true", help="list methods, backbones and datasets, then exit; with "
                   "--method NAME: that method's options, defaults and docs")
    r = p.add_argument_group("reports and the leaderboard")
    r.add_argument("--report", action="store_true",
                   help="re-render table6.md, summary.md/.html and the plot from the CSVs, then exit; --profile, "
                        "--dataset (--dataset-name), --method, --backbone, --ways and --shots select the rows shown")
    r.add_argument("--include-smoke", action="store_true",
                   help="show smoke-profile rows (meaningless numbers) in table6.md and the plot; by default they "
                        "are left out when other rows exist")
    r.add_argument("--format", choices=FORMATS,
                   help="report format: markdown (table6.md, default) or latex (table6.tex, booktabs, beside table6.md)")
    r.add_argument("--forget", nargs="?", const=True, metavar="RUN_ID[,RUN_ID]",
                   help="remove leaderboard rows naming these runs, or (no value) the rows matching --profile, "
                        "--dataset, --method, --backbone, --ways, --shots; run folders are kept unless --delete-runs")
    r.add_argument("--delete-runs", action="store_true", help="with --forget: also delete the removed rows' run folders")
    p.add_argument("--make-episodes", action="store_true", help="(re)generate the committed episode lists, then exit")
    o = p.add_argument_group("output")
    bars = o.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true", default=None,
                      help="progress bars on stderr (default: only when stderr is a terminal)")
    bars.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bars")
    o.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="when the output is not a terminal (piped to a log), print a timestamped progress line "
                        "(stage, step/total, loss, validation accuracy, ETA) every SECONDS (default 60; 0: never)")
    o.add_argument("--tracking", choices=("none", "mlflow"), default="none",
                   help="also log every finished run to a tracker: mlflow (params, curves, final row, run folder "
                        "as artifacts; a local file store under the results folder unless MLFLOW_TRACKING_URI "
                        "is set; needs pip install 'fewshot-nsl[tracking]')")
    o.add_argument("--quiet", "-q", action="store_true", help="no info lines and no progress bars (errors still on stderr)")
    o.add_argument("--log-file", metavar="FILE", help="append every line (info, also with --quiet, and errors) to FILE")
    o.add_argument("--json", action="store_true",
                   help="print the run's rows as benchmark() returns them (on_leaderboard false where the "
                        "leaderboard kept another row), or the --list, as JSON on stdout, nothing else on stdout "
                        "(info lines go to stderr)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def cli_overrides(args: argparse.Namespace, method: Optional[str]) -> Dict[str, Any]:
    """Map parsed flags to config keys (None = not given). ``--backbone``/``--shots`` lists are
    handled by the grid; a single value is passed through."""
    backbones = args.backbone.split(",") if args.backbone else None
    out: Dict[str, Any] = {
        "method": method, "backbone": backbones[0] if backbones and len(backbones) == 1 else None,
        "dataset": args.dataset, "data_root": args.data_root,
        "ways": args.ways, "shots": args.shots[0] if args.shots and len(args.shots) == 1 else None,
        "episodes_file": args.episodes, "image_size": args.image_size,
        "profile": args.profile, "seed": args.seed, "device": args.device, "deterministic": args.deterministic,
        "compile": args.compile, "precision": args.precision, "results_dir": args.results_dir,
        "cache_dir": args.cache_dir,
        "dataset_options": {"label": args.dataset_name} if args.dataset_name else None,
    }
    ev = {k: v for k, v in {"queries": args.queries, "episodes": args.n_episodes}.items() if v is not None}
    if ev:
        out["eval"] = ev
    return out


def overrides_of(args: argparse.Namespace, method: Optional[str] = None) -> Dict[str, Any]:
    """The command line's config overrides: ``--set`` options with the dedicated flags over them.

    Raises:
        ConfigError: a bad ``--set`` (see :func:`fewshot_nsl.config.parse_set_options`).
    """
    from .config import merge, parse_set_options

    flags = {k: v for k, v in cli_overrides(args, method).items() if v is not None}
    return merge(parse_set_options(args.set_options), flags)


def _list(log) -> None:
    from .registry import PLUGIN_ERRORS, list_backbones, list_datasets, list_methods, get_method_class

    log("methods:")
    for name in list_methods():
        cls = get_method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        log(f"  {name:18s} [{'+'.join(cls.training_stages) or 'no training'}] {doc}")
    for where, why in PLUGIN_ERRORS.items():
        log(f"  (plugin {where} not loaded: {why})")
    log("backbones: " + ", ".join(list_backbones()))
    log("datasets:  " + ", ".join(list_datasets()))


def _list_method(name: str, log) -> None:
    """``--list --method NAME``: the method's options with defaults and one-line docs."""
    from .api import method_options

    options = method_options(name)
    log(f"method {name}: options (--set method_options.NAME=VALUE, or method_options: in a --config file)")
    if not options:
        log("  (none)")
    width = max((len(o["name"]) for o in options), default=0)
    for o in options:
        default = "(required)" if o["required"] else f"= {o['default']!r}"
        log(f"  {o['name']:{width}s} {default:14s} {o['doc']}".rstrip())


def _list_json() -> str:
    """``--list --json``: methods (name, training stages, summary line), backbones, datasets, plugin failures."""
    import json

    from .registry import PLUGIN_ERRORS, get_method_class, list_backbones, list_datasets, list_methods

    methods = []
    for name in list_methods():
        cls = get_method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        methods.append({"name": name, "training_stages": list(cls.training_stages), "summary": doc})
    return json.dumps({"version": __version__, "methods": methods, "backbones": list_backbones(),
                       "datasets": list_datasets(), "plugin_errors": dict(PLUGIN_ERRORS)}, indent=1)


def grid_path(spec: str) -> Path:
    """``--grid`` value -> file: a path that exists, else a grid shipped in ``configs/`` named by
    its file name or stem (``table6``, ``table6.yaml``, ``configs/table6.yaml`` from any folder)."""
    path = Path(spec)
    if path.exists():
        return path
    from .config import CONFIG_DIR

    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file() and path.parent in (Path("."), Path("configs")):
            return candidate
    return path  # load_grid names the missing file


def _out_of_memory() -> tuple:
    """``(torch.OutOfMemoryError,)`` once torch is imported (``()`` before: nothing to catch), so
    this module imports without torch and a Ctrl-C during start-up is caught like any other."""
    torch = sys.modules.get("torch")
    return (torch.OutOfMemoryError,) if torch is not None and hasattr(torch, "OutOfMemoryError") else ()


def config_method(config_file: Optional[str]) -> str:
    """The method a ``--config`` file names (``method:``), else ``protonet``: without ``--method``
    the file's method runs, as the file's other keys apply (flags > ``--set`` > file > profile).

    Raises:
        ConfigError: the file's ``method`` is not one method name.
    """
    if not config_file:
        return "protonet"
    from .config import load_yaml

    method = load_yaml(Path(config_file)).get("method")
    if method is None:
        return "protonet"
    if not isinstance(method, str) or not method.strip():
        raise ConfigError(f"config file {config_file}: method must be one method name (several: --method a,b), "
                          f"got {method!r}")
    return method


def results_dir_of(args: argparse.Namespace) -> Path:
    """Where this command's results go: ``--results-dir``, else ``--set results_dir=``, else the
    ``--config`` file's ``results_dir:``, else ``results`` (the one answer used for the run, its
    closing line, ``--report``, ``--forget`` and ``--compare``).

    Raises:
        ConfigError: the config file's ``results_dir`` is not a folder name.
    """
    if args.results_dir:
        return Path(args.results_dir)
    from .config import load_yaml, parse_set_options

    over = parse_set_options(args.set_options).get("results_dir")
    value = over if over is not None else (load_yaml(Path(args.config)).get("results_dir") if args.config else None)
    if value is None:
        return Path("results")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"results_dir must be a folder name, got {value!r}")
    return Path(value)


def results_dir_of_result(result: Any, default: Path) -> Path:
    """The results folder the cells of a :class:`~fewshot_nsl.grid.GridResult` were run into (their
    resolved configs' ``results_dir``), else ``default``."""
    for p in result.cells:
        if p.cfgs:
            return Path(p.cfgs[0].results_dir)
    return default


def _filters(args: argparse.Namespace) -> Dict[str, Any]:
    """The row filters of ``--report`` / ``--forget``: column -> accepted values (None: any)."""
    def split(text: Optional[str]) -> Optional[List[str]]:
        return [t for t in text.split(",") if t] if text else None

    return {"profile": [args.profile] if args.profile else None,
            "dataset": [args.dataset_name] if args.dataset_name else split(args.dataset),
            "method": split(args.method), "backbone": split(args.backbone),
            "ways": [args.ways] if args.ways is not None else None, "shots": args.shots}


def _forget(args: argparse.Namespace, results_dir: Path, log) -> None:
    """``--forget``: remove leaderboard rows (by run ids or filters), say what went in one line,
    delete their run folders with ``--delete-runs``, and re-render the reports."""
    import shutil

    from .leaderboard import forget_rows
    from .reporting import render_reports, run_dirs_of

    ids = None
    if isinstance(args.forget, str):
        ids = [Path(t.strip()).name for t in args.forget.split(",") if t.strip()]
        if not ids:
            raise ConfigError("--forget was given no run id; pass RUN_ID[,RUN_ID] or use filters")
    where = {} if ids is not None else _filters(args)
    lb = results_dir / "leaderboard.csv"
    if not lb.is_file():
        raise ConfigError(f"no leaderboard at {lb}; nothing to forget (pass --results-dir or --config)")
    removed = forget_rows(lb, where, ids)
    if removed.empty:
        asked = f"run(s) {', '.join(ids)}" if ids else "; ".join(
            f"{k} {','.join(map(str, v))}" for k, v in where.items() if v is not None)
        raise ConfigError(f"no leaderboard row in {lb} matches {asked}; nothing removed")
    names = [f"{r.method} {r.backbone} {r.ways}-way {r.shots}-shot on {r.dataset} ({r.profile})"
             for r in removed.itertuples()]
    dirs = [d for run_ids in removed["run_id"] for d in run_dirs_of(results_dir, run_ids)]
    if args.delete_runs:
        runs = (results_dir / "runs").resolve()
        gone = []
        for d in dirs:
            if d.is_dir() and d.resolve().parent == runs:
                shutil.rmtree(d)
                gone.append(d.name)
        what = f"deleted {len(gone)} run folder(s) in {results_dir / 'runs'}"
    else:
        what = f"kept their {len(dirs)} run folder(s) in {results_dir / 'runs'} (--delete-runs removes them)"
    log(f"forgot {len(removed)} leaderboard row(s) of {lb}: {printable('; '.join(names))}; {what}")
    render_reports(results_dir, reference=args.reference, include_smoke=args.include_smoke or None,
                   formats=(args.format or "markdown",), log=log)


def check_report_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something with ``--report`` / ``--forget`` are refused elsewhere, not ignored.

    Raises:
        ConfigError: naming the flag.
    """
    if args.delete_runs and not args.forget:
        raise ConfigError("--delete-runs deletes the run folders of the rows --forget removes; add --forget")
    if not (args.report or args.forget):
        for flag, given in (("--include-smoke", args.include_smoke), ("--format", args.format)):
            if given:
                raise ConfigError(f"{flag} applies to --report (and --forget's re-rendered reports); add --report")
    if args.forget and (args.report or args.compare or args.grid or args.dry_run):
        raise ConfigError("--forget edits the leaderboard and re-renders the reports; run it on its own (with "
                          "filters or run ids)")
    if args.dataset_name and args.dataset not in (None, "custom"):
        raise ConfigError(f"--dataset-name names a --dataset custom; --dataset {args.dataset} has its own name")


def suite_warning_lines(log, previous: Any) -> Any:
    """A ``warnings.showwarning`` that shows the suite's own warnings
    (:class:`~fewshot_nsl.inputs.SuiteWarning`: a test split too small for its episodes) as one
    ``warning: ...`` line each through ``log``, and any other warning with ``previous``."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        from .inputs import SuiteWarning

        if issubclass(category, SuiteWarning):
            log(f"warning: {message}")
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def _executor(args: argparse.Namespace):
    from .executors import LocalExecutor, RayExecutor

    if args.executor == "ray":
        if args.ray_num_cpus is not None and args.ray_num_cpus < 1:
            raise ConfigError(f"--ray-num-cpus must be at least 1, got {args.ray_num_cpus}")
        return RayExecutor(address=args.ray_address, num_cpus=args.ray_num_cpus, threads=args.threads,
                           shard_size=args.shard_size, plugin_dirs=args.plugins)
    if args.ray_address:
        raise ConfigError("--ray-address needs --executor ray")
    if args.ray_num_cpus is not None:
        raise ConfigError("--ray-num-cpus needs --executor ray (the local executor runs in this process)")
    return LocalExecutor(threads=args.threads)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's stop, ``kill``): handled like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` (a ``KeyboardInterrupt``) for the duration, so a run
    stopped by a scheduler or ``kill`` ends like Ctrl-C: one line, everything finished kept,
    resumable. The previous handler is restored (``main`` is also called in process by tests)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Most torch CPU threads ``--threads`` accepts (far above any machine's cores; 10**20 overflowed torch's C int).
MAX_THREADS = 1024

INTERRUPTED = "interrupted: finished episodes and checkpoints are saved; run the same command again to resume"


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (see the module docstring). Ctrl-C or SIGTERM at
    any point, start-up included, ends with one ``interrupted:`` line and status 130."""
    try:
        with sigterm_as_interrupt():
            return _main(argv)
    except KeyboardInterrupt:  # before or after _main's own handler (argument parsing, imports)
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(quiet=args.quiet, json_mode=args.json, log_file=Path(args.log_file) if args.log_file else None,
                      results_dir=Path(args.results_dir) if args.results_dir else None,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    log = console.info
    progress = show_progress(args.progress, args.quiet)
    shower = warnings.showwarning
    try:
        warnings.showwarning = suite_warning_lines(log, shower)
        check_not_empty(args)
        check_path_flags(args)
        check_malloc_switch()  # FEWSHOT_NSL_MALLOC: refused before anything is written
        console.open()
        if args.json and (args.compare or args.report or args.make_episodes or args.dry_run or args.forget):
            raise ConfigError("--json prints the rows of a run or the --list; drop it for --compare, --report, "
                              "--forget, --make-episodes and --dry-run")
        check_report_flags(args)
        from .data.formats import ImageModeWarning

        warnings.simplefilter("ignore", ImageModeWarning)  # runner.prepare says it as one info line instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            from .registry import load_plugins

            load_plugins([Path(d) for d in args.plugins])
        if args.list:
            if args.method and args.json:
                import json

                from .api import method_options

                console.emit_json(json.dumps({m: method_options(m) for m in args.method.split(",")}, indent=1,
                                             default=repr))
            elif args.method:
                for m in args.method.split(","):
                    _list_method(m, log)
            elif args.json:
                console.emit_json(_list_json())
            else:
                _list(log)
            return 0
        for failure in _plugin_failures(args.plugins):  # the other methods keep working
            log(f"warning: {failure}; skipped")
        if args.make_episodes:
            from .data.episode_lists import make_committed_lists
            from .resources import checkout_root

            if checkout_root() is None:
                raise ConfigError("--make-episodes rewrites the episode lists committed in a git checkout of "
                                  "fewshot-nsl; run it there (this copy is installed)")

            for path in make_committed_lists():
                log(f"wrote {path}")
            return 0
        results_dir = results_dir_of(args)
        if args.forget:
            _forget(args, results_dir, log)
            return 0
        if args.report and not args.grid:
            from .reporting import render_reports

            for kind, path in render_reports(results_dir, reference=args.reference, where=_filters(args),
                                             include_smoke=args.include_smoke or None,
                                             formats=(args.format or "markdown",), log=log).items():
                log(f"{kind}: {path}")
            return 0
        if args.compare:
            from .reporting import compare_runs

            log(compare_runs(args.compare[0], args.compare[1], results_dir))
            return 0
        from .grid import cells_from_args, filter_cells, load_grid, run_grid

        methods = args.method.split(",") if args.method else None
        backbones = args.backbone.split(",") if args.backbone else None
        if console.log_file is not None and args.config:  # a config file may move the results, cache and data
            from .config import resolve_config
            from .safe_io import check_log_file

            first = (methods or [config_method(args.config)])[0]
            cfg = resolve_config(overrides_of(args, None if first == "all" else first), args.config)
            check_log_file(Path(console.log_file), Path(cfg.results_dir),
                           Path(cfg.cache_dir) if cfg.cache_dir else None,
                           inputs=[Path(p) for p in (cfg.data_root, args.config) if p])
        grid_name = None
        if args.grid:
            grid_name, cells = load_grid(grid_path(args.grid))
            cells = filter_cells(cells, None if methods == ["all"] else methods, backbones, args.shots)
        else:
            cells = cells_from_args(methods or [config_method(args.config)], backbones, args.shots)
        if args.report:
            from .reporting import render_reports

            grid = None
            if grid_name:
                grid = (grid_name, [{"method": c.method, "backbone": c.backbone, "shots": c.shots} for c in cells
                                    if c.backbone is not None and c.shots is not None])
            for kind, path in render_reports(results_dir, reference=args.reference, grid=grid, where=_filters(args),
                                             include_smoke=args.include_smoke or None,
                                             formats=(args.format or "markdown",), log=log).items():
                log(f"{kind}: {path}")
            return 0
        if args.seeds and args.seed is not None:
            raise ConfigError("give either --seed or --seeds, not both")
        if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
            raise ConfigError(f"--threads must be at least 1 and at most {MAX_THREADS}, got {args.threads}")
        result = run_grid(
            cells, overrides_of(args), args.config, seeds=args.seeds, executor=_executor(args),
            reference=args.reference, skip_unregistered=bool(args.grid), grid_name=grid_name,
            progress=progress, log=log, fail_fast=not args.grid and len(cells) == 1, dry_run=args.dry_run,
            rerun=args.rerun, replace_row=args.replace_row,
            progress_every=None if progress or args.quiet else args.progress_every,
            tracking=None if args.tracking == "none" else args.tracking,
        )
        if args.dry_run:
            return 0
        results_dir = results_dir_of_result(result, results_dir)
        log(f"leaderboard: {results_dir / 'leaderboard.csv'}, table: {results_dir / 'table6.md'}, "
            f"summary: {results_dir / 'summary.md'}, plot: {results_dir / 'leaderboard.png'}")
        if args.json:
            import json

            from .api import grid_rows

            # through pandas' JSON writer (NaN -> null, numpy scalars), re-indented without its escaped slashes
            records = json.loads(grid_rows(result, results_dir).to_json(orient="records"))
            console.emit_json(json.dumps(records, indent=1))
        if result.failed:
            names = "; ".join(f"{p.describe()}: {p.error}" for p in result.failed)
            console.error(f"error: {len(result.failed)} cell(s) failed: {printable(names)}")
            return 1
        return 0
    except FewShotError as exc:
        failures = _plugin_failures(args.plugins) if isinstance(exc, RegistryError) else []
        console.error(f"error: {printable('; '.join([str(exc), *failures]))}")
        return 2
    except OSError as exc:  # a full disk, a read-only results folder: the system's reason, in one line
        where = f" {exc.filename}" if exc.filename else ""
        console.error(f"error: cannot read or write{printable(where)}: {exc.strerror or exc}; free disk space or make the "
                      f"folder writable (or pass another --results-dir / --cache-dir), then run the same command "
                      f"again: finished episodes are kept and resume")
        return 2
    except _out_of_memory():
        console.error("error: out of GPU memory; lower the meta-batch (episodic.meta_batch), the image size (--image-size), "
                      "use first-order MAML (method_options: {first_order: true}) or run on --device cpu; "
                      "finished episodes are kept, rerun to resume")
        return 3
    except KeyboardInterrupt:
        console.error(INTERRUPTED)
        return 130
    finally:
        warnings.showwarning = shower
        console.close()


if __name__ == "__main__":
    sys.exit(main())
