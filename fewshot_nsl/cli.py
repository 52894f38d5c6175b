"""Command line: ``python run_benchmarks.py --method protonet --shots 5``.

Any problem with the user's input ends with one line ``error: ...`` and exit status 2;
Ctrl-C ends with a resume hint and status 130.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import FewShotError

EPILOG = """examples:
  python run_benchmarks.py                                  # protonet, 5-way 5-shot, glyphs, quick profile
  python run_benchmarks.py --method dynamic_nsn --shots 1
  python run_benchmarks.py --dataset miniimagenet --data-root ~/data/mini --profile paper --device cuda
  python run_benchmarks.py --list
  python run_benchmarks.py --report                         # re-render table6.md and the plot from the CSV
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmarks.py",
        description="fewshot-nsl: few-shot benchmarks around Neural Similarity Learning.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", help="method name(s), comma-separated, or 'all' (see --list); default protonet")
    p.add_argument("--backbone", help="backbone name (cnn4, cnn9)")
    p.add_argument("--dataset", help="glyphs (embedded, default), miniimagenet, custom")
    p.add_argument("--data-root", help="folder holding the dataset (miniimagenet, custom)")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int, help="queries per class at test (default 15)")
    p.add_argument("--episodes", help="fixed episode list (JSON) to evaluate on")
    p.add_argument("--n-episodes", type=int, help="evaluate the first N episodes of the list")
    p.add_argument("--image-size", type=int)
    p.add_argument("--profile", choices=["smoke", "quick", "paper"], help="training/eval budget (default quick)")
    p.add_argument("--config", help="YAML config file (overrides the profile; CLI flags override it)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels (slower on GPU)")
    p.add_argument("--results-dir", help="where leaderboard.csv, table6.md and runs/ go (default results)")
    p.add_argument("--cache-dir", help="dataset/pretraining cache (default $FEWSHOT_NSL_CACHE or ~/.cache/fewshot_nsl)")
    p.add_argument("--plugins", action="append", default=[], metavar="DIR", help="extra folder of method plugins")
    p.add_argument("--list", action="store_true", help="list methods, backbones and datasets, then exit")
    p.add_argument("--report", action="store_true", help="re-render reports from the leaderboard CSV, then exit")
    p.add_argument("--make-episodes", action="store_true", help="(re)generate the committed episode lists, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cli_overrides(args: argparse.Namespace, method: Optional[str]) -> Dict[str, Any]:
    """Map parsed flags to config keys (None = not given)."""
    out: Dict[str, Any] = {
        "method": method, "backbone": args.backbone, "dataset": args.dataset, "data_root": args.data_root,
        "ways": args.ways, "shots": args.shots, "episodes_file": args.episodes, "image_size": args.image_size,
        "profile": args.profile, "seed": args.seed, "device": args.device, "deterministic": args.deterministic,
        "results_dir": args.results_dir, "cache_dir": args.cache_dir,
    }
    ev = {k: v for k, v in {"queries": args.queries, "episodes": args.n_episodes}.items() if v is not None}
    if ev:
        out["eval"] = ev
    return out


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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = print
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            from .registry import load_plugins

            load_plugins([Path(d) for d in args.plugins])
        if args.list:
            _list(log)
            return 0
        if args.make_episodes:
            from .data.episode_lists import make_committed_lists

            for path in make_committed_lists():
                log(f"wrote {path}")
            return 0
        from .config import resolve_config
        from .reporting import render_reports

        results_dir = Path(args.results_dir or "results")
        if args.report:
            for kind, path in render_reports(results_dir).items():
                log(f"{kind}: {path}")
            return 0
        from .registry import list_methods
        from .runner import run

        methods = (args.method or "protonet").split(",")
        if methods == ["all"]:
            methods = list_methods()
        configs = [resolve_config(cli_overrides(args, m), args.config) for m in methods]
        for cfg in configs:
            row = run(cfg, progress=not args.no_progress, log=log)
            note = " (synthetic dataset: not comparable with Mini-ImageNet)" if row["synthetic"] else ""
            paper = f"; paper (Mini-ImageNet): {row['paper_value']:.2f} +- {row['paper_ci']:.2f}" if row["paper_value"] else ""
            log(f"{row['method']} {row['backbone']} {row['ways']}-way {row['shots']}-shot on {row['dataset']}: "
                f"{row['accuracy']:.2f} +- {row['ci95']:.2f} over {row['episodes']} episodes{paper}{note}")
        log(f"leaderboard: {results_dir / 'leaderboard.csv'}, table: {results_dir / 'table6.md'}, plot: {results_dir / 'leaderboard.png'}")
        return 0
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished episodes and checkpoints are saved; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
