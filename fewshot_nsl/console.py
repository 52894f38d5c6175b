"""What the command line prints, and where: info lines, errors, a log file, progress bars, JSON.

* Info lines (what runs, results, where the reports are) go to stdout, or to stderr with
  ``--json`` (stdout then holds the JSON document only); ``--quiet`` drops them.
* ``error: ...`` and ``interrupted: ...`` lines always go to stderr.
* ``--log-file FILE`` appends every line (info, also under ``--quiet``, and errors) to FILE. FILE
  may not be inside the results or cache folder (the suite's own files), nor a folder, FIFO, socket
  or device (:func:`fewshot_nsl.safe_io.check_log_file`).
* Progress bars (tqdm, on stderr) are shown when stderr is a terminal, or with ``--progress``;
  ``--no-progress`` and ``--quiet`` turn them off.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Optional

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
