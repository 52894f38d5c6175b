"""Experiment trackers: every finished run logged to MLflow (``--tracking mlflow``, ``tracking="mlflow"``).

Per run (one MLflow run named by the suite's run id, in the experiment ``fewshot-nsl``):

* params: the resolved config (``config.yaml``), flattened to dotted keys (``episodic.steps``);
* metrics: the training curves (``<stage>/loss``, ``<stage>/accuracy`` at their steps) and the final
  row's numbers (``accuracy``, ``ci95``, ``ci95_t``, ``episodes``, times, memory);
* tags: dataset, method, backbone, ways, shots, profile, split, seed, identity digest, git commit;
* artifacts: the run folder (``run/``: config, curves, episodes.csv, summary.json, ...), without the
  trained weights (``*.pt``), which can be large.

Where: ``MLFLOW_TRACKING_URI`` when set, else a local file store ``<results_dir>/mlruns`` (works
offline; MLflow 3 keeps its file store in maintenance mode, so the suite sets ``MLFLOW_ALLOW_FILE_STORE=true``
for it unless the environment sets it; ``mlflow ui --backend-store-uri <results_dir>/mlruns`` shows it). MLflow is optional:
``pip install 'fewshot-nsl[tracking]'`` (``mlflow-skinny``); without it ``--tracking mlflow`` is refused
in one line before anything runs. A failure to log is reported and never fails the run.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from .errors import ConfigError

TRACKERS = ("mlflow",)
EXPERIMENT = "fewshot-nsl"
INSTALL_HINT = "pip install 'fewshot-nsl[tracking]' (or pip install mlflow-skinny)"
#: Numbers of the final row logged as metrics.
ROW_METRICS = ("accuracy", "ci95", "ci95_t", "std", "episodes", "episodes_failed", "train_time_s", "eval_time_s",
               "wall_time_s", "peak_memory_mb", "params", "parts")
TAGS = ("dataset", "method", "backbone", "ways", "shots", "profile", "split", "seed", "precision", "device",
        "git_commit", "run_id", "resumed")
#: MLflow's limit on a param value's length.
MAX_PARAM = 6000


def flatten(data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}`` (lists and other leaves kept as they are)."""
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def import_mlflow():
    """Import MLflow or raise a one-line :class:`ConfigError` saying what to install."""
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError:
        raise ConfigError(f"--tracking mlflow needs MLflow: {INSTALL_HINT}") from None
    return mlflow


def tracking_uri(results_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the local file store ``<results_dir>/mlruns`` (a ``file:`` URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(results_dir).resolve() / "mlruns").as_uri()


def check_tracking(tracking: Optional[str]) -> None:
    """Refuse an unknown tracker or a missing package in one line (before anything runs)."""
    if tracking is None:
        return
    if tracking not in TRACKERS:
        raise ConfigError(f"unknown tracker {tracking!r}; use one of: {', '.join(TRACKERS)}")
    import_mlflow()


class MlflowTracker:
    """Logs finished runs to MLflow through ``MlflowClient`` (no global MLflow state is changed).

    Args:
        results_dir: the results folder (its ``mlruns/`` is the default store).
        log: where the one line per logged run goes.
    """

    def __init__(self, results_dir: Path, log: Callable[[str], None] = print) -> None:
        import_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(results_dir)
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless opted in; mlflow-skinny has no
            # SQL backend (no sqlalchemy), so the offline default opts in (a user's own setting is left alone)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.log = log
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(EXPERIMENT)

    def log_run(self, summary: Mapping[str, Any], run_dir: Path) -> Optional[str]:
        """Log one finished run (see the module docstring); returns the MLflow run id, or None when it failed
        (said in one ``warning:`` line)."""
        try:
            return self._log_run(summary, Path(run_dir))
        except Exception as exc:  # noqa: BLE001 - the tracker is a copy; the run's own files are the record
            self.log(f"warning: MLflow logging of run {summary.get('run_id')} failed ({type(exc).__name__}: "
                     f"{' '.join(str(exc).split())[:200]}); the run itself is complete")
            return None

    def _log_run(self, summary: Mapping[str, Any], run_dir: Path) -> str:
        from mlflow.entities import Metric, Param, RunTag

        import yaml

        from .curves import CSV_NAME, read_curve

        tags = [RunTag(k, str(summary.get(k))) for k in TAGS if summary.get(k) is not None]
        tags.append(RunTag("identity", str(summary.get("config_hash", ""))))
        run = self.client.create_run(self.experiment_id, run_name=str(summary.get("run_id")), tags={t.key: t.value for t in tags})
        rid = run.info.run_id
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(flatten(cfg or {}).items())]
        now = int(time.time() * 1000)
        metrics: List[Any] = []
        if (run_dir / CSV_NAME).is_file():
            for r in read_curve(run_dir / CSV_NAME):
                metrics.append(Metric(f"{r['stage']}/loss", float(r["loss"]), now, int(r["step"])))
                if r.get("accuracy") is not None:
                    metrics.append(Metric(f"{r['stage']}/accuracy", float(r["accuracy"]), now, int(r["step"])))
        for k in ROW_METRICS:
            v = summary.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                metrics.append(Metric(k, float(v), now, 0))
        for i in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params / 1000 metrics a batch
            self.client.log_batch(rid, metrics=metrics[i:i + 100], params=params[i:i + 100])
        with tempfile.TemporaryDirectory() as tmp:  # the run folder without the (large) trained weights
            copy = Path(tmp) / "run"
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "*.partial", "shards"))
            self.client.log_artifacts(rid, str(copy), artifact_path="run")
        self.client.set_terminated(rid)
        self.log(f"mlflow: run {summary.get('run_id')} logged to {self.uri} (MLflow run {rid})")
        return rid


def make_tracker(tracking: Optional[str], results_dir: Path, log: Callable[[str], None] = print) -> Optional[MlflowTracker]:
    """The tracker ``tracking`` names (None: none). Raises the one-line errors of :func:`check_tracking`."""
    check_tracking(tracking)
    return MlflowTracker(results_dir, log) if tracking == "mlflow" else None
