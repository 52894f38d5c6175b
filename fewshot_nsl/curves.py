"""Training curves: loss and accuracy every N steps, written to every run folder.

The training loops (:func:`fewshot_nsl.training.pretrain`, :func:`~fewshot_nsl.training.meta_train`)
feed a :class:`StageCurve` one value per optimiser step; it keeps one row per ``N`` steps (the mean
over those steps, ``N = ceil(total steps / 100)``, so about 100 points per stage). The rows travel
in the stage's checkpoints (a resumed run keeps its curve) and, for pretraining, in the shared
cache file (a run that reuses the cached pretraining still shows its curve). The run then writes
(:func:`write_curves`):

* ``training_curve.csv``: ``stage,step,loss,accuracy`` (accuracy on the batch or the episode's
  queries; empty where the method's loss does not go through its logits);
* ``training_curves.png``: loss and accuracy against steps, one line per stage (matplotlib, Agg);
* ``tensorboard/``: TensorBoard events (``<stage>/loss``, ``<stage>/accuracy``; after the evaluation
  ``evaluate/accuracy``, ``evaluate/ci95`` and the resolved config as hparams) when the optional
  ``tensorboard`` package is installed (``pip install fewshot-nsl[tensorboard]``); skipped otherwise.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .safe_io import atomic_write

FIELDS = ["stage", "step", "loss", "accuracy"]
CSV_NAME = "training_curve.csv"
PNG_NAME = "training_curves.png"
#: Points per stage (about): rows are kept every ``ceil(total / POINTS)`` steps.
POINTS = 100


class StageCurve:
    """The curve of one training stage.

    Args:
        stage: ``pretrain`` or ``episodic``.
        total_steps: optimiser steps of the stage.
        rows: rows kept so far (from a checkpoint when the stage resumes).
    """

    def __init__(self, stage: str, total_steps: int, rows: Sequence[Dict[str, Any]] = ()) -> None:
        self.stage = stage
        self.total = int(total_steps)
        self.every = max(1, math.ceil(self.total / POINTS))
        self.rows: List[Dict[str, Any]] = [dict(r) for r in rows]
        self._loss: List[float] = []
        self._acc: List[float] = []

    def update(self, step: int, loss: float, accuracy: Optional[float] = None) -> None:
        """Record optimiser step ``step`` (1-based); a row is kept every ``every`` steps and at the end."""
        self._loss.append(float(loss))
        if accuracy is not None:
            self._acc.append(float(accuracy))
        if step % self.every == 0 or step == self.total:
            self.rows.append({
                "stage": self.stage, "step": int(step), "loss": round(sum(self._loss) / len(self._loss), 6),
                "accuracy": round(sum(self._acc) / len(self._acc), 6) if self._acc else None,
            })
            self._loss, self._acc = [], []


class LogitsProbe:
    """Accuracy of a method's episodic loss, read from its logits without computing anything again.

    A forward hook on the method keeps its last output; where that is ``(n_query, ways)`` logits
    for the episode's queries, :meth:`accuracy` compares their argmax with the labels. Methods
    whose loss does not call the method itself (e.g. through an adapted copy) give None.

    Args:
        module: the method (an ``nn.Module``).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self._last: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._last = output.detach() if isinstance(output, torch.Tensor) else None

    def accuracy(self, query_y: torch.Tensor) -> Optional[float]:
        """Query accuracy of the last logits seen (then forgotten), or None."""
        acc = self.accuracy_tensor(query_y)
        return None if acc is None else float(acc)

    def accuracy_tensor(self, query_y: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`accuracy` as a 0-d tensor on the logits' device (no host synchronisation), or None."""
        out, self._last = self._last, None
        if out is None or out.dim() != 2 or out.shape[0] != query_y.shape[0]:
            return None
        return (out.argmax(1) == query_y).float().mean()

    def forget(self) -> None:
        """Drop the last logits seen (e.g. a validation's, so the next training step reads only its own)."""
        self._last = None

    def close(self) -> None:
        self._handle.remove()


def _atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), binary=True)


def curve_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """``training_curve.csv`` text of ``rows``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    return buf.getvalue()


def curve_png(rows: Sequence[Dict[str, Any]], title: str = "") -> bytes:
    """PNG bytes of the loss and accuracy curves (matplotlib's Agg canvas, no pyplot state).

    Text (the title, stage names) is drawn verbatim: a ``$`` in a run or method name is a dollar
    sign, not mathtext (:data:`fewshot_nsl.reporting.PLAIN_TEXT_RC`), and control characters are
    shown as escapes."""
    import matplotlib

    from .reporting import PLAIN_TEXT_RC

    with matplotlib.rc_context(PLAIN_TEXT_RC):
        return _curve_png(rows, title)


def _curve_png(rows: Sequence[Dict[str, Any]], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .reporting import visible

    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for stage in stages:
        pts = [r for r in rows if r["stage"] == stage]
        ax_loss.plot([r["step"] for r in pts], [r["loss"] for r in pts], label=visible(stage))
        acc = [r for r in pts if r.get("accuracy") is not None]
        if acc:
            ax_acc.plot([r["step"] for r in acc], [100 * float(r["accuracy"]) for r in acc], label=visible(stage))
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="training accuracy (%)", title="accuracy")
    if not rows:
        for ax in (ax_loss, ax_acc):
            ax.text(0.5, 0.5, "no training stage", ha="center", va="center", transform=ax.transAxes)
    for ax in (ax_loss, ax_acc):
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(visible(title), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_tensorboard(run_dir: Path, rows: Sequence[Dict[str, Any]]) -> Optional[Path]:
    """TensorBoard events under ``run_dir/tensorboard`` if ``tensorboard`` is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional extra is not installed: skipped silently
        return None
    out = Path(run_dir) / "tensorboard"
    writer = SummaryWriter(log_dir=str(out))
    try:
        for r in rows:
            writer.add_scalar(f"{r['stage']}/loss", float(r["loss"]), int(r["step"]))
            if r.get("accuracy") is not None:
                writer.add_scalar(f"{r['stage']}/accuracy", float(r["accuracy"]), int(r["step"]))
    finally:
        writer.close()
    return out


def write_curves(run_dir: Path, rows: Sequence[Dict[str, Any]], title: str = "") -> Dict[str, Path]:
    """Write ``training_curve.csv``, ``training_curves.png`` (and TensorBoard events) into ``run_dir``.

    Returns:
        ``{"csv": path, "png": path[, "tensorboard": folder]}``.
    """
    run_dir = Path(run_dir)
    out = {"csv": run_dir / CSV_NAME, "png": run_dir / PNG_NAME}
    _atomic_bytes(out["csv"], curve_csv(rows).encode())
    _atomic_bytes(out["png"], curve_png(rows, title))
    tb = write_tensorboard(run_dir, rows)
    if tb is not None:
        out["tensorboard"] = tb
    return out


def read_curve(path: Path) -> List[Dict[str, Any]]:
    """Rows of a ``training_curve.csv`` (numbers parsed; empty accuracy -> None)."""
    with open(path, newline="") as f:
        return [{"stage": r["stage"], "step": int(r["step"]), "loss": float(r["loss"]),
                 "accuracy": float(r["accuracy"]) if r["accuracy"] else None} for r in csv.DictReader(f)]


def hparams_of(cfg: Any) -> Dict[str, Any]:
    """The resolved config as TensorBoard hparams: dotted keys, values int/float/str/bool (others as text)."""
    from .tracking import flatten

    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out = {}
    for k, v in flatten(data).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def write_tensorboard_summary(run_dir: Path, cfg: Any, summary: Dict[str, Any]) -> Optional[Path]:
    """Add the evaluation to the run's TensorBoard events (``evaluate/accuracy``, ``evaluate/ci95``) and the
    hyperparameters (the resolved config, with the accuracy and CI as the hparams metrics), if ``tensorboard``
    is installed; else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    out = Path(run_dir) / "tensorboard"
    acc, ci = float(summary["accuracy"]), float(summary["ci95"])
    writer = SummaryWriter(log_dir=str(out))
    try:
        writer.add_scalar("evaluate/accuracy", acc, 0)
        writer.add_scalar("evaluate/ci95", ci, 0)
        writer.add_hparams(hparams_of(cfg), {"hparam/accuracy": acc, "hparam/ci95": ci}, run_name=".")
    finally:
        writer.close()
    return out
