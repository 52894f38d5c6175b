"""Loading the built-ins and discovering plugins; the ``create_*`` / ``list_*`` factories.

Plugins are discovered from files in any ``--plugins DIR`` and from installed packages exposing
the entry-point group ``fewshot_nsl.methods``; the built-in baselines (``baselines/``, installed
as ``fewshot_nsl.baselines``) are registered through that same group (``pyproject.toml``). A
checkout put on ``sys.path`` without being installed has no entry points: its ``baselines/``
folder is then loaded like a ``--plugins`` folder.

Plugin folders are keyed by their full path (two folders with the same name are two plugin
packages), and a plugin file can import the modules beside it (``from helpers import x`` at its
top, or ``from .helpers import x``). A plugin that fails to import is recorded in
:data:`fewshot_nsl.registry.PLUGIN_ERRORS`; the other methods keep working.

Every file a plugin import reads from its folder (the plugin, its helpers, even those dropped from
``sys.modules`` afterwards, and the data files beside them) is recorded with its content hash
(:func:`fewshot_nsl.identity.note_imported`), and so are the user's modules from elsewhere (another
folder on ``sys.path``) that the import of a plugin folder or entry point brought in
(:func:`fewshot_nsl.identity.note_plugin_imports`), so the code identity of a method covers them and sees
when one changes on disk. A folder changed since it was imported (or whose import's modules from
elsewhere changed) is re-imported by :func:`refresh_plugins` (``fewshot_nsl.benchmark()`` and
``load_plugins([folder])`` call it), re-registering its methods; the classes it replaced are outdated
(:func:`outdated_reason`) and their identity is refused, so old code never runs under a new hash.

``--plugins`` takes folders: a plugin file given instead is refused in one line naming its folder.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

from . import identity, registry
from .errors import RegistryError
from .registry import BACKBONES, DATASETS, METHODS, DuplicateNameError
from .resources import resource_dir


#: The built-in baselines' folder (``baselines/`` of a checkout, ``fewshot_nsl/baselines`` installed).
BASELINES_DIR = resource_dir("baselines")
ENTRY_POINT_GROUP = "fewshot_nsl.methods"
#: Package that holds the modules of ``--plugins`` folders (one sub-package per folder).
PLUGIN_PACKAGE = "fewshot_nsl_plugins"



_loaded_dirs: set = set()
#: Plugin files imported, by folder (what a re-import of the folder imports again).
_loaded_files: Dict[Path, Set[Path]] = {}
#: Registered objects replaced by a re-import of their plugin folder -> why they must not run.
_outdated: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_reload_lock = threading.RLock()
_entry_points_loaded = False


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



def _import_builtins() -> None:
    from . import backbones, data, methods  # noqa: F401  (registration side effects)


def plugin_package_name(folder: Path) -> str:
    """Module package of a plugin folder, keyed by its full resolved path:
    ``fewshot_nsl_plugins.<folder name>_<sha256(path)[:10]>``."""
    folder = Path(folder).resolve()
    safe = re.sub(r"\W", "_", folder.name) or "root"
    return f"{PLUGIN_PACKAGE}.{safe}_{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}"


def plugin_module_name(path: Path) -> str:
    """Module name of a plugin file: its folder's package plus the file's stem."""
    path = Path(path).resolve()
    return f"{plugin_package_name(path.parent)}.{path.stem}"


def _ensure_package(name: str, path: Optional[Path]) -> None:
    """Put an (empty) package ``name`` searching ``path`` into ``sys.modules`` if missing."""
    if name in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)] if path is not None else []
    sys.modules[name] = importlib.util.module_from_spec(spec)


def plugin_module(path: Path) -> Any:
    """The imported module of plugin file ``path`` (imported now if it was not)."""
    name = plugin_module_name(path)
    if name not in sys.modules:
        load_plugin_file(path)
    if name not in sys.modules:
        raise RegistryError(f"plugin {path} failed to import ({registry.PLUGIN_ERRORS.get(str(path), 'unknown error')})")
    return sys.modules[name]


def load_plugin_file(path: Path) -> None:
    """Import one plugin file; a failure is recorded in PLUGIN_ERRORS, not raised.

    The file becomes module :func:`plugin_module_name` inside its folder's package, so
    ``from .helpers import x`` works; while it is imported its folder is also first on
    ``sys.path``, so ``from helpers import x`` works too. Such sibling modules are dropped
    from ``sys.modules`` afterwards (the plugin keeps what it imported), so another plugin
    folder with a ``helpers.py`` of its own gets its own.

    Raises:
        DuplicateNameError: the file registers a name another source file already registered.
    """
    path = Path(path).resolve()
    module_name = plugin_module_name(path)
    if module_name in sys.modules:
        return
    _ensure_package(PLUGIN_PACKAGE, None)
    _ensure_package(plugin_package_name(path.parent), path.parent)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _loaded_files.setdefault(path.parent, set()).add(path)
    folder = str(path.parent)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except DuplicateNameError:
        del sys.modules[module_name]
        raise
    except Exception as exc:  # a broken plugin must not take the others down
        del sys.modules[module_name]
        registry.PLUGIN_ERRORS[str(path)] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"plugin {path} failed to import ({type(exc).__name__}: {exc}); skipped")
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
        new = {name: sys.modules[name] for name in set(sys.modules) - before}
        # what this import read from the folder, as it was read (the code identity checks it later): its
        # modules, the data files beside them, and the user's modules it imported from elsewhere
        builtin = path.parent == BASELINES_DIR.resolve()  # a bare checkout's baselines: their .py files only
        identity.note_imported([path, *(f for m in new.values() for f in _files_under(m, path.parent)),
                                *([] if builtin else identity.data_files(path.parent))])
        if not builtin:
            identity.note_plugin_imports([path.parent], new.values())
        # sibling modules (and their sub-modules) imported from the folder by their own name: dropped, so
        # another folder's ``helpers`` is its own
        tops = {n for n, m in new.items() if "." not in n and n != PLUGIN_PACKAGE and _is_under(m, path.parent)}
        for name in new:
            if name.split(".")[0] in tops:
                del sys.modules[name]


def _files_under(module: Any, folder: Path) -> List[str]:
    """The file of ``module`` if it lies under ``folder`` (else nothing)."""
    file = getattr(module, "__file__", None)
    if isinstance(file, str) and Path(os.path.realpath(file)).is_relative_to(folder):
        return [os.path.realpath(file)]
    return []


def _is_under(module: Any, folder: Path) -> bool:
    """Whether ``module`` (a file module or a namespace package) was loaded from ``folder``."""
    if _files_under(module, folder):
        return True
    paths = getattr(module, "__path__", None) or []
    return getattr(module, "__file__", None) is None and any(
        Path(os.path.realpath(p)).is_relative_to(folder) for p in list(paths))


def loaded_plugin_folders() -> List[Path]:
    """The ``--plugins`` folders (and the bare checkout's ``baselines/``) imported in this process."""
    return sorted(set(_loaded_dirs) | set(_loaded_files))


def outdated_reason(obj: Any) -> Optional[str]:
    """Why the registered class or factory ``obj`` must not run any more (its plugin folder was
    re-imported since it was created), else None."""
    try:
        return _outdated.get(obj)
    except TypeError:  # not weak-referenceable: never registered from a plugin folder
        return None


def refresh_plugins(folders: Optional[Iterable[Path]] = None) -> List[Path]:
    """Re-import every loaded plugin folder (or those of ``folders`` that are loaded) in which a file
    imported in this process has changed on disk since (or was deleted).

    The folder's modules are imported again and re-register their methods, backbones and datasets;
    the objects they replace (or no longer register) are marked outdated.

    Returns:
        The folders re-imported.
    """
    wanted = None if folders is None else {Path(f).resolve() for f in folders}
    done = []
    with _reload_lock:
        for folder in loaded_plugin_folders():
            if (wanted is None or folder in wanted) and identity.changed_since_import(folder):
                _reload_folder(folder)
                done.append(folder)
    return done


def _registered_from(folder: Path) -> List[tuple]:
    """``(registry, name, object)`` of everything registered by code of ``folder``."""
    out = []
    for reg in (METHODS, BACKBONES, DATASETS):
        for name in reg.names():
            obj = reg.get(name)
            src = registry.source_of(obj)
            module = str(getattr(obj, "__module__", ""))
            if Path(src).is_relative_to(folder) or module.startswith(plugin_package_name(folder) + "."):
                out.append((reg, name, obj))
    return out


def _reload_folder(folder: Path) -> None:
    """Import plugin folder ``folder`` again (see :func:`refresh_plugins`)."""
    before = _registered_from(folder)
    package = plugin_package_name(folder)
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    # the user's modules from elsewhere that the folder's import brought in and that changed since: imported
    # again with it (a module some other code imported first is not dropped: its identity is then refused)
    for file, name in identity.changed_outside_imports(folder).items():
        module = sys.modules.get(name)
        if module is not None and os.path.realpath(str(getattr(module, "__file__", ""))) == file:
            del sys.modules[name]
    identity.forget_imported(folder)
    for key in [k for k in registry.PLUGIN_ERRORS if Path(k).parent == folder]:
        del registry.PLUGIN_ERRORS[key]
    files = sorted(_loaded_files.pop(folder, set()))
    if folder in _loaded_dirs:  # a whole folder: its files now
        _loaded_dirs.discard(folder)
        if folder.is_dir():
            _load_folder(folder)
    for path in files:  # files imported one by one (load_plugin_file); already imported ones are skipped
        if path.is_file():
            load_plugin_file(path)
    for reg, name, obj in before:
        if name in reg and reg.get(name) is not obj:
            why = "was re-imported since this object was created"
        else:
            why = "no longer registers it"
        _outdated[obj] = (f"{reg.kind} '{name}': its plugin folder {folder} changed on disk and {why}; "
                          f"use the current one (get_method_class), or restart Python")


def _load_folder(d: Path) -> None:
    """Import every ``*.py`` of plugin folder ``d`` (not ``_*.py``), once per folder."""
    d = d.resolve()
    if d in _loaded_dirs:
        return
    if d.is_file():
        raise RegistryError(f"plugin folder {d} is a file, not a folder; pass the folder that holds it "
                            f"(its *.py files not starting with _ are imported): --plugins {d.parent}")
    if not d.is_dir():
        raise RegistryError(f"plugin folder {d} does not exist; pass an existing folder to --plugins")
    _loaded_dirs.add(d)
    for path in sorted(d.glob("*.py")):
        if not path.name.startswith("_"):
            load_plugin_file(path)


def _entry_point_origin(ep: importlib.metadata.EntryPoint) -> str:
    """The source file of an entry point's module (without importing it), else ``entry point NAME``."""
    try:
        spec = importlib.util.find_spec(ep.module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).is_file():
        return str(Path(spec.origin).resolve())
    return f"entry point {ep.name}"


def _load_entry_points() -> None:
    """Import every module of the ``fewshot_nsl.methods`` group (the built-ins first); a bare
    checkout without entry points loads its ``baselines/`` folder instead."""
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    builtin = f"{__package__}.baselines"
    eps.sort(key=lambda ep: (not ep.module.startswith(builtin + "."), ep.name))
    if not any(ep.module.startswith(builtin + ".") for ep in eps):
        _load_folder(BASELINES_DIR)
    # (import, where a failure is reported): a built-in is named by its file (as when loaded from the
    # folder), a third party by its entry point
    loads = [(ep.load, _entry_point_origin(ep), None) if ep.module.startswith(builtin + ".")
             else (ep.load, f"entry point {ep.name}", ep.module) for ep in eps]
    if any(ep.module.startswith(builtin + ".") for ep in eps):
        # a file dropped into baselines/ before pyproject.toml lists its entry point still registers
        covered = {ep.module for ep in eps}
        for path in sorted(BASELINES_DIR.glob("*.py")):
            module = f"{builtin}.{path.stem}"
            if not path.name.startswith("_") and module not in covered:
                loads.append((functools.partial(importlib.import_module, module), str(path.resolve()), None))
    for load, where, module in loads:
        before = set(sys.modules)
        try:
            load()
        except DuplicateNameError:
            raise
        except Exception as exc:
            registry.PLUGIN_ERRORS[where] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"plugin {where} failed to import ({type(exc).__name__}: {exc}); skipped")
        finally:  # the files these imports read, as they were read (the code identity checks them later)
            new = [sys.modules[n] for n in set(sys.modules) - before if n in sys.modules]
            identity.note_imported(f for f in (getattr(m, "__file__", None) for m in new) if isinstance(f, str))
            if module is not None:  # a third party's: the user's modules it brought in from elsewhere
                identity.note_plugin_imports(_package_roots(module), new)


def _package_roots(module: str) -> List[str]:
    """The code location of an entry point's module, as the code identity finds it: the folder(s) of its
    top-level package, or the file of a top-level module."""
    top = sys.modules.get(module.split(".")[0])
    paths = list(getattr(top, "__path__", None) or [])
    if paths:
        return [str(p) for p in paths]
    file = getattr(top, "__file__", None)
    return [file] if isinstance(file, str) else []


def load_plugins(extra_dirs: Optional[List[Path]] = None) -> None:
    """Import built-ins, entry points (the built-in baselines among them) and any extra plugin
    folders (once each; a folder whose imported files changed on disk since is imported again,
    :func:`refresh_plugins`).

    Raises:
        RegistryError: a folder does not exist, or a plugin registers a name already taken by
            another source file (:class:`DuplicateNameError`).
    """
    global _entry_points_loaded
    _import_builtins()
    if not _entry_points_loaded:
        _entry_points_loaded = True
        _load_entry_points()
    for d in extra_dirs or []:
        if Path(d).resolve() == BASELINES_DIR.resolve():
            continue  # the built-ins, already registered
        with _reload_lock:
            refresh_plugins([Path(d)])
            _load_folder(Path(d))
