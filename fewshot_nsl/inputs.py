"""The inputs of a run: its dataset store, fixed episode list, method (with its backbone and conv
spec) and training stages, checked against each other before anything trains."""
from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .config import RunConfig
from .data.episodes import (
    EpisodeList,
    check_episodes_match_store,
    default_episode_path,
    episode_list_for_store,
)
from .data.store import ImageStore, check_min_images
from .errors import ConfigError, FewShotError, MethodError
from .methods.base import FewShotMethod
from .registry import check_kwargs, create_backbone, create_dataset, get_method_class

TRAINING_STAGES = ("pretrain", "episodic")
#: Draws of test images per distinct image above which the episodes of a run are said to reuse their
#: images heavily: Mini-ImageNet's 600 5-way 5-shot 15-query episodes draw 60,000 of 12,000 images (5x),
#: glyphs' 60,000 of 1,600 (38x); 600 episodes from 6 classes x 20 images draw 60,000 of 120 (500x).
MAX_DRAWS_PER_IMAGE = 100


class SuiteWarning(UserWarning):
    """A warning of the suite meant for the user verbatim (the command line shows it as one ``warning:`` line)."""


class SmallSplitWarning(SuiteWarning):
    """The evaluated split holds far fewer distinct images than the episodes draw."""


# ----------------------------------------------------------------------------- inputs
def load_store(cfg: RunConfig) -> ImageStore:
    """Create the dataset store (cached) with the run's image size."""
    from .registry import DATASETS

    # the user's options first: an unknown one lists those a user may set, not the ones the harness passes itself
    check_kwargs(DATASETS.get(cfg.dataset), cfg.dataset_options, f"dataset '{cfg.dataset}'", harness_args=None)
    return create_dataset(
        cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, cache_dir=_stores_dir(cfg), **cfg.dataset_options
    )


def store_key(cfg: RunConfig) -> str:
    """What determines :func:`load_store`'s result (to share one store between cells)."""
    return json.dumps([cfg.dataset, cfg.data_root, cfg.image_size, _stores_dir(cfg), cfg.dataset_options],
                      sort_keys=True, default=str)


def _stores_dir(cfg: RunConfig) -> Optional[str]:
    return str(Path(cfg.cache_dir) / "stores") if cfg.cache_dir else None


def path_name(value: object, what: str) -> str:
    """``value`` as text that can be part of one folder name: no path separator (``/`` or ``\\``),
    no control character (NUL, newline ...), not empty, not ``.`` or ``..``.

    Names are validated when they are registered (:mod:`fewshot_nsl.registry`); this check keeps
    run and episode folders inside the results folder whatever a name holds.

    Raises:
        ConfigError: one line naming the bad name.
    """
    text = str(value)
    bad = sorted({c for c in text if c in "/\\" or unicodedata.category(c).startswith("C")})
    if bad or text in ("", ".", ".."):
        why = f"it contains {', '.join(repr(c) for c in bad)}" if bad else "it is empty or a dot name"
        raise ConfigError(f"{what} name {text!r} cannot be part of a run folder name ({why}); use a name of letters, "
                          f"digits, '_', '.' and '-'")
    return text


def check_episode_count(cfg: RunConfig, episodes: EpisodeList) -> None:
    """``eval.episodes`` must not ask for more episodes than the list holds (never silently capped).

    Raises:
        ConfigError: one line naming the list, its length and the fixes.
    """
    n = len(episodes)
    if cfg.eval.episodes > n:
        where = getattr(episodes, "path", None) or cfg.episodes_file or "the episode list"
        raise ConfigError(
            f"eval.episodes {cfg.eval.episodes} is more than the {n} episodes of episode list {where}; pass "
            f"--n-episodes {n} or fewer, or a list of {cfg.eval.episodes} or more episodes with --episodes FILE "
            f"(made with fewshot_nsl.data.episodes.episode_list_for_store(...).save(FILE); --make-episodes "
            f"regenerates the committed 600-episode lists)"
        )


def load_episodes(cfg: RunConfig, store: ImageStore) -> EpisodeList:
    """The fixed test episode list: ``--episodes FILE``, the committed list, or one generated once."""
    q = cfg.eval.queries
    if cfg.episodes_file:
        lst = EpisodeList.load(Path(cfg.episodes_file))
    else:
        path = default_episode_path(path_name(store.name, "dataset"), cfg.eval.split, cfg.ways, cfg.shots, q)
        if not path.is_file():
            # No committed list for this dataset/setting: generate one from seed 0 once and keep it.
            folder = f"{path_name(store.name, 'dataset')}-{store.fingerprint()}"
            path = Path(cfg.results_dir) / "episodes" / folder / path.name
            if not path.is_file():
                check_min_images(store, cfg.eval.split, cfg.shots + q)
                episode_list_for_store(store, cfg.eval.split, cfg.ways, cfg.shots, q, 600, 0).save(path)
        lst = EpisodeList.load(path)
    if (lst.ways, lst.shots, lst.queries) != (cfg.ways, cfg.shots, q):
        raise ConfigError(
            f"episode list {cfg.episodes_file} is {lst.ways}-way {lst.shots}-shot {lst.queries}-query but the run asks "
            f"for {cfg.ways}-way {cfg.shots}-shot {q}-query; pass matching --ways/--shots or another --episodes file"
        )
    if lst.split != cfg.eval.split:
        raise ConfigError(
            f"episode list {cfg.episodes_file or lst.path} is on the {lst.split} split but the run evaluates on "
            f"{cfg.eval.split} (eval.split); pass a list of that split or set eval.split: {lst.split}"
        )
    lst.path = str(path if not cfg.episodes_file else cfg.episodes_file)
    check_episodes_match_store(lst, store)
    check_episode_count(cfg, lst)
    return lst


def build_method(cfg: RunConfig) -> FewShotMethod:
    """Backbone (with the method's conv spec, overridden by ``cfg.conv``) and method."""
    method_cls = get_method_class(cfg.method)
    check_kwargs(method_cls, cfg.method_options, f"method '{cfg.method}'")
    conv_spec = conv_spec_of(cfg)
    conv_layer = None
    if conv_spec and conv_spec.get("kind", "plain") != "plain":
        from .nn import make_conv_factory

        conv_layer = make_conv_factory(**conv_spec)
    backbone = create_backbone(cfg.backbone, conv_layer=conv_layer, **cfg.backbone_options)
    try:
        return method_cls(backbone=backbone, image_size=cfg.image_size, **cfg.method_options)
    except FewShotError:
        raise
    except Exception as exc:  # the method's own constructor (a plugin's, or an option of the wrong type)
        msg = " ".join(str(exc).split())[:200]
        raise MethodError(f"method {cfg.method} could not be built with method_options {cfg.method_options or {}}: "
                          f"{type(exc).__name__}: {msg}; check the options' values and types (--list --method "
                          f"{cfg.method} lists them) or the method's __init__") from exc


def stages_of(cfg: RunConfig) -> Tuple[str, ...]:
    """Training stages of this run (the method's, given its options).

    Raises:
        ConfigError: the method gives its stages as one string (``training_stages = ("episodic")``, a missing
            comma), which would otherwise read as one stage per letter.
    """
    stages = get_method_class(cfg.method).stages(cfg.method_options)
    if isinstance(stages, str):
        raise ConfigError(f"method {cfg.method}: training_stages must be a tuple of stage names, got the string "
                          f"{stages!r}; write ({stages!r},) with the comma")
    return tuple(stages)


def conv_spec_of(cfg: RunConfig) -> Dict[str, Any]:
    method_cls = get_method_class(cfg.method)
    return {**method_cls.default_conv, **cfg.conv}


def validate_against_store(cfg: RunConfig, store: ImageStore) -> None:
    """Impossible ways/shots fail here, before any training."""
    n_test = len(store.classes_in_split(cfg.eval.split))
    if cfg.ways > n_test:
        raise ConfigError(
            f"--ways {cfg.ways} is more than the {n_test} {cfg.eval.split} classes of {store.name}; lower --ways"
        )
    check_min_images(store, cfg.eval.split, cfg.shots + cfg.eval.queries)
    if "episodic" in stages_of(cfg):
        ways = cfg.episodic.ways or cfg.ways
        n_train = len(store.classes_in_split("train"))
        if ways > n_train:
            raise ConfigError(f"training ways {ways} exceed the {n_train} base classes of {store.name}; lower --ways")
        check_min_images(store, "train", (cfg.episodic.shots or cfg.shots) + cfg.episodic.queries)
    warn_small_split(cfg, store)


def warn_small_split(cfg: RunConfig, store: ImageStore) -> None:
    """Warn (:class:`SmallSplitWarning`, once per message) when the evaluated episodes draw each
    image of the split more than :data:`MAX_DRAWS_PER_IMAGE` times on average (e.g. 600 5-way
    5-shot 15-query episodes from 6 classes x 20 images: 60,000 draws of 120 images): the episodes
    then overlap so much that they are far from independent, and the CI, which assumes independent
    episodes, is too narrow."""
    split = cfg.eval.split
    classes = store.classes_in_split(split)
    distinct = int(np.isin(store.labels, classes).sum())
    draws = int(cfg.eval.episodes) * int(cfg.ways) * (int(cfg.shots) + int(cfg.eval.queries))
    if distinct and draws > MAX_DRAWS_PER_IMAGE * distinct:
        warnings.warn(
            f"the {split} split of {store.name} has {distinct} distinct images ({len(classes)} classes) but "
            f"{cfg.eval.episodes} episodes of {cfg.ways}-way {cfg.shots}-shot {cfg.eval.queries}-query draw {draws:,} "
            f"(each image about {draws / distinct:.0f} times): the episodes overlap heavily, so the 95% CI (which "
            f"assumes independent episodes) is too narrow; add {split} images or classes, or evaluate fewer episodes "
            f"(--n-episodes)", SmallSplitWarning, stacklevel=2)
