"""Decorator registries for methods, backbones and datasets (timm style); imports nothing from
the package but its errors.

Usage::

    @register_method("protonet")
    class ProtoNet(FewShotMethod): ...

    method = create_method("protonet", backbone=net, ways=5)
    list_methods()  # -> ["protonet", ...]

A name can be registered by one source file only: a second file registering it (whatever the
file is called) is refused with one line naming both; importing the very same file again is
harmless. Names are data that ends up in run folder names, CSV cells, Markdown tables and plot
labels, so a name must follow :data:`NAME_RULE` (checked at registration, :func:`check_name`).
Loading the built-ins and discovering plugins is :mod:`fewshot_nsl.plugins`; its
functions (``create_method``, ``list_methods``, ``load_plugins``, ...) are also reachable from
here, imported on first use, so this module never imports the package back.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import RegistryError


class DuplicateNameError(RegistryError):
    """A name is registered by two different source files."""


class InvalidNameError(RegistryError):
    """A name that is not safe as a folder name, CSV cell, Markdown cell or plot label."""


#: Longest name accepted (run ids join several names; a file name holds at most 255 bytes).
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
#: The rule a registered name follows, as said in the refusal.
NAME_RULE = (f"a letter or digit, then letters, digits, '_', '.', '+' or '-' (no '..', at most "
             f"{MAX_NAME_LENGTH} characters)")


def is_valid_name(name: Any) -> bool:
    """Whether ``name`` follows :data:`NAME_RULE`: safe as a path component (no separator, no
    ``..``, no leading ``-`` or ``.``), a CSV cell (no formula prefix ``= + - @``), a Markdown cell and
    a matplotlib label (no ``|``, backtick, ``$``, whitespace or control character)."""
    return (isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None
            and ".." not in name)


def shown(name: Any) -> str:
    """``name`` quoted for a one-line message: ``'protonet'``, or its ``repr`` when it holds
    characters outside :data:`NAME_RULE` (a newline, quotes ...), so the message stays one line."""
    return f"'{name}'" if is_valid_name(name) else repr(name)


def check_name(kind: str, name: Any) -> str:
    """``name`` if it follows :data:`NAME_RULE`.

    Args:
        kind: "method", "backbone" or "dataset" (for the message).

    Raises:
        InvalidNameError: one line naming the bad name and the rule.
    """
    if not is_valid_name(name):
        raise InvalidNameError(
            f"{kind} name {shown(name)} is not allowed: a {kind} name is {NAME_RULE}; "
            f"register it under a name like 'my_{kind}'"
        )
    return name


def source_of(obj: Any) -> str:
    """Where ``obj`` is defined: its resolved source file, else its module name."""
    try:
        src = inspect.getsourcefile(obj)
    except TypeError:
        src = None
    if src:
        return str(Path(src).resolve())
    return str(getattr(obj, "__module__", "?"))


class Registry:
    """A name -> factory mapping filled by a decorator.

    Args:
        kind: what is registered ("method", "backbone", "dataset"), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._sources: Dict[str, str] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Return a decorator that registers a class or factory under ``name``.

        Raises:
            InvalidNameError: ``name`` does not follow :data:`NAME_RULE` (raised at once, when
                the decorator is built, before anything is registered).
        """
        check_name(self.kind, name)

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            source = source_of(obj)
            if name in self._entries and self._entries[name] is not obj and self._sources[name] != source:
                raise DuplicateNameError(
                    f"{self.kind} '{name}' is registered twice, by {source} and already by "
                    f"{self._sources[name]}; rename one of them"
                )
            # the same object, or the same file imported again (e.g. in tests): replaced silently
            self._entries[name] = obj
            self._sources[name] = source
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def source(self, name: str) -> str:
        """The source file (or module) that registered ``name``."""
        self.get(name)
        return self._sources[name]

    def get(self, name: str) -> Callable[..., Any]:
        """Return the factory registered as ``name`` or raise a one-line error."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(
                f"unknown {self.kind} {shown(name)}; available {self.kind}s: {known}"
            )
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Instantiate ``name`` with ``kwargs``; unknown keywords fail listing accepted ones."""
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} '{name}'")
        return factory(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def accepted_kwargs(factory: Callable[..., Any]) -> Optional[List[str]]:
    """Names of keyword arguments ``factory`` accepts, or None if it takes ``**kwargs``.

    For classes, the ``__init__`` signatures along the MRO are merged while each one
    forwards ``**kwargs`` to its parent.
    """
    targets = []
    if inspect.isclass(factory):
        for klass in factory.__mro__:
            if "__init__" in vars(klass) and klass is not object:
                targets.append(klass.__init__)
    else:
        targets.append(factory)
    names: List[str] = []
    for fn in targets:
        params = list(inspect.signature(fn).parameters.values())
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        names += [
            p.name
            for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if not has_var_kw:
            return sorted(set(names))
        if not inspect.isclass(factory):
            return None
    return None if not inspect.isclass(factory) else sorted(set(names))


def check_kwargs(factory: Callable[..., Any], kwargs: Dict[str, Any], what: str) -> None:
    """Raise a :class:`RegistryError` naming unknown keyword arguments and the accepted ones."""
    accepted = accepted_kwargs(factory)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise RegistryError(
            f"unknown option(s) {', '.join(unknown)} for {what}; "
            f"accepted: {', '.join(accepted)}"
        )


METHODS = Registry("method")
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")

register_method = METHODS.register
register_backbone = BACKBONES.register
register_dataset = DATASETS.register


#: Plugins that failed to import: {plugin file or entry point: one-line reason}. Other methods keep working.
PLUGIN_ERRORS: Dict[str, str] = {}

#: Names served by :mod:`fewshot_nsl.plugins` (imported on first use: no import cycle).
_LOADER_NAMES = {
    "BASELINES_DIR", "ENTRY_POINT_GROUP", "PLUGIN_PACKAGE", "create_method", "get_method_class", "list_methods",
    "create_backbone", "list_backbones", "create_dataset", "list_datasets", "load_plugins", "load_plugin_file",
    "plugin_module", "plugin_module_name", "plugin_package_name",
}


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from . import plugins

        return getattr(plugins, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
