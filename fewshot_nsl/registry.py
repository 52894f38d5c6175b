"""Decorator registries for methods, backbones and datasets, and plugin discovery.

Usage (timm style)::

    @register_method("protonet")
    class ProtoNet(FewShotMethod): ...

    method = create_method("protonet", backbone=net, ways=5)
    list_methods()  # -> ["protonet", ...]

Plugins are discovered from files in ``baselines/`` (and any ``--plugins DIR``) and from
installed packages exposing the entry-point group ``fewshot_nsl.methods``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import RegistryError

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINES_DIR = REPO_ROOT / "baselines"
ENTRY_POINT_GROUP = "fewshot_nsl.methods"


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
        """Return a decorator that registers a class or factory under ``name``."""

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            source = getattr(obj, "__module__", "?")
            if name in self._entries and self._entries[name] is not obj:
                previous = self._sources[name]
                # Re-importing the same plugin file (e.g. in tests) replaces it silently.
                if previous.split(".")[-1] != source.split(".")[-1]:
                    raise RegistryError(
                        f"{self.kind} '{name}' is registered twice ({previous} and {source}); "
                        f"rename one of them"
                    )
            self._entries[name] = obj
            self._sources[name] = source
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """Return the factory registered as ``name`` or raise a one-line error."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(
                f"unknown {self.kind} '{name}'; available {self.kind}s: {known}"
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


def create_method(name: str, **kwargs: Any) -> Any:
    """Instantiate the method registered as ``name`` (see :class:`Registry.create`)."""
    load_plugins()
    return METHODS.create(name, **kwargs)


def get_method_class(name: str) -> Any:
    load_plugins()
    return METHODS.get(name)


def list_methods() -> List[str]:
    load_plugins()
    return METHODS.names()


def create_backbone(name: str, **kwargs: Any) -> Any:
    _import_builtins()
    return BACKBONES.create(name, **kwargs)


def list_backbones() -> List[str]:
    _import_builtins()
    return BACKBONES.names()


def create_dataset(name: str, **kwargs: Any) -> Any:
    _import_builtins()
    return DATASETS.create(name, **kwargs)


def list_datasets() -> List[str]:
    _import_builtins()
    return DATASETS.names()


# ----------------------------------------------------------------------------- plugins

_loaded_dirs: set = set()
_entry_points_loaded = False
#: Plugins that failed to import: {plugin name: one-line reason}. Other methods keep working.
PLUGIN_ERRORS: Dict[str, str] = {}


def _import_builtins() -> None:
    from . import backbones, data, methods  # noqa: F401  (registration side effects)


def load_plugin_file(path: Path) -> None:
    """Import one plugin file; a failure is recorded in PLUGIN_ERRORS, not raised."""
    module_name = f"fewshot_nsl_plugins.{path.parent.name}.{path.stem}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken plugin must not take the others down
        del sys.modules[module_name]
        PLUGIN_ERRORS[str(path)] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"plugin {path} failed to import ({type(exc).__name__}: {exc}); skipped")


def load_plugins(extra_dirs: Optional[List[Path]] = None) -> None:
    """Import built-ins, ``baselines/``, any extra plugin folders and entry points (once each)."""
    global _entry_points_loaded
    _import_builtins()
    dirs = [BASELINES_DIR] + [Path(d) for d in (extra_dirs or [])]
    for d in dirs:
        d = d.resolve()
        if d in _loaded_dirs:
            continue
        if not d.is_dir():
            raise RegistryError(f"plugin folder {d} does not exist; pass an existing folder to --plugins")
        _loaded_dirs.add(d)
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_"):
                load_plugin_file(path)
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:
                PLUGIN_ERRORS[f"entry point {ep.name}"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"plugin entry point {ep.name} failed to import ({exc}); skipped")
