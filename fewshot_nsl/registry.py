"""Decorator registries for methods, backbones and datasets (timm style); imports nothing from
the package but its errors (and, when a method is registered, its base class).

Usage::

    @register_method("protonet")
    class ProtoNet(FewShotMethod): ...

    method = create_method("protonet", backbone=net, ways=5)
    list_methods()  # -> ["protonet", ...]

A name can be registered by one source file only: a second file registering it (whatever the
file is called) is refused with one line naming both, and so is one file registering it twice (two
classes of one file under one name, a copy-paste slip); importing the very same file again is
harmless. A method must be a subclass of ``FewShotMethod`` that implements ``fit_support`` and
``forward`` and whose constructor takes ``backbone`` and ``image_size`` (:func:`check_method_class`),
else its registration is refused in one line naming the class, its file and the fix. Names are
data that ends up in run folder names, CSV cells, Markdown tables and plot labels, so a name must
follow :data:`NAME_RULE` (checked at registration, :func:`check_name`). Loading the built-ins and
discovering plugins is :mod:`fewshot_nsl.plugins`; its functions (``create_method``,
``list_methods``, ``load_plugins``, ...) are also reachable from here, imported on first use, as is
the method base class the method check needs, so this module never imports the package back at
import time.
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import RegistryError


class DuplicateNameError(RegistryError):
    """A name is registered by two different source files."""


class InvalidNameError(RegistryError):
    """A name that is not safe as a folder name, CSV cell, Markdown cell or plot label."""


class InvalidMethodError(RegistryError):
    """A class registered as a method that the harness cannot run (:func:`check_method_class`)."""


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


def _own_namespace(obj: Any) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The existing file that defines ``obj``'s own code and the globals it was executed in, from its
    functions' code objects (``(None, None)`` for code made by ``exec``, a notebook cell, or a class
    without functions): two classes with the same pair come from one execution of one file."""
    members = vars(obj).values() if inspect.isclass(obj) else [obj]
    for value in members:
        fn = getattr(value, "__func__", value)
        code = getattr(fn, "__code__", None)
        if code is not None and os.path.isfile(code.co_filename):
            return str(Path(code.co_filename).resolve()), getattr(fn, "__globals__", None)
    return None, None


class Registry:
    """A name -> factory mapping filled by a decorator.

    Args:
        kind: what is registered ("method", "backbone", "dataset"), used in messages.
        validate: called with ``(name, obj, source)`` before ``obj`` is registered; raises a one-line
            :class:`~fewshot_nsl.errors.RegistryError` for an object the harness could not use.
        harness_args: keyword arguments the harness passes itself (a method's ``backbone`` and
            ``image_size``): left out of the options listed by :func:`check_kwargs`, which a config
            cannot set.
    """

    def __init__(self, kind: str, validate: Optional[Callable[[str, Any, str], None]] = None,
                 harness_args: Tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.validate = validate
        self.harness_args = tuple(harness_args)
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._sources: Dict[str, str] = {}
        #: name -> (file, globals) of the code that registered it (:func:`_own_namespace`)
        self._namespaces: Dict[str, Tuple[Optional[str], Optional[Dict[str, Any]]]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Return a decorator that registers a class or factory under ``name``.

        Raises:
            InvalidNameError: ``name`` does not follow :data:`NAME_RULE` (raised at once, when
                the decorator is built, before anything is registered).
            DuplicateNameError: (by the decorator) ``name`` is already registered by another source
                file, or by another class of the same execution of the same file.
            InvalidMethodError: (by the decorator of :data:`METHODS`) not a class the harness can run.
        """
        check_name(self.kind, name)

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            source = source_of(obj)
            here = _own_namespace(obj)
            if name in self._entries and self._entries[name] is not obj:
                if self._sources[name] != source:
                    raise DuplicateNameError(
                        f"{self.kind} '{name}' is registered twice, by {source} and already by "
                        f"{self._sources[name]}; rename one of them"
                    )
                first = self._entries[name]
                before = self._namespaces.get(name, (None, None))
                if (here[0] is not None and here[0] == before[0] and here[1] is before[1]
                        and _qualname(obj) != _qualname(first)):
                    raise DuplicateNameError(
                        f"{self.kind} '{name}' is registered twice in {source}, by {_qualname(obj)} and already by "
                        f"{_qualname(first)}; rename one of them"
                    )
            if self.validate is not None:
                self.validate(name, obj, source)
            # the same object, or the same file imported again (e.g. in tests): replaced silently
            self._entries[name] = obj
            self._sources[name] = source
            self._namespaces[name] = here
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
        """Instantiate ``name`` with ``kwargs``; unknown keywords fail listing accepted ones (the
        harness's arguments too: here the caller passes them)."""
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} '{name}'", harness_args=())
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


def check_kwargs(factory: Callable[..., Any], kwargs: Dict[str, Any], what: str,
                 harness_args: Optional[Tuple[str, ...]] = None) -> None:
    """Raise a :class:`RegistryError` naming unknown keyword arguments and the accepted ones.

    Args:
        harness_args: accepted arguments left out of the list, because the harness passes them itself
            and an option dict may not (None: those of the registry ``factory`` is registered in, e.g. a
            method's ``backbone`` and ``image_size``; ``()``: list them all).
    """
    accepted = accepted_kwargs(factory)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        if harness_args is None:
            harness_args = next((reg.harness_args for reg in (METHODS, BACKBONES, DATASETS)
                                 if any(obj is factory for obj in reg._entries.values())), ())
        shown_names = [a for a in accepted if a not in harness_args]
        raise RegistryError(
            f"unknown option(s) {', '.join(unknown)} for {what}; "
            f"accepted: {', '.join(shown_names) or '(none)'}"
        )


def _qualname(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj))


def _overrides(cls: type, base: type, member: str) -> bool:
    """Whether ``cls`` gets ``member`` from a class of its MRO other than ``base`` (itself, a base, a mixin)."""
    return next((k for k in cls.__mro__ if member in vars(k)), base) is not base


def check_method_class(name: str, obj: Any, source: str) -> None:
    """Refuse a method the harness could not run, when it is registered rather than deep in a run.

    A method is a subclass of :class:`~fewshot_nsl.methods.base.FewShotMethod` that implements
    ``fit_support`` and ``forward`` (the base class's raise ``NotImplementedError``) and whose
    constructor takes ``backbone`` and ``image_size`` as keywords (or ``**kwargs``): the harness
    builds it as ``cls(backbone=..., image_size=..., **method_options)``.

    Raises:
        InvalidMethodError: one line naming the class, its file and what to fix.
    """
    from .methods.base import FewShotMethod  # on first use: this module imports nothing of the package

    what = f"method '{name}': {_qualname(obj)} ({source})"
    if not inspect.isclass(obj) or not issubclass(obj, FewShotMethod):
        kind = "class" if inspect.isclass(obj) else type(obj).__name__
        raise InvalidMethodError(
            f"{what} is a {kind}, not a subclass of FewShotMethod; derive it from "
            f"fewshot_nsl.methods.FewShotMethod (with fit_support and forward)")
    missing = [m for m in ("fit_support", "forward") if not _overrides(obj, FewShotMethod, m)]
    if missing:
        raise InvalidMethodError(
            f"{what} does not implement {' and '.join(missing)}; define "
            f"{' and '.join(f'{m}(self, ...)' for m in missing)} in the class (see FewShotMethod)")
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a signature Python cannot read: the run will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    taken = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    lacking = [a for a in ("backbone", "image_size") if a not in taken]
    if lacking:
        raise InvalidMethodError(
            f"{what} has a constructor that does not take {' and '.join(lacking)}; the harness builds it as "
            f"{_qualname(obj)}(backbone=..., image_size=..., **method_options): write "
            f"__init__(self, backbone, image_size=84, ...) and call super().__init__(backbone, image_size)")


#: Arguments the harness passes to every factory of a kind itself (a config may not set them).
METHODS = Registry("method", validate=check_method_class, harness_args=("backbone", "image_size"))
BACKBONES = Registry("backbone", harness_args=("conv_layer",))
DATASETS = Registry("dataset", harness_args=("name", "data_root", "image_size", "cache_dir"))

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
