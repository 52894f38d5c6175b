"""What a run *is*: everything that determines its numbers, hashed into its run id.

A run's identity (:class:`RunIdentity`) is

* ``config_hash``: the resolved config without output paths, device and the training
  sections the method does not use (:func:`fewshot_nsl.runner.config_hash`); it holds the
  seed, the split, ways/shots/queries, image size, every option;
* ``dataset_fingerprint``: sha256 of the dataset *content* (class names, splits, labels and
  every image byte, :meth:`fewshot_nsl.data.store.ImageStore.fingerprint`), not its path;
* ``episode_hash`` and ``split``: the content hash of the fixed episode list and its split;
* ``code_hash``: the package's source (every ``.py`` file of :mod:`fewshot_nsl`) and the code
  the method's class actually uses (:func:`method_code_files`), derived from what is loaded, never
  from a list kept by hand;
* ``world_size``: the number of processes of the pretraining the run uses (``torchrun``).

The run folder is named after :meth:`RunIdentity.digest`, and ``identity.json`` in it records
the components (and, as ``code_files``, the files behind the code hash with their content hashes),
so a run is resumed, reused or written into only under the same identity; anything else gets a
folder of its own.

**The code of a method** (:func:`method_code_files`) is, for its class and each base up to
:class:`~fewshot_nsl.methods.base.FewShotMethod`:

* the file defining the class (found from the code objects of its functions, so a class made by
  ``exec`` in a file's namespace is not taken for that file's);
* every module of its *code location* that is loaded: a ``--plugins`` folder (the modules imported
  from it, including the sibling modules the plugin loader drops from ``sys.modules`` after the
  import, recorded when they were imported, plus every ``*.py`` directly in the folder, so a helper
  imported lazily while the run goes is covered too); a package (every ``.py`` file under the
  package's folder, as for :mod:`fewshot_nsl` itself); a plain module (a script, a test module: the
  modules under its folder that it, transitively, holds in its namespace);
* the data beside the code (:func:`data_files`): every other file directly in a ``--plugins`` folder
  (``settings.json``, a vocabulary, small weights) and every non-``.py`` file under a plugin package's
  folder (package data), but no hidden file or folder, no ``__pycache__``, no editor backup and no log
  or other output of a running process (:data:`OUTPUT_ENDINGS`); a file
  larger than :data:`DATA_FILE_LIMIT` (16 MiB) stands in by its size and modification time instead of
  its content;
* the user's own code it uses wherever it lies (:func:`_user_modules`): every loaded module outside the
  Python installation (standard library, ``site-packages`` / ``dist-packages``, the virtual environment,
  a folder pip installed into) and outside :mod:`fewshot_nsl` that the class's module, or any module of
  its code location, holds in its namespace (``import mylab``, ``from mylab_scale import temperature``),
  followed transitively through such modules, plus those first imported while its ``--plugins`` folder or
  entry point was imported (:func:`note_plugin_imports`; a module imported only for its side effects);
* a class without a source file (a notebook cell): the text of its cell(s) where Python keeps it
  (IPython puts cell sources into :mod:`linecache`), including the cells of the notebook functions
  and classes it names; otherwise a per-class nonce, so its runs are never reused.

The built-in methods (the package and its baselines) are none of the last two: their identity is the
package's and the baselines' ``.py`` files only.

A code file that was imported (or a data file of a ``--plugins`` folder, as it was when the folder was
imported) and has changed on disk since is refused in one line
(:class:`~fewshot_nsl.errors.RegistryError`) whenever the identity is computed: the module that would
run is not the one on disk. :func:`fewshot_nsl.benchmark` and
:func:`~fewshot_nsl.plugins.load_plugins` re-import a changed ``--plugins`` folder first (a module of
the user's imported from elsewhere by that folder's import is imported again with it).

Not covered: what a method reads lazily from elsewhere (a file outside its folder, a subfolder of a
``--plugins`` folder, the network) and a module it imports only inside a function that has not run yet;
name such inputs in the method's options, or keep them beside the plugin.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import linecache
import os
import site
import sys
import sysconfig
import threading
import types
import uuid
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from .errors import RegistryError

PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGE = str(PACKAGE_DIR)
#: Module package of the ``--plugins`` folders (:data:`fewshot_nsl.plugins.PLUGIN_PACKAGE`).
_PLUGIN_PACKAGE = "fewshot_nsl_plugins"

_lock = threading.RLock()


#: Largest data file (not ``.py``) hashed by its content (:func:`content_state`); a larger one (a checkpoint
#: beside a plugin) is represented by its size and modification time, so reading it stays cheap.
DATA_FILE_LIMIT = 16 * 2**20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _hash_files(paths: List[Path], root: Optional[Path] = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        name = p.relative_to(root).as_posix() if root else p.as_posix()
        data = p.read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _py_files(root: Path) -> List[Path]:
    """Every ``.py`` file under ``root`` (not in ``__pycache__`` or hidden folders), sorted."""
    return sorted(p for p in root.rglob("*.py")
                  if not any(part == "__pycache__" or part.startswith(".") for part in p.relative_to(root).parts[:-1]))


@functools.lru_cache(maxsize=1)
def package_code_hash() -> str:
    """sha256 (16 hex) of every ``.py`` file of the installed/checked-out ``fewshot_nsl`` package."""
    return _hash_files(_py_files(PACKAGE_DIR), PACKAGE_DIR)


# ----------------------------------------------------------------------------- files and their state
@dataclass(frozen=True)
class FileState:
    """A file's modification time (ns), size and content hash (sha256, 16 hex)."""

    mtime_ns: int
    size: int
    sha256: str


def file_state(path: str) -> Optional[FileState]:
    """The state of ``path`` now (None if it cannot be read)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return FileState(st.st_mtime_ns, st.st_size, _sha(data))


def content_state(path: str) -> Optional[FileState]:
    """:func:`file_state`, except for a file other than ``.py`` larger than :data:`DATA_FILE_LIMIT`, whose
    ``sha256`` stands for its size and modification time (its content is not read)."""
    if not path.endswith(".py"):
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size > DATA_FILE_LIMIT:
            return FileState(st.st_mtime_ns, st.st_size,
                             _sha(f"size {st.st_size} mtime_ns {st.st_mtime_ns}".encode()))
    return file_state(path)


#: State of every code file when it was imported (or first seen behind a code hash), by real path.
_IMPORTED: Dict[str, FileState] = {}
#: Modules of the user's outside a ``--plugins`` folder (or an entry point's package) first imported while it
#: was imported: {folder (or package folder, or module file): {file: (module name, state then)}}.
_IMPORTED_BY: Dict[str, Dict[str, Tuple[str, FileState]]] = {}


@functools.lru_cache(maxsize=None)
def _real(path: str) -> str:
    return os.path.realpath(path)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def note_imported(paths: Iterable[Any]) -> None:
    """Record the state of code files just imported (the plugin loader calls this right after an
    import, so a later edit is seen as a change since the import)."""
    with _lock:
        for p in paths:
            real = _real(os.fspath(p))
            state = content_state(real)
            if state is not None:
                _IMPORTED[real] = state


def note_plugin_imports(roots: Iterable[Any], modules: Iterable[Any]) -> None:
    """Record, for the code locations ``roots`` (a ``--plugins`` folder; an entry point's package folder
    or module file), the modules of the user's (:func:`_user_code`) among ``modules`` (those first
    imported while it was imported) that lie outside it, with their state now (also noted as imported)."""
    keys = [_real(os.fspath(r)) for r in roots]
    found: Dict[str, str] = {}
    for module in modules:
        f = _module_file(module)
        name = getattr(module, "__name__", None)
        if f and isinstance(name, str) and _user_code(f) and not any(_under(f, k) for k in keys):
            found[f] = name
    note_imported(found)
    with _lock:
        for key in keys:
            record = _IMPORTED_BY.setdefault(key, {})
            for f, name in found.items():
                if f in _IMPORTED:
                    record[f] = (name, _IMPORTED[f])


def outside_imports(root: Any) -> Dict[str, str]:
    """``{file: module name}`` of the user's modules outside ``root`` first imported by its import
    (:func:`note_plugin_imports`)."""
    with _lock:
        return {f: name for f, (name, _) in _IMPORTED_BY.get(_real(os.fspath(root)), {}).items()}


def changed_outside_imports(root: Any) -> Dict[str, str]:
    """The entries of :func:`outside_imports` whose file changed (or was deleted) since."""
    with _lock:
        records = list(_IMPORTED_BY.get(_real(os.fspath(root)), {}).items())
    out = {}
    for f, (name, state) in records:
        now = content_state(f)
        if now is None or now.sha256 != state.sha256:
            out[f] = name
    return out


def forget_imported(root: Any) -> None:
    """Drop the records of the code files under ``root`` (a plugin folder about to be re-imported)."""
    root = _real(os.fspath(root))
    with _lock:
        for p in [p for p in _IMPORTED if _under(p, root)]:
            del _IMPORTED[p]
        _IMPORTED_BY.pop(root, None)


def changed_since_import(root: Any) -> List[str]:
    """The code (and data) files under ``root`` imported in this process whose content changed (or that
    were deleted) since, and the user's modules outside it that its import imported
    (:func:`changed_outside_imports`)."""
    root = _real(os.fspath(root))
    with _lock:
        records = [(p, s) for p, s in _IMPORTED.items() if _under(p, root)]
    out = []
    for path, state in records:
        now = content_state(path)
        if now is None or now.sha256 != state.sha256:
            out.append(path)
    return sorted(set(out) | set(changed_outside_imports(root)))


@functools.lru_cache(maxsize=1)
def _system_dirs() -> Tuple[str, ...]:
    """The standard library and site-packages folders (third-party code: not a method's own)."""
    dirs: Set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            dirs.add(paths[key])
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # an embedded / virtualenv ``site`` without them
        pass
    return tuple(sorted(_real(d) for d in dirs if d))


def _holds_distributions(folder: str) -> bool:
    """Whether ``folder`` holds installed distributions (``*.dist-info``: a ``pip install --target`` folder)."""
    try:
        return any(name.endswith(".dist-info") for name in os.listdir(folder))
    except OSError:
        return False


_DIST_FOLDERS: Dict[str, bool] = {}


def _installed_dirs() -> Tuple[str, ...]:
    """The folders of the Python installation: :func:`_system_dirs`, the virtual environment, and every
    ``sys.path`` folder named ``site-packages`` / ``dist-packages`` or holding ``*.dist-info``."""
    dirs = set(_system_dirs())
    if sys.prefix != sys.base_prefix:  # a virtual environment: all of it
        dirs.update({_real(sys.prefix), _real(sys.exec_prefix)})
    for entry in list(sys.path):
        if not isinstance(entry, str) or not entry:
            continue
        real = _real(entry)
        if real not in _DIST_FOLDERS:
            _DIST_FOLDERS[real] = (os.path.basename(real) in ("site-packages", "dist-packages")
                                   or _holds_distributions(real))
        if _DIST_FOLDERS[real]:
            dirs.add(real)
    return tuple(sorted(dirs))


def _user_code(path: str) -> bool:
    """Whether the file ``path`` is the user's own code: outside the Python installation
    (:func:`_installed_dirs`), :mod:`fewshot_nsl` and its built-in baselines."""
    return not any(_under(path, d) for d in (*_installed_dirs(), *_builtin_dirs()))


def _foreign(path: str, root: str) -> bool:
    """Whether ``path`` is third-party or package code that does not belong to a code location ``root``
    (``root`` inside one of those folders keeps what lies under it)."""
    for d in (*_system_dirs(), _PACKAGE):
        if _under(path, d) and not _under(root, d):
            return True
    return False


def _module_file(module: Any) -> Optional[str]:
    f = getattr(module, "__file__", None)
    return _existing_file(f) if isinstance(f, str) else None


@functools.lru_cache(maxsize=None)
def _existing_file(path: str) -> Optional[str]:
    """The real path of a module's ``__file__`` if it is a file (cached: asked for every loaded module)."""
    real = _real(path)
    return real if os.path.isfile(real) else None


def _loaded_files() -> Set[str]:
    """The files of every loaded module, plus those recorded at import (modules since dropped)."""
    files = {f for f in map(_module_file, list(sys.modules.values())) if f}
    with _lock:
        files.update(_IMPORTED)
    return files


# ----------------------------------------------------------------------------- the code of a class
@dataclass(frozen=True)
class CodeFile:
    """One piece of code behind a code hash.

    Attributes:
        label: what a reader sees: the path relative to the code location's parent
            (``baselines/protonet.py``, ``my_plugins/helpers.py``), or ``<source of M.Q>`` /
            ``<no source: M.Q>`` for a class without a file.
        sha256: sha256 (16 hex) of the content (the source text; the nonce where there is none).
        path: the file (None for source text and nonces).
        classes: the method classes it defines.
        imported: whether it was imported in this process (then checked for changes since).
    """

    label: str
    sha256: str
    path: Optional[str] = None
    classes: Tuple[str, ...] = ()
    imported: bool = False

    def record(self) -> Dict[str, Any]:
        """The entry written to ``identity.json`` (``code_files``)."""
        out: Dict[str, Any] = {"path": self.label, "sha256": self.sha256}
        if self.classes:
            out["classes"] = list(self.classes)
        if self.label.startswith("<no source"):
            out["reusable"] = False
        return out


@dataclass
class _Code:
    """What :func:`_code_of` finds about one class or function."""

    files: Set[str] = field(default_factory=set)  # real files that define it
    texts: Dict[str, str] = field(default_factory=dict)  # pseudo file name -> source text (notebook cells)
    unknown: bool = False  # neither: never reusable
    namespaces: List[Dict[str, Any]] = field(default_factory=list)  # globals of its functions


def _functions(value: Any) -> List[types.FunctionType]:
    """The Python functions behind a class member (methods, static/class methods, properties),
    unwrapped from decorators (``functools.wraps``, ``torch.no_grad()``)."""
    out = []
    for v in (value, getattr(value, "__func__", None), getattr(value, "fget", None),
              getattr(value, "fset", None), getattr(value, "fdel", None)):
        if isinstance(v, types.FunctionType):
            try:
                v = inspect.unwrap(v)
            except ValueError:
                pass
            if isinstance(v, types.FunctionType):
                out.append(v)
    return out


def _own_functions(obj: Any) -> List[types.FunctionType]:
    """The functions a class defines itself (not its bases'), or a function itself."""
    if isinstance(obj, type):
        return [fn for value in vars(obj).values() for fn in _functions(value)]
    return _functions(obj)


def _names_in(code: types.CodeType) -> Set[str]:
    """Global names a code object (and the code nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in(const)
    return names


def _code_of(obj: Any) -> _Code:
    """Where the code of a class (its own members) or function lives."""
    out = _Code()
    fns = _own_functions(obj)
    pseudo: Dict[str, types.FunctionType] = {}
    for fn in fns:
        name = fn.__code__.co_filename
        real = _real(name) if name and not name.startswith("<") else ""
        if real and os.path.isfile(real):
            out.files.add(real)
        else:
            pseudo[name] = fn
        out.namespaces.append(fn.__globals__)
    if not fns:  # a class with attributes only: the file whose source holds its ``class`` statement
        module_file = _module_file(sys.modules.get(getattr(obj, "__module__", "") or ""))
        try:
            inspect.getsource(obj)
            found = module_file is not None
        except (OSError, TypeError):
            found = False
        if found:
            out.files.add(module_file)  # type: ignore[arg-type]
        else:
            out.unknown = True
    for name in pseudo:
        text = "".join(linecache.getlines(name))
        if text:
            out.texts[name] = text
        else:
            out.unknown = True
    if pseudo and not out.unknown:  # notebook functions and classes the cell's code names, transitively
        _add_referenced_cells(list(pseudo.values()), out)
    return out


def _add_referenced_cells(fns: List[types.FunctionType], out: _Code) -> None:
    """Add the source text of the notebook-defined functions and classes that ``fns`` name."""
    seen: Set[int] = set()
    todo = list(fns)
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for name in _names_in(fn.__code__):
            value = fn.__globals__.get(name)
            for sub in (_own_functions(value) if isinstance(value, (type, types.FunctionType)) else []):
                file = sub.__code__.co_filename
                if file.startswith("<") or not os.path.isfile(_real(file)):
                    text = "".join(linecache.getlines(file))
                    if not text:
                        out.unknown = True
                        continue
                    out.texts[file] = text
                    todo.append(sub)


def _location(obj: Any, code: _Code) -> Optional[Tuple[str, str]]:
    """The code location of ``obj``: ``(folder, kind)``, kind ``folder`` (a ``--plugins`` folder),
    ``package`` (a package's folder) or ``imports`` (a plain module's folder, or the working folder of
    a notebook: only what its namespace holds); None where only ``obj``'s own file counts (package
    code, already in :func:`package_code_hash`, or a third-party module)."""
    if not code.files:
        return (_real(os.getcwd()), "imports")
    module_name = getattr(obj, "__module__", "") or ""
    module = sys.modules.get(module_name)
    file = _module_file(module)
    file = file if file in code.files else sorted(code.files)[0]
    parts = module_name.split(".")
    if parts[0] == _PLUGIN_PACKAGE and len(parts) >= 3:
        for d in getattr(sys.modules.get(".".join(parts[:2])), "__path__", None) or []:
            return (_real(d), "folder")
    for i in range(1, len(parts) + 1):  # the outermost package whose folder holds the file (a package's own
        for d in getattr(sys.modules.get(".".join(parts[:i])), "__path__", None) or []:  # __init__ too)
            d = _real(d)
            if _under(file, d):
                return None if d == _PACKAGE else (d, "package")
    folder = os.path.dirname(file)
    if _under(folder, _PACKAGE) or any(_under(folder, d) for d in _system_dirs()):
        return None
    return (folder, "imports")


def _defining_module(value: Any) -> Optional[types.ModuleType]:
    """The loaded module an object (a function, a class) was defined in, if any."""
    name = getattr(value, "__module__", None)
    return sys.modules.get(name) if isinstance(name, str) else None


def _walk_namespaces(namespaces: List[Dict[str, Any]], visit: Callable[[Any], Iterable[Dict[str, Any]]]) -> None:
    """Call ``visit`` on every value of ``namespaces`` and of the namespaces it returns, each namespace once."""
    todo = list(namespaces)
    seen: Set[int] = set()
    while todo:
        ns = todo.pop()
        if id(ns) in seen:
            continue
        seen.add(id(ns))
        for value in list(ns.values()):
            todo.extend(visit(value))


def _namespace_modules(namespaces: List[Dict[str, Any]], root: str) -> Set[str]:
    """Files under ``root`` of the modules that ``namespaces`` hold (a module, or an object defined
    in one), followed transitively through those modules' namespaces."""
    files: Set[str] = set()

    def visit(value: Any) -> List[Dict[str, Any]]:
        module = value if isinstance(value, types.ModuleType) else _defining_module(value)
        f = _module_file(module)
        if f and _under(f, root) and not _foreign(f, root) and f not in files:
            files.add(f)
            return [vars(module)]
        return []

    _walk_namespaces(namespaces, visit)
    return files


def _location_files(root: str, kind: str, code: _Code, loaded: Set[str]) -> Set[str]:
    """The code files of a location (see :func:`_location`), with the data files of a plugin folder or
    package (:func:`data_files`; not of the built-ins); ``loaded``: :func:`_loaded_files`."""
    if kind == "imports":
        return _namespace_modules(code.namespaces, root)
    files = {f for f in loaded if _under(f, root) and not _foreign(f, root)}
    if kind == "package":
        files.update(_real(str(p)) for p in _py_files(Path(root)))
    else:  # a plugin folder: also its own *.py files (a sibling imported lazily while the run goes)
        files.update(_real(str(p)) for p in Path(root).glob("*.py"))
    if not any(_under(root, d) for d in _builtin_dirs()):
        files.update(data_files(root, recursive=kind == "package"))
    return files


#: Endings of files that a process writes while it runs (logs, ``nohup.out``, lock and temporary files): never
#: inputs of a method, and a plugin folder that is also the working folder would otherwise change its identity
#: (and be refused as changed mid-grid) as its own run's log grows.
OUTPUT_ENDINGS = (".log", ".out", ".err", ".lock", ".tmp", ".pid")


def _skipped_name(name: str) -> bool:
    """Hidden files and folders, ``__pycache__``, compiled bytecode, editor backups (``x~``, ``#x#``) and the
    outputs of running processes (:data:`OUTPUT_ENDINGS`)."""
    return (name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".pyo", "~", *OUTPUT_ENDINGS))
            or (name.startswith("#") and name.endswith("#")))


def data_files(root: Any, recursive: bool = False) -> List[str]:
    """The files other than ``.py`` of a code location: those directly in ``root`` (a ``--plugins``
    folder), or under it (``recursive``: a package), leaving out :func:`_skipped_name` ones; sorted real
    paths. Their content is hashed up to :data:`DATA_FILE_LIMIT` (:func:`content_state`)."""
    root = _real(os.fspath(root))
    out: List[str] = []
    if recursive:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not _skipped_name(d)]
            out += [os.path.join(folder, n) for n in names if not n.endswith(".py") and not _skipped_name(n)]
    else:
        try:
            names = os.listdir(root)
        except OSError:
            names = []
        out = [os.path.join(root, n) for n in names if not n.endswith(".py") and not _skipped_name(n)]
    return sorted(_real(p) for p in out if os.path.isfile(p))


def _referenced(value: Any) -> List[Tuple[Optional[str], Optional[str], Optional[Dict[str, Any]]]]:
    """``(module name, file, namespace)`` of the code a namespace value stands for: a module; the module
    of a function (its globals) or of a class (or, for a module dropped from ``sys.modules``, the globals of
    the class's functions); the class of another object."""
    try:
        return _referenced_code(value)
    except Exception:  # an exotic object (a proxy whose attributes raise): not the user's code
        return []


def _referenced_code(value: Any) -> List[Tuple[Optional[str], Optional[str], Optional[Dict[str, Any]]]]:
    if isinstance(value, types.ModuleType):
        return [(value.__name__, _module_file(value), vars(value))]
    if isinstance(value, types.FunctionType):
        ns = value.__globals__
        name = ns.get("__name__")
        f = _real(value.__code__.co_filename) if os.path.isfile(value.__code__.co_filename) else None
        return [(name if isinstance(name, str) else None, f, ns)]
    klass = value if isinstance(value, type) else type(value)
    module = _defining_module(klass)
    if module is not None and _module_file(module):
        return [(module.__name__, _module_file(module), vars(module))]
    return [r for fn in _own_functions(klass) for r in _referenced_code(fn)]


def _users(path: str, root: Optional[str]) -> bool:
    """Whether ``path`` is the user's code (:func:`_user_code`), or lies under the code location ``root``
    without being installed code or the package's (a virtual environment inside the working folder is not
    the user's, :func:`_foreign`)."""
    return _user_code(path) or (root is not None and _under(path, root) and not _foreign(path, root)
                                and not any(_under(path, d) and not _under(root, d) for d in _installed_dirs()))


def _user_modules(namespaces: List[Dict[str, Any]], root: Optional[str]) -> Dict[str, str]:
    """``{file: module name}`` of the modules of the user's (:func:`_user_code`, or under ``root``) that
    ``namespaces`` hold (a module, a function or class defined in one, an instance of such a class),
    followed transitively through those modules' namespaces."""
    out: Dict[str, str] = {}

    def visit(value: Any) -> List[Dict[str, Any]]:
        found = []
        for name, f, namespace in _referenced(value):
            if not f or f in out or not _users(f, root):
                continue
            out[f] = name or os.path.splitext(os.path.basename(f))[0]
            if namespace is not None:
                found.append(namespace)
        return found

    _walk_namespaces(namespaces, visit)
    return out


def _imported_code(code: _Code, loc: Optional[Tuple[str, str]]) -> Dict[str, str]:
    """``{file: module name}`` of the user's modules a class's code uses (:func:`_user_modules` from its
    functions' globals and, for a ``--plugins`` folder or a package, from every loaded module of it), with
    those its location's import brought in (:func:`note_plugin_imports`)."""
    namespaces = list(code.namespaces)
    root = loc[0] if loc else None
    if loc is not None and loc[1] in ("folder", "package"):
        for module in list(sys.modules.values()):
            f = _module_file(module)
            if f and _under(f, loc[0]):
                namespaces.append(vars(module))
    found = _user_modules(namespaces, root)
    with _lock:
        for key in ([root] if root else []) + sorted(code.files):
            for f, (name, _) in _IMPORTED_BY.get(key, {}).items():
                found.setdefault(f, name)
    return found


def _module_label(path: str, name: str) -> str:
    """A reader's label of a module outside the code location: its path as its module name spells it
    (``mylab_scale.py``, ``mylab/scale.py``, ``mylab/__init__.py``), not where it lies on this machine."""
    parts = [p for p in name.split(".") if p]
    base = os.path.basename(path)
    if base.startswith("__init__."):
        return "/".join(parts + [base])
    return "/".join(parts[:-1] + [base])


def _label(path: str, root: Optional[str]) -> str:
    if root and _under(path, root):
        return f"{os.path.basename(root)}/{Path(path).relative_to(root).as_posix()}"
    if _under(path, _PACKAGE):
        return f"{PACKAGE_DIR.name}/{Path(path).relative_to(_PACKAGE).as_posix()}"
    return os.path.basename(path)


#: Per-object nonces of classes without any source (never reused).
_NONCES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _nonce(obj: Any) -> str:
    with _lock:
        if obj not in _NONCES:
            _NONCES[obj] = _sha(f"{uuid.uuid4().hex}".encode())
            warnings.warn(f"method class {obj.__module__}.{obj.__qualname__} has no source file and Python kept no "
                          f"source text for it (defined with exec?): its runs get an identity of their own and are "
                          f"never reused", stacklevel=3)
        return _NONCES[obj]


def _is_plugin_file(path: str) -> Optional[str]:
    """The ``--plugins`` folder holding ``path``, if it is one (else None)."""
    try:
        from .plugins import loaded_plugin_folders
    except ImportError:  # pragma: no cover - partial install
        return None
    for folder in loaded_plugin_folders():
        if _under(path, _real(str(folder))) or path in outside_imports(folder):
            return str(folder)
    return None


def _check_unchanged(entry: CodeFile, owner: str) -> None:
    """Refuse a code file imported in this process that has changed on disk since.

    Raises:
        RegistryError: one line naming the file and what to do.
    """
    if not entry.imported or entry.path is None or _under(entry.path, _PACKAGE):
        return
    with _lock:
        recorded = _IMPORTED.setdefault(entry.path, FileState(0, 0, entry.sha256))  # first seen: as it is now
    if recorded.sha256 == entry.sha256:
        return
    folder = _is_plugin_file(entry.path)
    if folder is not None:
        what, note = f"plugin {entry.path}", ""
        if not _under(entry.path, _real(folder)):
            what = f"module {entry.path} (imported by plugin folder {folder})"
        elif not entry.path.endswith(".py"):  # maybe a file the run itself writes (a log, the results)
            what = f"plugin data file {entry.path}"
            note = " (a file the run itself writes, like a log, belongs outside the plugin folder)"
        raise RegistryError(
            f"{what} changed on disk since it was imported (code of {owner}); restart Python, or "
            f"call fewshot_nsl.benchmark() or load_plugins([{folder!r}]) again, which re-import a changed plugin "
            f"folder{note}"
        )
    raise RegistryError(f"code file {entry.path} changed on disk since it was imported (code of {owner}); restart "
                        f"Python so that the code that runs is the code recorded")


def _outdated(obj: Any) -> Optional[str]:
    try:
        from .plugins import outdated_reason
    except ImportError:  # pragma: no cover
        return None
    return outdated_reason(obj)


def object_code_files(obj: Any, stop: Tuple[type, ...] = ()) -> List[CodeFile]:
    """The code behind a class (with its bases, up to any class in ``stop``) or a function,
    outside the package's own files (see the module docstring), sorted by label.

    Raises:
        RegistryError: ``obj`` was replaced by a re-import of its plugin, or one of its code files
            was imported and has changed on disk since.
    """
    reason = _outdated(obj)
    if reason:
        raise RegistryError(reason)
    owner = getattr(obj, "registered_name", None) or f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    owner = f"method '{owner}'" if hasattr(obj, "registered_name") else owner
    chain = [k for k in inspect.getmro(obj) if k is not object] if isinstance(obj, type) else [obj]
    stop_at = next((i for i, k in enumerate(chain) if k in stop), len(chain))
    entries: Dict[str, CodeFile] = {}
    classes: Dict[str, List[str]] = {}
    loaded = _loaded_files()
    for klass in chain[:stop_at]:
        code = _code_of(klass)
        if klass is not chain[0] and _third_party(klass, chain[0], code):
            continue  # a base from an installed library (torch's nn.Module, a mixin): not the method's code
        loc = _location(klass, code)
        root = loc[0] if loc else None
        if code.unknown:
            label = f"<no source: {klass.__module__}.{klass.__qualname__}>"
            entries[label] = CodeFile(label, _nonce(klass))
            classes.setdefault(label, []).append(klass.__qualname__)
            continue
        for text in code.texts.values():
            label = f"<source of {klass.__module__}.{klass.__qualname__}>"
            h = _sha(text.encode())
            if label in entries:
                h = _sha((entries[label].sha256 + h).encode())
            entries[label] = CodeFile(label, h)
        if code.texts:
            classes.setdefault(f"<source of {klass.__module__}.{klass.__qualname__}>", []).append(klass.__qualname__)
        files = set(code.files) | (_location_files(*loc, code, loaded) if loc else set())
        for f in sorted(files):
            state = content_state(f)
            if state is None:
                continue
            label = _label(f, root)
            entries[label] = CodeFile(label, state.sha256, f, imported=f in loaded)
        if not is_builtin(klass):  # the user's modules it uses from elsewhere (never the built-ins')
            for f, name in sorted(_imported_code(code, loc).items()):
                state = None if f in files else content_state(f)
                if state is None:
                    continue
                label = _label(f, root) if root and _under(f, root) else _module_label(f, name)
                if label in entries and entries[label].path != f:
                    label = f  # two files behind one name: the full path tells them apart
                entries[label] = CodeFile(label, state.sha256, f, imported=f in loaded)
        for f in code.files:
            classes.setdefault(_label(f, root), []).append(klass.__qualname__)
    out = []
    for label in sorted(entries):
        e = entries[label]
        e = CodeFile(e.label, e.sha256, e.path, tuple(classes.get(label, ())), e.imported)
        _check_unchanged(e, owner)
        out.append(e)
    return out


def _third_party(klass: type, first: Any, code: _Code) -> bool:
    """Whether ``klass`` (a base of ``first``) is installed-library code outside ``first``'s own package."""
    if not code.files or not all(any(_under(f, d) for d in _system_dirs()) for f in code.files):
        return False
    return klass.__module__.split(".")[0] != str(getattr(first, "__module__", "")).split(".")[0]


def _method_base() -> Tuple[type, ...]:
    from .methods.base import FewShotMethod

    return (FewShotMethod,)


def method_code_files(cls: type) -> List[CodeFile]:
    """The files (and source texts) behind :func:`method_code_hash` besides the package's own: the
    method's class and bases up to ``FewShotMethod`` and the code their locations load (see the module
    docstring), each with its content hash, sorted by label.

    Raises:
        RegistryError: a code file imported in this process changed on disk since (the module that
            would run is not the one on disk), or the class was replaced by a re-import of its plugin.
    """
    return object_code_files(cls, _method_base())


#: ``code_files`` records by the code hash they make up (filled by :func:`method_code_hash`).
_CODE_FILES: Dict[str, Tuple[Dict[str, Any], ...]] = {}


def code_files_hash(files: List[CodeFile], base: str) -> str:
    """sha256 (16 hex) of ``base`` (a package hash) and the labels, hashes and classes of ``files``."""
    h = hashlib.sha256(base.encode())
    for f in files:
        h.update(json.dumps([f.label, f.sha256, list(f.classes)]).encode())
    return h.hexdigest()[:16]


def method_code_hash(cls: type) -> str:
    """sha256 (16 hex) of the package source plus the method's code (:func:`method_code_files`).

    Raises:
        RegistryError: as :func:`method_code_files`.
    """
    files = method_code_files(cls)
    digest = code_files_hash(files, package_code_hash())
    with _lock:
        _CODE_FILES[digest] = (
            {"path": f"{PACKAGE_DIR.name}/**/*.py", "sha256": package_code_hash()},
            *(f.record() for f in files),
        )
    return digest


def run_code_hash(method_cls: type, backbone_factory: Optional[Callable[..., Any]] = None) -> str:
    """The code hash of a run: :func:`method_code_hash`, plus the code of its backbone where the backbone
    is not built in (a plugin's ``register_backbone``), so editing a plugin backbone gives a new identity.

    Raises:
        RegistryError: as :func:`method_code_files`.
    """
    if backbone_factory is None or is_builtin(backbone_factory):
        return method_code_hash(method_cls)
    files = {f.label: f for f in method_code_files(method_cls)}
    for f in object_code_files(backbone_factory):
        files.setdefault(f.label, f)
    ordered = [files[k] for k in sorted(files)]
    digest = code_files_hash(ordered, f"{package_code_hash()}:backbone")
    with _lock:
        _CODE_FILES[digest] = ({"path": f"{PACKAGE_DIR.name}/**/*.py", "sha256": package_code_hash()},
                               *(f.record() for f in ordered))
    return digest


def code_files_of(code_hash: str) -> Tuple[Dict[str, Any], ...]:
    """The ``code_files`` record of a code hash computed in this process (empty if none was)."""
    with _lock:
        return _CODE_FILES.get(code_hash, ())


# ----------------------------------------------------------------------------- pretraining
#: Members a method class may define without changing what the base-class pretraining trains: the calls
#: made at episode time, after the pretrained weights exist, and the declarations the cache key already
#: holds (``default_conv`` is in the conv spec) or that only choose the stages or label the rows
#: (``transductive``), and Python's bookkeeping. For a class with code of its own
#: (:func:`pretraining_neutral`) these are the only plain (non-function) class attributes allowed; a function
#: member of any name is allowed too where no code that pretraining runs refers to it.
EPISODE_TIME_MEMBERS = frozenset({
    "fit_support", "forward", "loss", "after_pretrain", "fit_base", "clip_groups", "display_name", "check_choice",
    "stages", "training_stages", "default_conv", "compilable", "registered_name", "transductive",
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__firstlineno__",
    "__static_attributes__", "__orig_bases__", "__parameters__", "_abc_impl", "__slotnames__",
})


def _builtin_dirs() -> Tuple[str, ...]:
    from .resources import resource_dir

    return (_PACKAGE, _real(str(resource_dir("baselines"))))


def is_builtin(obj: Any) -> bool:
    """Whether ``obj`` (a class or function) is defined in the package or its built-in baselines."""
    code = _code_of(obj)
    return bool(code.files) and not code.texts and not code.unknown and all(
        any(_under(f, d) for d in _builtin_dirs()) for f in code.files)


@functools.lru_cache(maxsize=1)
def _baselines_code_hash() -> Optional[str]:
    """sha256 (16 hex) of the built-in baselines' ``.py`` files where they live outside the package (a
    checkout); None where the package holds them (a wheel: :func:`package_code_hash` covers them)."""
    baselines = Path(_builtin_dirs()[1])
    if not baselines.is_dir() or _under(str(baselines), _PACKAGE):
        return None
    return _hash_files(_py_files(baselines), baselines)


def shared_pretraining_code_hash() -> str:
    """sha256 (16 hex) of the code every built-in's pretraining shares: the package source and the
    built-in baselines (their ``__init__`` is shared code: editing any of them retrains it)."""
    baselines = _baselines_code_hash()
    return package_code_hash() if baselines is None else _sha(f"{package_code_hash()}:{baselines}".encode())


@functools.lru_cache(maxsize=1)
def _module_names() -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """``(members of torch.nn.Module, attributes of an nn.Module instance)`` (torch imported here, not at import)."""
    from torch import nn

    return frozenset(dir(nn.Module)), frozenset(vars(nn.Module()))


#: Members of a method class that pretraining runs (or that decide what it runs): the module it trains
#: (``pretrain_module``, the ``backbone`` it returns by default) and the extra loss term (``regularization``). A
#: plugin defining one of them, or any member of ``torch.nn.Module`` (``to``, ``_apply``, ``__setattr__``, ``train``
#: ...), gets a pretraining of its own (:func:`pretraining_neutral`).
PRETRAINING_MEMBERS = frozenset({"pretrain_module", "regularization", "backbone"})

#: ``nn.Module`` members a plugin may define without changing pretraining: ``__init__`` is checked by itself
#: (:func:`_init_stores_options`); the others only render the module as text.
_HARMLESS_MODULE_MEMBERS = frozenset({"__init__", "__repr__", "__str__", "extra_repr"})

#: Calls of ``self.<name>(...)`` an option-storing ``__init__`` may make: they validate an option or register a
#: buffer / parameter / module of the *method* (never of its backbone; the name must be a string constant).
_INIT_SELF_CALLS = frozenset({"check_choice", "register_buffer", "register_parameter", "add_module", "register_module"})


def _forbidden_members() -> FrozenSet[str]:
    members, _ = _module_names()
    return frozenset((members | PRETRAINING_MEMBERS | {"__new__", "__init_subclass__", "__class_getitem__",
                                                      "__getattr__", "__getattribute__", "__setattr__",
                                                      "__delattr__", "__set_name__", "__slots__"})
                     - EPISODE_TIME_MEMBERS - _HARMLESS_MODULE_MEMBERS)


def _function_node(fn: types.FunctionType) -> Optional[ast.FunctionDef]:
    """The ``def`` of ``fn`` in its source (a file, or a notebook cell Python kept in :mod:`linecache`), found
    by name and first line; None where there is no source or it does not parse."""
    code = fn.__code__
    linecache.checkcache(code.co_filename)
    lines = linecache.getlines(code.co_filename, fn.__globals__)
    if not lines:
        return None
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return None
    found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == code.co_name
             and n.lineno == code.co_firstlineno]
    return found[0] if len(found) == 1 else None


def _init_stores_options(fn: Any, forbidden_attributes: FrozenSet[str]) -> bool:
    """Whether a method class's own ``__init__`` provably leaves the module pretraining trains as the built-ins
    build it: it passes its ``backbone`` argument unchanged to ``super().__init__`` and otherwise only stores
    options on the method.

    Its body may hold, in any order: a docstring; exactly one ``super().__init__(backbone, ...)`` statement (the
    parameter ``backbone`` itself, as the first positional or the ``backbone=`` argument; ``image_size`` and any
    other arguments are expressions of the kind below); assignments (plain, annotated, augmented) to local names
    or to ``self.<name>`` for a name not in ``forbidden_attributes`` (``backbone``, ``nn.Module``'s attributes,
    the names pretraining code reads); calls ``self.check_choice(...)``, ``self.register_buffer("name", ...)``,
    ``self.register_parameter``, ``self.add_module``, ``self.register_module``; ``if`` / ``assert`` / ``raise`` /
    ``pass``. Every expression it evaluates must not reach the backbone or the method object: it names neither
    ``self`` nor ``backbone``, except ``backbone.feature_dim(...)`` / ``self.backbone.feature_dim(...)`` (which
    runs the backbone in eval mode under ``no_grad`` and restores its mode: :meth:`Backbone.feature_dim`) and
    reads of ``self.image_size`` or of an attribute this ``__init__`` stored before. Anything else (a loop, a
    ``with``, a nested ``def``, a decorator, ``self.backbone.x = ...``, ``helper(self)``, ``backbone = wrap(backbone)``,
    a source that cannot be read) is not provably option-storing.
    """
    if not isinstance(fn, types.FunctionType) or getattr(fn, "__wrapped__", None) is not None:
        return False
    node = _function_node(fn)
    if node is None or node.decorator_list:
        return False
    a = node.args
    params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if not params or "backbone" not in params[1:]:
        return False
    me = params[0]
    tainted = {me, "backbone"}
    readable = {"image_size"}
    supers = 0

    def feature_dim_call(e: ast.AST) -> bool:
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "feature_dim"):
            return False
        owner = e.func.value
        return (isinstance(owner, ast.Name) and owner.id == "backbone") or (
            isinstance(owner, ast.Attribute) and owner.attr == "backbone" and isinstance(owner.value, ast.Name)
            and owner.value.id == me)

    def clean(e: Optional[ast.AST]) -> bool:
        if e is None:
            return True
        if feature_dim_call(e):
            return all(clean(x) for x in e.args) and all(clean(k.value) for k in e.keywords)  # type: ignore[attr-defined]
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == me:
            return isinstance(e.ctx, ast.Load) and e.attr in readable
        if isinstance(e, ast.Name):
            return e.id not in tainted
        if isinstance(e, ast.arg):
            return e.arg not in tainted
        return all(clean(c) for c in ast.iter_child_nodes(e))

    def target(t: ast.AST, stored: Set[str]) -> bool:
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == me:
            if t.attr in forbidden_attributes or t.attr.startswith("__"):
                return False
            stored.add(t.attr)
            return True
        if isinstance(t, ast.Name):
            return t.id not in tainted
        if isinstance(t, (ast.Tuple, ast.List)):
            return all(target(x, stored) for x in t.elts)
        if isinstance(t, ast.Starred):
            return target(t.value, stored)
        return False

    def super_init(call: ast.Call) -> bool:
        f = call.func
        if not (isinstance(f, ast.Attribute) and f.attr == "__init__" and isinstance(f.value, ast.Call)):
            return False
        sup = f.value
        if not (isinstance(sup.func, ast.Name) and sup.func.id == "super" and not sup.keywords):
            return False
        if sup.args and not (len(sup.args) == 2 and isinstance(sup.args[0], ast.Name) and sup.args[0].id not in tainted
                             and isinstance(sup.args[1], ast.Name) and sup.args[1].id == me):
            return False
        if any(isinstance(x, ast.Starred) for x in call.args) or any(k.arg is None for k in call.keywords):
            return False
        given = [k.value for k in call.keywords if k.arg == "backbone"] + call.args[:1]
        if len(given) != 1 or not (isinstance(given[0], ast.Name) and given[0].id == "backbone"):
            return False
        rest = call.args[1:] + [k.value for k in call.keywords if k.arg != "backbone"]
        return all(clean(x) for x in rest)

    def self_call(call: ast.Call) -> bool:
        f = call.func
        if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == me
                and f.attr in _INIT_SELF_CALLS):
            return False
        if any(isinstance(x, ast.Starred) for x in call.args) or any(k.arg is None for k in call.keywords):
            return False
        if f.attr != "check_choice":  # the name of what is registered: a constant, not a reserved attribute
            names = call.args[:1] + [k.value for k in call.keywords if k.arg == "name"]
            if len(names) != 1 or not (isinstance(names[0], ast.Constant) and isinstance(names[0].value, str)):
                return False
            if names[0].value in forbidden_attributes or names[0].value.startswith("__"):
                return False
            readable.add(names[0].value)
        return all(clean(x) for x in call.args) and all(clean(k.value) for k in call.keywords)

    def statements(body: List[ast.stmt], top: bool) -> bool:
        nonlocal supers
        for st in body:
            if isinstance(st, ast.Pass) or (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant)):
                continue
            if isinstance(st, ast.Raise):  # evaluated only when __init__ fails: no method is built then
                continue
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):
                if top and super_init(st.value):
                    supers += 1
                    continue
                if self_call(st.value):
                    continue
                return False
            stored: Set[str] = set()
            if isinstance(st, ast.Assign):
                ok = clean(st.value) and all(target(t, stored) for t in st.targets)
            elif isinstance(st, ast.AnnAssign):
                ok = clean(st.value) and clean(st.annotation) and target(st.target, stored)
            elif isinstance(st, ast.AugAssign):
                ok = clean(st.value) and target(st.target, stored)
            elif isinstance(st, ast.Assert):
                ok = clean(st.test)
            elif isinstance(st, ast.If):
                ok = clean(st.test) and statements(st.body, False) and statements(st.orelse, False)
            else:
                return False
            if not ok:
                return False
            readable.update(stored)
        return True

    return statements(node.body, True) and supers == 1


def _reached_names(fns: List[types.FunctionType], builtin_classes: List[type]) -> Set[str]:
    """Every name (global, attribute, method) the code of ``fns`` refers to, following the members of
    ``builtin_classes`` and the built-in module-level functions so named, transitively."""
    names: Set[str] = set()
    seen: Set[int] = set()
    todo = list(fns)
    while todo:
        fn = todo.pop()
        if id(fn.__code__) in seen:
            continue
        seen.add(id(fn.__code__))
        found = _names_in(fn.__code__)
        names |= found
        for name in found:
            for klass in builtin_classes:
                if name in vars(klass):
                    todo += _functions(vars(klass)[name])
            value = fn.__globals__.get(name)
            if isinstance(value, types.FunctionType) and is_builtin(value):
                todo.append(value)
    return names


def pretraining_neutral(cls: type) -> bool:
    """Whether ``cls``, a method class with code of its own (a plugin, a notebook or third-party class, or a
    subclass of a built-in), pretrains exactly what the built-ins pretrain: then it shares their cache key.

    Pretraining (:func:`fewshot_nsl.training.pretrain`) trains ``method.pretrain_module()`` with a linear head and
    adds ``method.regularization()`` to the loss; the module's initial weights are those the method's constructor
    leaves: the harness builds the backbone (seeded, from the config: the key covers it) and passes it to the
    method's ``__init__``. So the classes of its MRO that are not built in (not ``torch.nn.Module`` or ``object``)
    must leave all of that to the built-in code:

    * they define none of :data:`PRETRAINING_MEMBERS` (``pretrain_module``, ``regularization``, ``backbone``) and
      no member of ``torch.nn.Module`` (``to``, ``_apply``, ``train``, ``__setattr__`` ...) but ``forward`` and
      ``__repr__``-like ones;
    * their ``__init__`` only stores options (:func:`_init_stores_options`): it hands ``backbone`` unchanged to
      ``super().__init__`` and touches neither the backbone nor the method beyond storing attributes (the
      template in the README, ``examples/simpleshot``);
    * their other functions (``fit_support``, ``forward``, helpers such as ``_embed`` ...) are not called by the
      code pretraining runs: no name the built-in ``__init__`` / ``pretrain_module`` / ``regularization`` /
      ``nn.Module`` overrides of the class's bases, or the plugin's own ``__init__``, refer to (transitively
      through built-in code, by name: an over-approximation);
    * their plain class attributes (not functions) are declarations in :data:`EPISODE_TIME_MEMBERS`
      (``training_stages``, ``default_conv``, ``compilable`` ...): any other attribute might be read by a base
      while it builds the module.

    This is a rule on the code, not on the module built (the key is computed from the class, without a config
    to build it with). It does not see global side effects of functions an ``__init__`` calls without the
    backbone or the method (changing torch's global settings), which the house style rules out. It reads the
    source on disk: :func:`builds_pretrained_module` first refuses a class whose files changed since import.
    """
    mro = [k for k in inspect.getmro(cls) if k is not object]
    members, instance_attributes = _module_names()
    from torch import nn

    mro = [k for k in mro if k is not nn.Module]
    builtin = [k for k in mro if is_builtin(k)]
    own = [k for k in mro if k not in builtin]
    entry_names = ({"__init__"} | PRETRAINING_MEMBERS | members) - EPISODE_TIME_MEMBERS
    entries = [fn for k in builtin for name, value in vars(k).items() if name in entry_names
               for fn in _functions(value)]
    read_by_builtins = _reached_names(entries, builtin)
    # storing into a property of a built-in base would run its setter
    setters = {name for k in builtin for name, value in vars(k).items() if hasattr(type(value), "__set__")}
    forbidden = _forbidden_members()
    inits: List[types.FunctionType] = []
    for klass in own:
        if "__init__" in vars(klass):
            init = vars(klass)["__init__"]
            if not _init_stores_options(init, forbidden | instance_attributes | read_by_builtins | setters):
                return False
            inits.append(init)
    reached = _reached_names(entries + inits, builtin)
    for klass in own:
        for name, value in vars(klass).items():
            if name == "__init__":
                continue
            if name in forbidden:
                return False
            if _functions(value):
                if name in reached:
                    return False
            elif name not in EPISODE_TIME_MEMBERS:
                return False
    return True


def builds_pretrained_module(cls: type) -> bool:
    """Whether code of ``cls`` beyond the shared built-in code can change what pretraining trains.

    Built-in classes (the package and its baselines) share one pretraining by design: a chain of built-ins
    builds its own only where a class before ``FewShotMethod`` overrides ``pretrain_module`` (the rule of every
    key computed so far: the built-ins' keys do not change). A chain with any other class (plugin, notebook,
    third-party package, or a subclass of a built-in) builds its own unless :func:`pretraining_neutral` shows
    that its code leaves pretraining to the built-in code (before, any ``__init__`` of its own counted, so the
    README's plugin template never shared the built-ins' pretraining).

    Raises:
        RegistryError: a code file of ``cls`` changed on disk since it was imported (its source, which the rule
            reads, would not be the code that runs), or ``cls`` was replaced by a re-import of its plugin.
    """
    chain = [k for k in inspect.getmro(cls) if k is not object]
    stop = next((i for i, k in enumerate(chain) if k in _method_base()), len(chain))
    if all(is_builtin(k) for k in chain[:stop]):
        return any("pretrain_module" in vars(k) for k in chain[:stop])
    for klass in chain[:stop]:
        if is_builtin(klass) and "pretrain_module" in vars(klass):
            return True
    method_code_files(cls)  # refuses code changed on disk since its import: the source read is the code that runs
    return not pretraining_neutral(cls)


def pretraining_code_hash(method_cls: Optional[type], backbone_factory: Optional[Callable[..., Any]] = None) -> str:
    """The code part of the pretraining cache key (:func:`fewshot_nsl.training_state.pretrain_key`): the code
    that pretraining executes.

    Pretraining runs package code (the backbone the harness builds from the config, the loop of
    :mod:`fewshot_nsl.training`) on the module ``method.pretrain_module()`` returns, as the method's constructor
    left it, with ``method.regularization()`` added to the loss. The built-ins share one pretraining by design:
    the key is :func:`shared_pretraining_code_hash` (package and built-in baselines) when the method's classes are
    built-ins that leave ``pretrain_module`` alone, or when a plugin's code provably leaves all of that to the
    built-in code (:func:`pretraining_neutral`: no override of ``pretrain_module`` / ``regularization`` /
    ``backbone`` / ``nn.Module`` members, an ``__init__`` that only stores options and hands ``backbone`` to
    ``super().__init__`` unchanged, no other member called by pretraining code). Such a plugin's ``forward``,
    ``fit_support`` and helpers can be edited without training again. Otherwise (:func:`builds_pretrained_module`)
    the method's code (:func:`method_code_hash`: its files, helpers and data included) is added, so any edit of
    its files trains again. A backbone that is not built in adds its own code (:func:`object_code_files`).

    The rule reads code, not the module built: the key is computed from the class alone (no config to build the
    method with), and a structural key (parameter names and shapes) would miss an ``__init__`` that re-initialises
    or freezes a weight. Method options are not in the key (:func:`~fewshot_nsl.training_state.pretrain_key`).

    Raises:
        RegistryError: as :func:`method_code_files`.
    """
    parts = [shared_pretraining_code_hash()]
    if method_cls is not None and builds_pretrained_module(method_cls):
        parts.append(f"method:{method_code_hash(method_cls)}")
    if backbone_factory is not None and not is_builtin(backbone_factory):
        parts.append(f"backbone:{code_files_hash(object_code_files(backbone_factory), '')}")
    return parts[0] if len(parts) == 1 else _sha(":".join(parts).encode())


# ----------------------------------------------------------------------------- the identity
#: The components that make a run what it is (``code_files`` only explains ``code_hash``).
_COMPONENTS = ("config_hash", "dataset_fingerprint", "episode_hash", "split", "code_hash", "world_size")


@dataclass(frozen=True)
class RunIdentity:
    """Everything that determines a run's numbers (see the module docstring).

    ``code_files`` (filled from the code hash computed in this process) lists the files behind
    ``code_hash`` with their content hashes, for a reader of ``identity.json``; it adds nothing to
    the identity (the code hash covers the same content), so :meth:`digest` and
    :meth:`differences` leave it out.
    """

    config_hash: str
    dataset_fingerprint: str
    episode_hash: str
    split: str
    code_hash: str
    world_size: int = 1
    code_files: Tuple[Dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.code_files:
            object.__setattr__(self, "code_files", code_files_of(self.code_hash))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {k: getattr(self, k) for k in _COMPONENTS}
        if self.code_files:
            out["code_files"] = [dict(f) for f in self.code_files]
        return out

    def digest(self) -> str:
        """sha256 (16 hex) of all components; the last part of the run id is its first 8."""
        core = {k: getattr(self, k) for k in _COMPONENTS}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, recorded: Dict[str, Any]) -> List[str]:
        """Names of the components in which ``recorded`` (an ``identity.json``) differs."""
        return [k for k in _COMPONENTS if recorded.get(k) != getattr(self, k)]
