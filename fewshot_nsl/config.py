"""YAML configs -> typed dataclasses.

Precedence (lowest to highest): dataclass defaults < profile file
(``configs/profiles/<profile>.yaml``) < the profile's per-method section
(``methods: {<name>: {...}}``, then its per-shot part ``shots: {<k>: {...}}``) < ``--config FILE``
(same order inside it) < ``--set KEY=VALUE``
< the dedicated command-line flags (``--shots``, ``--image-size``, ...).
``--set`` belongs to the command line: it overrides the ``--config`` file, and a dedicated flag
given with it wins over it. Its key is dotted into the config (``episodic.steps``,
``method_options.inner_lr``), its value is read as YAML (``10`` an int, ``0.05`` and ``1e-4``
floats, ``true`` a bool, ``null`` None, ``[1, 2]`` a list), it is repeatable, and an unknown key or
a wrong type is refused with the same one line as in a file (see :func:`parse_set_options`).
A YAML file may ``include:`` other files (paths relative to itself); the including file wins.
Unknown keys and wrong types are refused with one line naming the key and the file; a bool is
not an int and a float is not rounded to one. Every config, profile, include, grid file and
``--set`` value is parsed by :class:`ConfigLoader`, which reads ``1e-4`` and ``5e-1`` as floats
(PyYAML's YAML 1.1 resolver reads them as strings). Option keys the harness passes itself
(:data:`RESERVED_OPTIONS`) and an invalid ``conv`` section are refused by :meth:`RunConfig.validate`.
The resolved config is saved with every run (``config.yaml``) and hashed into the run id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import ConfigError, one_line
from .resources import resource_dir

#: ``configs/`` of a checkout, ``fewshot_nsl/configs`` of an installed copy.
CONFIG_DIR = resource_dir("configs")
PROFILES = ("smoke", "quick", "paper")
#: Largest image side accepted (a 60,000-image store at 1024 px is 189 GB; 84 px is the protocol).
MAX_IMAGE_SIZE = 1024
#: Seeds every RNG the suite seeds accepts (numpy: ``0 <= seed < 2**63``).
MAX_SEED = 2**63 - 1
#: Option keys the harness passes itself: ``{section: {key: what sets it}}``. Set in the option dict
#: they would reach the factory twice (a ``TypeError`` once the run has started).
RESERVED_OPTIONS = {
    "dataset_options": {"name": "--dataset (dataset:)", "data_root": "--data-root (data_root:)",
                        "image_size": "--image-size (image_size:)", "cache_dir": "--cache-dir (cache_dir:)"},
    "method_options": {"backbone": "--backbone and backbone_options", "image_size": "--image-size (image_size:)"},
    "backbone_options": {"conv_layer": "the conv section (conv: {kind: static|dynamic, ...})"},
}


# ----------------------------------------------------------------------------- YAML
#: Floats PyYAML's YAML 1.1 resolver misses: an exponent without a dot or without a sign (``1e-4``,
#: ``5e-1``, ``1E3``, ``1.5e3``) and a signed leading dot (``-.5``). YAML 1.2 reads all of them as floats.
_FLOAT_12 = re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                             |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$""", re.X)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads ``1e-4`` / ``5e-1`` as floats (YAML 1.2), not strings (YAML 1.1),
    and refuses a key given twice in one mapping (PyYAML keeps the last silently: ``pretrain:``
    written twice would drop the first one's settings).

    Every YAML read of a config goes through it: config and profile files, their includes, grid
    files (:func:`load_yaml`) and ``--set`` values (:func:`parse_yaml`). A subclass, so
    :class:`yaml.SafeLoader` itself is unchanged for everyone else.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        """The mapping of ``node``; a key written twice (not counting ``<<`` merges) is an error."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {key!r} (line {key_node.start_mark.line + 1}); write each key "
                                f"once", key_node.start_mark)
        return super().construct_mapping(node, deep)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string :class:`ConfigLoader` would read as a float (``'1e-4'``),
    so that a run's saved ``config.yaml`` reads back as the run's config (:func:`save_config`)."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """One YAML document from ``text`` with :class:`ConfigLoader` (``"1e-4"`` -> ``0.0001``).

    Raises:
        yaml.YAMLError: not YAML.
    """
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def check_seed(value: Any, where: str) -> int:
    """``value`` if it is an int seed every RNG accepts (``0 .. 2**63-1``; a bool is not one).

    Raises:
        ConfigError: naming ``where``, the value and the range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{where} must be in 0 .. 2**63-1 (an integer, what numpy's and torch's RNGs accept), "
                          f"got {value!r}")
    return value


#: Choices of ``pretrain.optimizer`` and ``pretrain.schedule``.
PRETRAIN_OPTIMIZERS = ("sgd", "adam")
PRETRAIN_SCHEDULES = ("onecycle", "constant")


@dataclass
class PretrainConfig:
    """Base-class pretraining: backbone + linear head, cross-entropy over all base classes."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd": Nesterov SGD with momentum; "adam": Adam (Ravi & Larochelle's pretraining)
    schedule: str = "onecycle"  # "onecycle" (peak lr = lr, 10% warm-up) or "constant"
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    max_steps: Optional[int] = None  # cap on optimiser steps (smoke tests)
    augment: bool = True  # random-resized crop (scale 0.8-1) + colour jitter
    # validation (fewshot_nsl.validation): every val_every optimiser steps, the first val_episodes of the fixed
    # validation list; val_select: best keeps the weights of the best val_metric; val_patience stops early
    val_every: Optional[int] = None
    val_episodes: int = 100
    val_metric: str = "accuracy"  # accuracy | loss
    val_select: str = "last"  # last | best
    val_patience: Optional[int] = None


@dataclass
class EpisodicConfig:
    """Episodic (meta-)training on base-class episodes sampled on the fly."""

    steps: int = 2000  # optimiser steps
    meta_batch: int = 1  # episodes per optimiser step
    lr: float = 1e-3  # Adam
    ways: Optional[int] = None  # training ways (None: the evaluation ways)
    shots: Optional[int] = None  # training shots (None: the evaluation shots)
    queries: int = 15
    checkpoint_every: int = 100
    lr_step: Optional[int] = None  # multiply the lr by lr_gamma every lr_step optimiser steps (None: constant)
    lr_gamma: float = 0.5
    grad_clip: Optional[float] = None  # clip the gradient norm of each of the method's clip_groups() (None: off)
    # validation (fewshot_nsl.validation): every val_every optimiser steps, the first val_episodes of the fixed
    # validation list; val_select: best keeps the weights of the best val_metric; val_patience stops early
    val_every: Optional[int] = None
    val_episodes: int = 100
    val_metric: str = "accuracy"  # accuracy | loss
    val_select: str = "last"  # last | best
    val_patience: Optional[int] = None


@dataclass
class EvalConfig:
    """Evaluation on the fixed test episodes."""

    episodes: int = 600  # the first N of the fixed list
    queries: int = 15
    split: str = "test"
    #: episodes per call for a method with batched evaluation (fewshot_nsl.evaluation): "auto" (by memory) or a
    #: number (1: one episode at a time). How the evaluation runs, not what it computes: not in the config hash.
    batch_episodes: Any = "auto"


@dataclass
class RunConfig:
    """Everything that defines one (dataset, method, backbone, ways, shots) run."""

    method: str = "protonet"
    method_options: Dict[str, Any] = field(default_factory=dict)
    conv: Dict[str, Any] = field(default_factory=dict)  # overrides the method's default conv spec
    backbone: str = "cnn4"
    backbone_options: Dict[str, Any] = field(default_factory=dict)
    dataset: str = "glyphs"
    data_root: Optional[str] = None
    dataset_options: Dict[str, Any] = field(default_factory=dict)
    ways: int = 5
    shots: int = 5
    image_size: int = 84
    profile: str = "quick"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    compile: str = "auto"  # torch.compile: auto (CUDA only), on, off (fewshot_nsl.compiling)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of training, validation and evaluation (fewshot_nsl.precision)
    episodes_file: Optional[str] = None
    results_dir: str = "results"
    cache_dir: Optional[str] = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    episodic: EpisodicConfig = field(default_factory=EpisodicConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, omit: Sequence[str] = ()) -> str:
        """16-hex hash of everything that can change a result (not device, compilation or output paths).

        Args:
            omit: further top-level sections to leave out, e.g. ``("episodic",)`` for a method
                that has no episodic stage (see :func:`fewshot_nsl.runner.config_hash`).
        """
        d = self.to_dict()
        for k in ("device", "compile", "results_dir", "cache_dir", "data_root", "episodes_file", *omit):
            d.pop(k)
        d["eval"].pop("batch_episodes", None)  # how the evaluation is run, not what it computes
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _validate_numbers(self) -> None:
        """Every numeric setting in range (before any folder is created): counts and intervals
        at least 1, learning rates positive and finite, decays and momenta non-negative, the seed
        within what every RNG accepts (numpy: ``0 <= seed < 2**63``)."""
        def at_least(name: str, value: Optional[int], low: int = 1, optional: bool = False) -> None:
            if value is None and optional:
                return
            if value is None or value < low:
                raise ConfigError(f"{name} must be at least {low}{' (or null)' if optional else ''}, got {value}")

        def positive(name: str, value: float) -> None:
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")

        def non_negative(name: str, value: float) -> None:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value}")

        check_seed(self.seed, "seed")
        pre, epi, ev = self.pretrain, self.episodic, self.eval
        at_least("pretrain.epochs", pre.epochs)
        at_least("pretrain.batch_size", pre.batch_size)
        at_least("pretrain.max_steps", pre.max_steps, optional=True)
        positive("pretrain.lr", pre.lr)
        non_negative("pretrain.momentum", pre.momentum)
        non_negative("pretrain.weight_decay", pre.weight_decay)
        if pre.optimizer not in PRETRAIN_OPTIMIZERS:
            raise ConfigError(f"pretrain.optimizer must be one of {', '.join(PRETRAIN_OPTIMIZERS)}, got '{pre.optimizer}'")
        if pre.schedule not in PRETRAIN_SCHEDULES:
            raise ConfigError(f"pretrain.schedule must be one of {', '.join(PRETRAIN_SCHEDULES)}, got '{pre.schedule}'")
        from .validation import ValidationSettings, check_settings

        check_settings("pretrain", ValidationSettings.of(pre))
        check_settings("episodic", ValidationSettings.of(epi))
        at_least("episodic.steps", epi.steps)
        at_least("episodic.meta_batch", epi.meta_batch)
        positive("episodic.lr", epi.lr)
        at_least("episodic.ways", epi.ways, 2, optional=True)
        at_least("episodic.shots", epi.shots, optional=True)
        at_least("episodic.queries", epi.queries)
        at_least("episodic.checkpoint_every", epi.checkpoint_every)
        at_least("eval.episodes", ev.episodes)
        at_least("eval.queries", ev.queries)
        if ev.split not in ("train", "val", "test"):
            raise ConfigError(f"eval.split must be train, val or test, got '{ev.split}'")
        if ev.batch_episodes != "auto" and (isinstance(ev.batch_episodes, bool) or not isinstance(ev.batch_episodes, int)
                                            or ev.batch_episodes < 1):
            raise ConfigError(f"eval.batch_episodes must be auto or a whole number of at least 1 (1: one episode at a "
                              f"time), got {ev.batch_episodes!r}")

    def _validate_options(self) -> None:
        """Option dicts hold option names only, none that the harness passes itself (``dataset_options.
        image_size`` would reach the dataset twice), and the ``conv`` section is a valid (partial) conv
        spec (:func:`fewshot_nsl.nn.factory.check_conv_spec`; the method's default spec under it is
        checked with the method, :func:`check_buildable`)."""
        for section in ("dataset_options", "method_options", "backbone_options", "conv"):
            for key in getattr(self, section):
                if not isinstance(key, str) or not key.isidentifier():
                    raise ConfigError(f"{section} key {key!r} is not an option name; use names like "
                                      f"{section}.some_option")
        for section, reserved in RESERVED_OPTIONS.items():
            for key in sorted(set(getattr(self, section)) & set(reserved)):
                raise ConfigError(f"{section}.{key} conflicts with the run's own {key}, which the suite passes "
                                  f"itself; remove {section}.{key} and set it with {reserved[key]}")
        from .nn.factory import check_conv_spec

        check_conv_spec(self.conv, partial=True)

    def validate(self) -> None:
        """Refuse impossible settings before anything runs."""
        if self.ways < 2:
            raise ConfigError(f"--ways must be at least 2, got {self.ways}")
        if self.shots < 1:
            raise ConfigError(f"--shots must be at least 1, got {self.shots}")
        if self.eval.queries < 1 or self.eval.episodes < 1:
            raise ConfigError("eval.queries and eval.episodes must be at least 1")
        if self.episodic.lr_step is not None and self.episodic.lr_step < 1:
            raise ConfigError(f"episodic.lr_step must be at least 1 (or null), got {self.episodic.lr_step}")
        if self.episodic.grad_clip is not None and not self.episodic.grad_clip > 0:
            raise ConfigError(f"episodic.grad_clip must be positive (or null), got {self.episodic.grad_clip}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {self.image_size}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size {self.image_size} is more than {MAX_IMAGE_SIZE}: a store of that size does not "
                              f"fit in memory (Mini-ImageNet at 84 px is 1.3 GB; it grows with the square); use 84")
        self._validate_numbers()
        self._validate_options()
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile '{self.profile}'; use one of {', '.join(PROFILES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device '{self.device}'; use auto, cpu or cuda")
        from .precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}'; use one of {', '.join(PRECISIONS)}")
        from .compiling import normalise_setting

        self.compile = normalise_setting(self.compile)


# ----------------------------------------------------------------------------- loading
def _check_type(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:  # a setting of several forms (e.g. eval.batch_episodes: auto or a number), checked by validate
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        whole = tp is int and isinstance(value, float) and value.is_integer()
        hint = f" (write a whole number without a point or exponent: {int(value)})" if whole else ""
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}{hint}")
    return value


def _from_dict(cls: Any, data: Dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)} in {where}; accepted: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    if cls is RunConfig and isinstance(data.get("compile"), bool):  # YAML 1.1 reads a bare on/off as a boolean
        data = {**data, "compile": "on" if data["compile"] else "off"}
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; ``override`` wins. Option dicts merge key by key too."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_document(path: Path, what: str) -> Any:
    """One YAML document of a file, parsed with :class:`ConfigLoader`, with the checks of
    :mod:`fewshot_nsl.safe_io` (a regular file of at most 64 MiB, UTF-8, nested at most 64 levels,
    expanding to at most a million values).

    Raises:
        ConfigError: one line naming the file.
    """
    from .safe_io import check_shape, read_document

    text = read_document(path, what)
    try:
        obj = parse_yaml(text)
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to read; simplify it") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what} {path} is not valid YAML ({first}); fix its syntax") from None
    return check_shape(obj, path, what)


def load_yaml(path: Path, _chain: Sequence[Path] = (), what: str = "config file",
              flag: str = "--config") -> Dict[str, Any]:
    """Read a YAML mapping, resolving ``include:`` (a path or list of paths, relative to the file).

    The file must be a regular file of at most 64 MiB, nested at most 64 levels and expanding to
    at most a million values (:mod:`fewshot_nsl.safe_io`); an ``include:`` cycle (a file that
    includes itself, directly or not) and include chains deeper than 16 files are refused.
    ``what`` and ``flag`` name the file in messages (``grid file``, ``--grid``).
    """
    path = Path(path)
    try:
        missing = not path.exists() and not path.is_symlink()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise ConfigError(f"{what} {str(path)[:60]}... cannot be read ({one_line(exc, 80)}); check the path") from None
    if missing:
        raise ConfigError(f"{what} {path} does not exist; check the path given to {flag}")
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise ConfigError(f"{what} {path} includes itself ({cycle}); remove the include cycle")
    if len(_chain) >= 16:
        raise ConfigError(f"{what} {path}: includes nested more than 16 files deep; flatten them")
    data = read_yaml_document(path, what) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must contain a mapping of keys to values")
    includes = data.pop("include", [])
    if not isinstance(includes, (str, list)) or isinstance(includes, list) and not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{what} {path}: 'include' must be a file name or a list of file names")
    merged: Dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = merge(merged, load_yaml(path.parent / inc, (*_chain, real), what, flag))
    return merge(merged, data)


def method_section(methods: Any, method: str, shots: int, where: str) -> Dict[str, Any]:
    """The ``methods.<method>`` section of a profile or config file, with its per-shot part applied.

    A method section may hold ``shots: {1: {...}, 5: {...}}``: settings that apply only to runs
    with that many (evaluation) shots, merged over the rest of the section, e.g.
    ``methods: {protonet: {shots: {1: {episodic: {ways: 30}}, 5: {episodic: {ways: 20}}}}}``.

    Args:
        methods: the file's ``methods:`` value.
        method: the run's method.
        shots: the run's shots.
        where: file name for messages.

    Raises:
        ConfigError: ``methods`` or a section is not a mapping, or ``shots`` is not a mapping of
            positive integers to mappings.
    """
    if not isinstance(methods, dict):
        raise ConfigError(f"'methods' in {where} must be a mapping of method names to settings")
    section = methods.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"methods.{method} in {where} must be a mapping of settings")
    section = dict(section)
    per_shot = section.pop("shots", None)
    if per_shot is None:
        return section
    if not isinstance(per_shot, dict):
        raise ConfigError(
            f"methods.{method}.shots in {where} must map shot counts to settings, e.g. "
            f"shots: {{1: {{episodic: {{ways: 30}}}}, 5: {{episodic: {{ways: 20}}}}}}; got {per_shot!r}"
        )
    for k, v in per_shot.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"methods.{method}.shots in {where}: keys must be positive shot counts, got {k!r}")
        if not isinstance(v, dict):
            raise ConfigError(f"methods.{method}.shots.{k} in {where} must be a mapping of settings, got {v!r}")
        bad = sorted({"shots", "method", "profile"} & set(v))
        if bad:
            raise ConfigError(f"methods.{method}.shots.{k} in {where} may not set {', '.join(bad)}")
    return merge(section, per_shot.get(shots) or {})


def profile_overrides(profile: str, method: str, shots: Optional[int] = None) -> Dict[str, Any]:
    """The profile file's settings with its ``methods.<method>`` section (and that section's
    ``shots.<shots>`` part, see :func:`method_section`) applied.

    Args:
        profile: ``smoke``, ``quick`` or ``paper``.
        method: registered method name.
        shots: the run's shots (default: :attr:`RunConfig.shots`).
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; use one of {', '.join(PROFILES)}")
    path = CONFIG_DIR / "profiles" / f"{profile}.yaml"
    data = load_yaml(path)
    per_method = data.pop("methods", {}) or {}
    shots = RunConfig.shots if shots is None else shots
    return merge(data, method_section(per_method, method, shots, str(path)))


def resolve_config(cli: Dict[str, Any], config_file: Optional[str] = None) -> RunConfig:
    """Build the run config from defaults, profile, ``--config`` file and CLI values (non-None),
    validated (:meth:`RunConfig.validate`) and checked buildable (:func:`check_buildable`: the
    method and its options are registered, the conv spec and backbone options are valid, the image
    size is at least the backbone's minimum), so a bad config is one line before anything runs.

    Args:
        cli: flat or nested overrides from the command line, e.g. ``{"method": "protonet", "shots": 1}``.
        config_file: optional YAML file.
    """
    file_data = load_yaml(Path(config_file)) if config_file else {}
    file_methods = file_data.pop("methods", {}) or {}
    cli = {k: v for k, v in cli.items() if v is not None}
    profile = cli.get("profile") or file_data.get("profile") or "quick"
    method = cli.get("method") or file_data.get("method") or RunConfig.method
    shots = cli.get("shots") or file_data.get("shots") or RunConfig.shots
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise ConfigError(f"{config_file or 'config'}.shots must be int, got {shots!r}")
    data = merge(profile_overrides(profile, method, shots), file_data)
    data = merge(data, method_section(file_methods, method, shots, config_file or "config"))
    data = merge(data, cli)
    data["profile"] = profile
    data["method"] = method
    cfg = _from_dict(RunConfig, data, config_file or "config")
    cfg.validate()
    check_buildable(cfg)
    return cfg


def check_buildable(cfg: RunConfig) -> None:
    """Unknown backbone, method option or backbone option, an invalid conv spec, backbone options
    the backbone cannot be built with, or an image size too small for the backbone: a one-line
    error before anything is loaded, trained or written. Part of :func:`resolve_config`.

    The conv spec checked is the one the run builds: the method's ``default_conv`` with the
    config's ``conv`` over it (:func:`fewshot_nsl.inputs.conv_spec_of`); a ``plain`` one builds
    ``nn.Conv2d`` and ignores the default's other options, as :func:`fewshot_nsl.inputs.build_method`,
    but options the config itself sets for plain convs (``conv: {structure: uns}`` without a kind,
    for a method with plain convs) are refused rather than ignored.
    """
    from .backbones import check_image_size
    from .inputs import conv_spec_of
    from .nn.factory import check_conv_spec
    from .registry import BACKBONES, check_kwargs, get_method_class, list_backbones

    list_backbones()
    method_cls = get_method_class(cfg.method)
    check_kwargs(method_cls, cfg.method_options, f"method '{cfg.method}'")
    check_kwargs(BACKBONES.get(cfg.backbone), cfg.backbone_options, f"backbone '{cfg.backbone}'")
    spec = conv_spec_of(cfg)
    ignored = sorted(set(cfg.conv) - {"kind"})
    if spec.get("kind", "plain") == "plain" and ignored:
        raise ConfigError(f"conv sets {', '.join(ignored)}, but method {cfg.method} builds plain convs (conv kind "
                          f"plain), which take no options; add conv.kind (static or dynamic) or drop conv.{ignored[0]}")
    if spec.get("kind", "plain") != "plain":
        try:
            check_conv_spec(spec)
        except ConfigError as exc:
            default = getattr(method_cls, "default_conv", None)
            if not default:
                raise
            raise ConfigError(f"{exc} (the conv spec is method {cfg.method}'s default {default} with the config's "
                              f"conv {cfg.conv} over it)") from None
    check_image_size(cfg.backbone, cfg.backbone_options, cfg.image_size)


#: Keys ``--set`` refuses: they choose which runs a command makes; their flags do that.
CELL_KEYS = {"method": "--method", "backbone": "--backbone", "shots": "--shots"}


def parse_set_options(items: Sequence[str], where: str = "--set") -> Dict[str, Any]:
    """``--set KEY=VALUE`` options -> a nested override dict, checked like a config file.

    Args:
        items: ``["episodic.steps=10", "method_options.inner_lr=0.05"]``; later items win.
        where: name used in messages (``unknown config key(s) stepz in --set.episodic; ...``).

    Returns:
        ``{"episodic": {"steps": 10}, "method_options": {"inner_lr": 0.05}}``.

    Raises:
        ConfigError: not ``KEY=VALUE``, a value that is not YAML, a key that is unknown, of the
            wrong type, or set both as a value and as a section, or a key of :data:`CELL_KEYS`.
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(p.isidentifier() for p in parts):
            raise ConfigError(f"{where} expects KEY=VALUE with a dotted key (e.g. episodic.steps=10), got '{item}'")
        if parts[0] in CELL_KEYS:
            raise ConfigError(f"{where} {item}: use {CELL_KEYS[parts[0]]} (it chooses the runs), not {where}")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{where} {item}: the value is not valid YAML ({first}); quote it") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where} {item}: {'.'.join(parts[:i + 1])} was set to a value, not a section")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"{where} {item}: {key} has keys set by another {where}; it is a section")
        node[parts[-1]] = value
    check_overrides(out, where)
    return out


def check_overrides(data: Dict[str, Any], where: str) -> None:
    """Refuse unknown keys and wrong types in a (partial, nested) override dict, with the same
    one-line messages as a config file (``unknown config key(s) ... in <where>; accepted: ...``)."""
    _from_dict(RunConfig, data, where)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (:class:`ConfigDumper`: it reads back as the same config)."""
    Path(path).write_text(yaml.dump(cfg.to_dict(), Dumper=ConfigDumper, sort_keys=False))
