"""What the command line prints, and where: info lines, errors, a log file, progress bars, JSON.

* Info lines (what runs, results, where the reports are) go to stdout, or to stderr with
  ``--json`` (stdout then holds the JSON document only); ``--quiet`` drops them.
* ``error: ...`` and ``interrupted: ...`` lines always go to stderr.
* ``--log-file FILE`` appends every line (info, also under ``--quiet``, and errors) to FILE. FILE
  may not be inside the results or cache folder (the suite's own files), nor a folder, FIFO, socket
  or device (:func:`fewshot_nsl.safe_io.check_log_file`).
* Progress bars (tqdm, on stderr) are shown when stderr is a terminal, or with ``--progress``;
  ``--no-progress`` and ``--quiet`` turn them off.
* Without bars (output piped to a log), a run prints a timestamped progress line every
  ``--progress-every`` seconds (:class:`RunStatus`, :class:`Heartbeat`): stage, step/total, loss,
  validation accuracy where there is one, ETA.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Optional, Tuple

from .errors import ConfigError
from .safe_io import check_log_file

#: The results folder when ``--results-dir`` is not given (the CLI's default).
DEFAULT_RESULTS_DIR = Path("results")


def command_name(argv0: Optional[str] = None) -> str:
    """The command the user ran, for messages and ``--help``: ``fewshot-nsl`` (the installed
    script), ``python -m fewshot_nsl`` or ``run_benchmarks.py`` (the checkout's script).

    Args:
        argv0: the program path (default ``sys.argv[0]``).
    """
    name = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "")).name
    if name == "__main__.py":
        return "python -m fewshot_nsl"
    if name.startswith("run_benchmarks"):
        return "run_benchmarks.py"
    return "fewshot-nsl"


def show_progress(progress: Optional[bool], quiet: bool = False, stream: IO[str] = sys.stderr) -> bool:
    """Whether to draw progress bars: ``progress`` when given (``--progress`` / ``--no-progress``),
    else when ``stream`` is a terminal; never under ``quiet``."""
    if quiet:
        return False
    if progress is not None:
        return progress
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _default_cache_dir() -> Path:
    from .data.store import default_cache_dir  # numpy only; not imported unless a log file is asked for

    return default_cache_dir()


@dataclass
class Console:
    """The CLI's output channels (see the module docstring).

    Attributes:
        quiet: drop info lines.
        json_mode: info lines go to stderr; stdout is kept for :meth:`emit_json`.
        log_file: path every line is appended to.
        results_dir: the results folder the log file must stay out of (None: the default
            ``results``; a config file may name another, checked again once it is resolved).
        cache_dir: the cache folder the log file must stay out of (None: the default cache).
    """

    quiet: bool = False
    json_mode: bool = False
    log_file: Optional[Path] = None
    results_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None
    _log: Optional[IO[str]] = field(default=None, repr=False)

    def open(self) -> "Console":
        """Open the log file (a one-line :class:`ConfigError` if it cannot be written, or is a file
        the suite manages, a folder, FIFO or device: :func:`~fewshot_nsl.safe_io.check_log_file`)."""
        if self.log_file is not None:
            check_log_file(Path(self.log_file), self.results_dir or DEFAULT_RESULTS_DIR,
                           self.cache_dir or _default_cache_dir())
            try:
                Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_file, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot write the log file {self.log_file} ({exc.strerror or exc}); "
                                  f"pass a writable path to --log-file") from None
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write_log(f"--- {stamp} {command_name()} {' '.join(sys.argv[1:])}".rstrip())
        return self

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _write_log(self, line: str) -> None:
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def info(self, line: str) -> None:
        """An info line: stdout (stderr in JSON mode), nothing under ``quiet``; always logged."""
        self._write_log(line)
        if not self.quiet:
            print(line, file=sys.stderr if self.json_mode else sys.stdout, flush=True)

    def error(self, line: str) -> None:
        """An ``error: ...`` / ``interrupted: ...`` line: stderr, whatever the mode; logged."""
        self._write_log(line)
        print(line, file=sys.stderr, flush=True)

    def emit_json(self, text: str) -> None:
        """The JSON document: the only thing on stdout in JSON mode."""
        print(text, file=sys.stdout, flush=True)


# ----------------------------------------------------------------------------- progress lines for logs
class ProgressMode:
    """The ``progress`` value handed through the executors to a run: true when tqdm bars are drawn (a terminal,
    or ``--progress``), and, when they are not, how often a run prints a timestamped progress line
    (``--progress-every``). Falsy where there are no bars, so it stands for the ``progress`` bool everywhere.

    Args:
        bars: draw tqdm bars.
        every: seconds between progress lines (None or 0: no lines).
    """

    def __init__(self, bars: bool, every: Optional[float] = None) -> None:
        self.bars, self.every = bool(bars), every

    def __bool__(self) -> bool:
        return self.bars

    def __repr__(self) -> str:
        return f"ProgressMode(bars={self.bars}, every={self.every})"


def progress_every_of(progress: object) -> Optional[float]:
    """The progress-line interval carried by a ``progress`` value (a :class:`ProgressMode`), else None."""
    every = getattr(progress, "every", None)
    return float(every) if every else None


def _clock(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunStatus:
    """Where one run stands: its stage, step of total, last loss and validation accuracy, read by the progress
    line (:class:`Heartbeat`). The training loops set plain Python numbers they already hold on the host (the
    step counter, the loss of the last curve row, the last validation's accuracy): a progress line never makes
    the device synchronise.

    Args:
        label: names the run in every line (``protonet cnn4 5w5s seed 0``).
        log: where :meth:`note` lines go (the console's info line).
    """

    def __init__(self, label: str, log: Callable[[str], None] = print) -> None:
        self.label, self.log = label, log
        self.stage: Optional[str] = None
        self.step, self.total, self.unit = 0, 0, "step"
        self.loss: Optional[float] = None
        self.val_accuracy: Optional[float] = None
        self.poll: Optional[Callable[[], Tuple[int, Optional[float]]]] = None
        self._t0, self._step0 = time.monotonic(), 0

    def begin(self, stage: str, total: int, done: int = 0, unit: str = "step",
              poll: Optional[Callable[[], Tuple[int, Optional[float]]]] = None) -> None:
        """A stage starts (or resumes) at ``done`` of ``total``; ``poll`` (optional) returns ``(done, accuracy)``
        when the line is due (the evaluation counts the rows of its CSV)."""
        self.stage, self.total, self.step, self.unit, self.poll = stage, int(total), int(done), unit, poll
        self.loss = self.val_accuracy = None
        self._t0, self._step0 = time.monotonic(), int(done)

    def note(self, text: str) -> None:
        """A one-off line (e.g. where a resumed run goes on from)."""
        self.log(text)

    def line(self) -> str:
        """``[2026-12-06 12:40:01] protonet cnn4 5w5s seed 0: episodic step 120/1000 (12%), loss 1.234, ...``."""
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        if self.stage is None:
            return f"[{stamp}] {self.label}: setting up (building the method, loading data)"
        step, acc_name, acc = self.step, "val acc", self.val_accuracy
        if self.poll is not None:
            step, acc = self.poll()
            acc_name = "mean acc so far"
        parts = [f"{self.stage} {self.unit} {step}/{self.total}" + (f" ({100 * step / self.total:.0f}%)" if self.total else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if acc is not None:
            parts.append(f"{acc_name} {100 * acc if self.poll is None else acc:.2f}%")
        elapsed, done = time.monotonic() - self._t0, step - self._step0
        if step >= self.total:
            parts.append("stage done")
        elif done > 0 and elapsed > 0:
            parts.append(f"ETA {_clock((self.total - step) * elapsed / done)} (this stage)")
        else:
            parts.append("ETA unknown yet")
        return f"[{stamp}] {self.label}: " + ", ".join(parts)


class Heartbeat:
    """A background thread printing :meth:`RunStatus.line` every ``every`` seconds while the ``with`` block
    runs (long runs piped to a log, where tqdm bars are off). A failing line is dropped, never the run.

    Args:
        status: the run's status.
        every: seconds between lines (None or 0: the thread is not started).
        log: where the lines go.
    """

    def __init__(self, status: RunStatus, every: Optional[float], log: Callable[[str], None] = print) -> None:
        self.status, self.every, self.log = status, every, log
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        assert self.every
        while not self._stop.wait(self.every):
            try:
                self.log(self.status.line())
            except Exception:  # noqa: BLE001 - a progress line must never end a run
                pass

    def __enter__(self) -> "Heartbeat":
        if self.every and self.every > 0:
            self._thread = threading.Thread(target=self._run, name="fewshot-nsl-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
