"""User-facing errors.

Every problem caused by the user's input (paths, datasets, options, configs) is raised
as a :class:`FewShotError` whose message is one line saying what is wrong and how to
fix it. The CLI prints ``error: <message>`` and exits with status 2, never a traceback.
"""
from __future__ import annotations


class FewShotError(Exception):
    """Base class for errors whose message is meant for the user, verbatim."""


class DataError(FewShotError):
    """A dataset source is missing, malformed, mislabelled or too small."""


class ConfigError(FewShotError):
    """A configuration value, option name or CLI argument is invalid."""


class RegistryError(ConfigError):
    """An unknown method, backbone or dataset name, or an unknown option for one."""


class NumericalError(FewShotError):
    """A NaN or Inf appeared in a loss or in logits."""


class MethodError(FewShotError):
    """A method (built-in or plugin) raised or returned something the harness cannot use."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` of an exception squeezed onto one line (at most ``limit`` characters of message)."""
    text = " ".join(str(exc).split()) or "no detail"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
