"""What the training loops keep between steps and runs: device and seeds, checkpoints, host RNG states,
and the key of the pretraining cache (:mod:`fewshot_nsl.training` holds the loops themselves).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import RunConfig
from .data.store import ImageStore, default_cache_dir
from .errors import ConfigError, DataError, NumericalError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    return torch.device(spec)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); set torch's determinism switches.

    With ``deterministic`` (``--deterministic``): ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (an op without a deterministic kernel warns instead of aborting the run),
    ``cudnn.deterministic = True``, ``cudnn.benchmark = False`` and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (kept if the user set it; it must be set before the
    first cuBLAS call, which is why runs set it here, before any model is built). Without it the
    switches are put back to torch's defaults, so one run's choice never leaks into the next run
    of the same process. ``cudnn.benchmark`` stays off either way.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def load_checkpoint(path: Path, device: torch.device) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    A file holding anything else (tampered with) or a truncated / corrupt file ends with one
    :class:`DataError` naming the file and what to do, not a traceback.
    """
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), " ".join(str(exc).split())[:160])
        raise DataError(
            f"refusing to load {path}: it holds more than tensors ({blocked}) and may have been tampered with; "
            f"delete it and rerun (it is retrained)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot read {path} ({' '.join(str(exc).split())[:160]}): the file is truncated or corrupt; "
            f"delete it and rerun (it is retrained)"
        ) from None


def nonfinite_error(what: str) -> NumericalError:
    """The one-line error for a NaN/Inf ``what`` (a loss, named with its step)."""
    return NumericalError(f"{what} is NaN or Inf; lower the learning rate or check the data (results written so far are kept)")


def check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise nonfinite_error(what)


# ----------------------------------------------------------------------------- pretraining cache
def pretrain_key(cfg: RunConfig, store: ImageStore, conv_spec: Dict[str, Any],
                 method_cls: Optional[type] = None) -> str:
    """Hash of everything that determines the pretrained weights: dataset content, image size,
    backbone and conv config, pretraining settings, precision, seed, and the code of whatever builds the
    pretrained module (:func:`fewshot_nsl.identity.pretraining_code_hash`).

    The code rule: the built-in methods share one pretraining per (data, backbone, conv, settings,
    seed) by design (finetune, nearest_neighbor, static_nsn, meta_static_nsn, protonet or relationnet
    with ``pretrained_backbone``): their ``pretrain_module`` is the package's and their backbone is
    built by the package, so the code part is the package source plus the built-in baselines'
    source (an edit to any built-in, its ``__init__`` included, retrains the shared pretraining). The
    method's own code (its class, bases and the helpers they import, :func:`~fewshot_nsl.identity.method_code_hash`)
    is added whenever a class in its chain up to ``FewShotMethod`` can change what is trained: a
    built-in overriding ``pretrain_module``, or a plugin / notebook / third-party class whose code does
    not provably leave pretraining to the built-ins (:func:`~fewshot_nsl.identity.pretraining_neutral`);
    such a method's options join the key too, as do a built-in's ``pretraining_options`` set to other
    than their default (:func:`pretraining_options`). A backbone registered by a plugin adds its code too.

    Raises:
        RegistryError: a code file behind the key changed on disk since it was imported.
    """
    from .identity import pretraining_code_hash
    from .validation import validation_list_hash
    from .registry import BACKBONES

    factory = BACKBONES.get(cfg.backbone) if cfg.backbone in BACKBONES else None
    payload = {
        "code": pretraining_code_hash(method_cls, factory),
        "dataset": store.fingerprint(),
        "image_size": cfg.image_size,
        "backbone": cfg.backbone,
        "backbone_options": cfg.backbone_options,
        "conv": conv_spec,
        "pretrain": cfg.pretrain.__dict__,
        "precision": cfg.precision,  # pretraining runs under its autocast
        **({"validation_list": validation_list_hash(cfg, store, "pretrain")}
           if cfg.pretrain.val_every is not None else {}),  # the list its selection / early stop reads
        "seed": cfg.seed,
    }
    options = pretraining_options(cfg, method_cls)
    if options:  # only where they matter: every other key stays what it was
        payload["method_options"] = options
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretraining_options(cfg: RunConfig, method_cls: Optional[type]) -> Dict[str, Any]:
    """The method options that change what pretraining trains, for the pretraining key: all of ``cfg.method_options``
    when the method builds a pretrained module of its own (:func:`fewshot_nsl.identity.builds_pretrained_module`: a
    plugin's module may depend on any option), else those of its ``pretraining_options`` (a built-in's options that
    change the module pretraining starts from, e.g. RelationNet's ``encoder_init: sung``) set to other than their
    default. Empty for every built-in at its defaults, so the shared pretraining's key is unchanged."""
    from .identity import builds_pretrained_module

    if method_cls is None:
        return {}
    if builds_pretrained_module(method_cls):
        return dict(cfg.method_options)
    names = getattr(method_cls, "pretraining_options", ())
    if not names:
        return {}
    defaults = {k: p.default for k, p in inspect.signature(method_cls.__init__).parameters.items()}
    return {k: cfg.method_options[k] for k in names if k in cfg.method_options and cfg.method_options[k] != defaults.get(k)}


def pretrain_cache_path(cfg: RunConfig, store: ImageStore, conv_spec: Dict[str, Any], method_cls: type,
                        cache_dir: Optional[Path] = None) -> Path:
    """Where :func:`pretrain` keeps (or will keep) this pretraining."""
    return Path(cache_dir or default_cache_dir()) / "pretrain" / f"{pretrain_key(cfg, store, conv_spec, method_cls)}.pt"


def cached_world_size(path: Path) -> int:
    """Processes that trained the cached pretraining at ``path`` (1 when none is cached yet:
    this process will train it). Read once per version of the file (planning and every stage of
    a run ask for it)."""
    try:
        st = os.stat(path)
    except OSError:
        return 1
    return _world_size_of(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _world_size_of(path: str, mtime_ns: int, size: int) -> int:
    return int(load_checkpoint(Path(path), torch.device("cpu")).get("world_size", 1))


# ----------------------------------------------------------------------------- host RNG states
def host_rng_states() -> Dict[str, Any]:
    """numpy / python / CUDA RNG states for a checkpoint (torch's CPU state is stored apart)."""
    np_state = np.random.get_state()
    out: Dict[str, Any] = {
        "numpy_rng": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python_rng": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def set_host_rng_states(ckpt: Dict[str, Any]) -> None:
    """Restore what :func:`host_rng_states` saved (absent keys: older checkpoints, left alone)."""
    if "numpy_rng" in ckpt:
        s = json.loads(ckpt["numpy_rng"])
        np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))
    if "python_rng" in ckpt:
        v, state, gauss = json.loads(ckpt["python_rng"])
        random.setstate((v, tuple(state), gauss))
    if "cuda_rng" in ckpt and torch.cuda.is_available() and len(ckpt["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in ckpt["cuda_rng"]])
