"""Builders of hostile and broken inputs for the catalogue in ``test_hostile_catalogue.py``.

Each builder writes its input under ``tmp`` and returns the extra command-line arguments that
point the real CLI at it (plus, where there is one, a check to run after the CLI has refused it).
The dataset writers are the ones ``test_formats.py`` uses, so every format is written the same way.
"""
from __future__ import annotations

import os
import pickle
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the writers live in test_formats.py
    sys.path.insert(0, str(TESTS))

from test_formats import (  # noqa: E402
    SPLIT,
    TINY,
    make_data,
    tiny_data,
    write_hdf5,
    write_l2l,
    write_metaoptnet,
    write_ravi,
)

REPO = TESTS.parent
TINY_PLUGIN = str(TESTS / "plugins")
FAULTY_PLUGINS = str(TESTS / "faulty_plugins")
TINY_ARGS = ["--plugins", TINY_PLUGIN, "--dataset", "tiny", "--image-size", "16"]

Built = Tuple[List[str], Optional[Callable[[], None]]]


@dataclass
class Case:
    """One hostile or broken input.

    Attributes:
        id: test id.
        what: the input, in words (for docs/robustness.md).
        build: writes the input under a folder, returns ``(cli args, post-check or None)``.
        fragments: what the single error line must contain.
        code: expected exit status (2: bad input; 3: out of memory; 130: interrupted).
        subprocess: also run it as a real ``python run_benchmarks.py`` process.
        writes_run: the run starts before the problem shows up, so a new run folder may appear
            (files that were there before must still be byte-identical).
    """

    id: str
    what: str
    build: Callable[[Path], Built]
    fragments: Sequence[str]
    code: int = 2
    subprocess: bool = False
    writes_run: bool = False
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def mini_args(root: Path, *extra: str) -> List[str]:
    return ["--dataset", "miniimagenet", "--data-root", str(root), *extra]


def custom_args(root: Path, *extra: str) -> List[str]:
    return ["--dataset", "custom", "--data-root", str(root), *extra]


def yaml_config(tmp: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


NONCANONICAL = "dataset_options: {allow_noncanonical_split: true}\n"


def _rewrite_pickle(path: Path, edit: Callable[[dict], None], protocol: int = 4) -> None:
    obj = pickle.loads(path.read_bytes())
    edit(obj)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


# ----------------------------------------------------------------------------- data files


HTML_PAGE = (b"\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
             b"<body>Google Drive can't scan this file for viruses.</body></html>")


def html_as_pkl(tmp: Path) -> Built:
    root = tmp / "l2l"
    root.mkdir()
    for name in ("train", "validation", "test"):
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(HTML_PAGE)
    return mini_args(root), None


def empty_pkl(tmp: Path) -> Built:
    root = write_l2l(tmp / "l2l", tiny_data())
    (root / "mini-imagenet-cache-test.pkl").write_bytes(b"")
    return mini_args(root), None


def html_as_hdf5(tmp: Path) -> Built:
    root = write_hdf5(tmp / "h5", tiny_data())
    (root / "val_data.hdf5").write_bytes(b"<html><body>Download quota exceeded</body></html>")
    return mini_args(root), None


def html_as_csv(tmp: Path) -> Built:
    root = write_ravi(tmp / "ravi", tiny_data(), ext="png")
    (root / "val.csv").write_bytes(HTML_PAGE)
    return custom_args(root), None


def truncated_pickle(tmp: Path) -> Built:
    root = write_metaoptnet(tmp / "mon", tiny_data(), py2_splits=())
    path = root / "miniImageNet_category_split_train_phase_train.pickle"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return mini_args(root), None


def truncated_hdf5(tmp: Path) -> Built:
    root = write_hdf5(tmp / "h5", tiny_data(size=84, per_class=40))
    path = root / "test_data.hdf5"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    cfg = yaml_config(tmp, NONCANONICAL)
    return mini_args(root, "--config", str(cfg)), None


def truncated_jpeg(tmp: Path) -> Built:
    root = write_ravi(tmp / "ravi", tiny_data(size=84))
    victim = sorted((root / "images").glob(f"{TINY['test'][0]}*.jpg"))[0]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    return custom_args(root), None


class _Evil:
    """Unpickling this runs ``os.system(command)`` (with a plain ``pickle.load``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_pickle(tmp: Path) -> Built:
    sentinel = tmp / "PWNED"
    root = tmp / "l2l"
    root.mkdir()
    for name in ("train", "validation", "test"):
        obj = {"image_data": _Evil(f"touch {sentinel}"), "class_dict": {}}
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(pickle.dumps(obj, protocol=2))
    # the payload really is live: a plain pickle.loads would create the sentinel
    assert b"system" in (root / "mini-imagenet-cache-train.pkl").read_bytes()

    def nothing_ran() -> None:
        assert not sentinel.exists(), "the malicious pickle ran code"

    return mini_args(root), nothing_ran


def float_images(tmp: Path) -> Built:
    root = write_l2l(tmp / "l2l", tiny_data())
    _rewrite_pickle(root / "mini-imagenet-cache-test.pkl",
                    lambda o: o.__setitem__("image_data", o["image_data"].astype(np.float32)))
    return mini_args(root), None


def grayscale_images(tmp: Path) -> Built:
    root = write_l2l(tmp / "l2l", tiny_data())
    _rewrite_pickle(root / "mini-imagenet-cache-train.pkl",
                    lambda o: o.__setitem__("image_data", o["image_data"][..., 0]))
    return mini_args(root), None


def hdf5_wrong_shape(tmp: Path) -> Built:
    data = tiny_data()
    c = TINY["val"][0]
    data["val"][c] = np.ascontiguousarray(data["val"][c][..., :1])  # (N, H, W, 1)
    return mini_args(write_hdf5(tmp / "h5", data)), None


def labels_out_of_range(tmp: Path) -> Built:
    root = write_metaoptnet(tmp / "mon", tiny_data(), py2_splits=())
    path = root / "miniImageNet_category_split_test.pickle"

    def edit(o):
        o["labels"][0] = 99

    _rewrite_pickle(path, edit, protocol=2)
    return mini_args(root), None


def index_out_of_range(tmp: Path) -> Built:
    root = write_l2l(tmp / "l2l", tiny_data())

    def edit(o):
        o["class_dict"][TINY["test"][0]][0] = 1000

    _rewrite_pickle(root / "mini-imagenet-cache-test.pkl", edit)
    return mini_args(root), None


def _ravi(tmp: Path) -> Path:
    return write_ravi(tmp / "ravi", tiny_data(), ext="png")


def duplicated_filename(tmp: Path) -> Built:
    root = _ravi(tmp)
    csv = root / "val.csv"
    good = csv.read_text()
    csv.write_text(good + good.splitlines()[1] + "\n")
    return custom_args(root), None


def duplicated_filename_across_csvs(tmp: Path) -> Built:
    root = _ravi(tmp)
    csv = root / "test.csv"
    csv.write_text(csv.read_text() + (root / "train.csv").read_text().splitlines()[1] + "\n")
    return custom_args(root), None


def class_in_two_splits(tmp: Path) -> Built:
    root = _ravi(tmp)
    moved, val_class = TINY["train"][0], TINY["val"][0]
    csv = root / "val.csv"
    csv.write_text(csv.read_text().replace(f",{val_class}", f",{moved}"))
    return custom_args(root), None


def class_in_two_split_pickles(tmp: Path) -> Built:
    data = tiny_data()
    data["val"][TINY["train"][0]] = data["train"][TINY["train"][0]]
    return mini_args(write_l2l(tmp / "l2l", data)), None


def csv_missing_image(tmp: Path) -> Built:
    root = _ravi(tmp)
    csv = root / "test.csv"
    csv.write_text(csv.read_text() + f"n0000000000000042.png,{TINY['test'][0]}\n")
    return custom_args(root), None


def non_utf8_csv(tmp: Path) -> Built:
    root = _ravi(tmp)
    csv = root / "train.csv"
    csv.write_bytes(csv.read_bytes() + "caf\xe9.png,caf\xe9\n".encode("latin1"))
    return custom_args(root), None


def csv_bad_header(tmp: Path) -> Built:
    root = _ravi(tmp)
    csv = root / "train.csv"
    csv.write_text("name;class\n" + csv.read_text())
    return custom_args(root), None


def _all_classes(per_class: int = 1, size: int = 8):
    return make_data(seed=9, per_class=per_class, size=size)


def split_missing_a_class(tmp: Path, per_class: int = 1) -> Path:
    data = _all_classes(per_class)
    del data["val"][SPLIT["val"][2]]
    return write_hdf5(tmp / "h5", data)


def wrong_class_count(tmp: Path) -> Built:
    return mini_args(split_missing_a_class(tmp)), None


def class_in_wrong_split(tmp: Path) -> Built:
    data = _all_classes()
    data["val"][SPLIT["train"][5]] = data["train"].pop(SPLIT["train"][5])
    return mini_args(write_hdf5(tmp / "h5", data)), None


def unknown_wnid(tmp: Path) -> Built:
    data = _all_classes()
    data["test"]["n99999999"] = data["test"].pop(SPLIT["test"][0])
    return mini_args(write_hdf5(tmp / "h5", data)), None


def too_few_images_per_class(tmp: Path) -> Built:
    return mini_args(write_hdf5(tmp / "h5", _all_classes(per_class=3))), None


def empty_directory(tmp: Path) -> Built:
    root = tmp / "empty"
    root.mkdir()
    return mini_args(root), None


def unknown_layout(tmp: Path) -> Built:
    root = tmp / "junk"
    root.mkdir()
    (root / "readme.txt").write_text("the images are elsewhere")
    return mini_args(root), None


def two_formats_in_one_root(tmp: Path) -> Built:
    root = write_l2l(tmp / "both", tiny_data())
    write_hdf5(root, tiny_data())
    return mini_args(root), None


def nested_root(tmp: Path) -> Built:
    write_hdf5(tmp / "outer" / "mini-imagenet", tiny_data())
    return mini_args(tmp / "outer"), None


def loose_image_in_folders(tmp: Path) -> Built:
    from test_formats import write_folders

    root = write_folders(tmp / "folders", tiny_data())
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "test" / "loose.png")
    return custom_args(root), None


def missing_split_file(tmp: Path) -> Built:
    root = write_metaoptnet(tmp / "mon", tiny_data())
    (root / "miniImageNet_category_split_val.pickle").unlink()
    return mini_args(root), None


def wrong_data_root(tmp: Path) -> Built:
    return mini_args(tmp / "no" / "such" / "folder"), None


def no_data_root(tmp: Path) -> Built:
    return ["--dataset", "miniimagenet"], None


# ----------------------------------------------------------------------------- configs and options


def yaml_unknown_key(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "imagesize: 32\n")), *TINY_ARGS], None


def yaml_unknown_nested_key(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "pretrain: {epoch: 3}\n")), *TINY_ARGS], None


def yaml_wrong_type(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "shots: five\n")), *TINY_ARGS], None


def yaml_wrong_nested_type(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "eval: {episodes: [1, 2]}\n")), *TINY_ARGS], None


def yaml_invalid(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "ways: [5\n")), *TINY_ARGS], None


def yaml_missing(tmp: Path) -> Built:
    return ["--config", str(tmp / "nowhere.yaml"), *TINY_ARGS], None


def unknown_method_option(tmp: Path) -> Built:
    return ["--config", str(yaml_config(tmp, "method_options: {temprature: 3}\n")), *TINY_ARGS], None


def unknown_dataset_option(tmp: Path) -> Built:
    root = write_hdf5(tmp / "h5", tiny_data())
    cfg = yaml_config(tmp, "dataset_options: {allow_noncanonical_splits: true}\n")
    return mini_args(root, "--config", str(cfg)), None


BROKEN_PLUGIN = "raise RuntimeError('boom: cannot import my_lab_secret_sauce')\n"


def _plugin_folder(folder: Path, file_name: str, text: str) -> Path:
    """``folder`` (created) holding one plugin file."""
    folder.mkdir()
    (folder / file_name).write_text(text)
    return folder


def broken_plugin(tmp: Path) -> Built:
    plugins = _plugin_folder(tmp / "my_plugins", "my_method.py", BROKEN_PLUGIN)
    return ["--plugins", str(plugins), "--method", "my_method", *TINY_ARGS], None


def missing_plugin_folder(tmp: Path) -> Built:
    return ["--plugins", str(tmp / "no_plugins_here"), *TINY_ARGS], None


def unknown_method(tmp: Path) -> Built:
    return ["--method", "protonett", *TINY_ARGS], None


def unknown_backbone(tmp: Path) -> Built:
    return ["--backbone", "resnet99", *TINY_ARGS], None


def unknown_dataset(tmp: Path) -> Built:
    return ["--dataset", "imagenet21k"], None


def unknown_device(tmp: Path) -> Built:
    return ["--device", "tpu", *TINY_ARGS], None


def unknown_flag(tmp: Path) -> Built:
    return ["--epochs", "3", *TINY_ARGS], None


def bad_choice(tmp: Path) -> Built:
    return [*TINY_ARGS, "--profile", "huge"], None


def bad_int(tmp: Path) -> Built:
    return [*TINY_ARGS, "--shots", "five"], None


def too_many_ways(tmp: Path) -> Built:
    return [*TINY_ARGS, "--ways", "9"], None


def too_few_ways(tmp: Path) -> Built:
    return [*TINY_ARGS, "--ways", "1"], None


def too_many_shots(tmp: Path) -> Built:
    return [*TINY_ARGS, "--shots", "40"], None


def zero_shots(tmp: Path) -> Built:
    return [*TINY_ARGS, "--shots", "0"], None


def missing_episode_list(tmp: Path) -> Built:
    return [*TINY_ARGS, "--episodes", str(tmp / "eps.json")], None


def broken_episode_list(tmp: Path) -> Built:
    path = tmp / "eps.json"
    path.write_text('{"episodes": [')
    return [*TINY_ARGS, "--episodes", str(path)], None


def seed_and_seeds(tmp: Path) -> Built:
    return [*TINY_ARGS, "--seed", "1", "--seeds", "0,1"], None


def zero_threads(tmp: Path) -> Built:
    return [*TINY_ARGS, "--threads", "0"], None


def ray_address_without_ray(tmp: Path) -> Built:
    return [*TINY_ARGS, "--ray-address", "auto"], None


# ----------------------------------------------------------------------------- issue 11/12: plugins, --set, output

DUPLICATE_PLUGIN = '''
import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method

@register_method("{name}")
class Impostor(FewShotMethod):
    """A plugin that registers a built-in's name."""
    training_stages = ()
    def fit_support(self, x, y):
        pass
    def forward(self, x):
        return torch.zeros(len(x), 5)
'''


def plugin_named_like_a_builtin(tmp: Path) -> Built:
    """``protonet.py`` in --plugins registering ``protonet`` (used to replace the built-in silently)."""
    plugins = _plugin_folder(tmp / "lab_plugins", "protonet.py", DUPLICATE_PLUGIN.format(name="protonet"))
    return ["--plugins", str(plugins), "--method", "protonet", *TINY_ARGS], None


def plugin_registers_a_builtin_name(tmp: Path) -> Built:
    """A plugin file with another name registering a built-in's name (``maml``)."""
    plugins = _plugin_folder(tmp / "lab_plugins", "my_meta_learner.py", DUPLICATE_PLUGIN.format(name="maml"))
    return ["--plugins", str(plugins), "--method", "maml", *TINY_ARGS], None


def set_unknown_key(tmp: Path) -> Built:
    return [*TINY_ARGS, "--set", "episodic.stepz=3"], None


def set_wrong_type(tmp: Path) -> Built:
    return [*TINY_ARGS, "--set", "episodic.steps=ten"], None


def set_not_key_value(tmp: Path) -> Built:
    return [*TINY_ARGS, "--set", "episodic.steps"], None


def set_cell_key(tmp: Path) -> Built:
    return [*TINY_ARGS, "--set", "method=maml"], None


def log_file_unwritable(tmp: Path) -> Built:
    (tmp / "not_a_folder").write_text("a file where the log's folder should be\n")
    return [*TINY_ARGS, "--log-file", str(tmp / "not_a_folder" / "run.log")], None


def json_with_report(tmp: Path) -> Built:
    return [*TINY_ARGS, "--report", "--json"], None


# ----------------------------------------------------------------------------- run-time failures


def nan_training_loss(tmp: Path) -> Built:
    cfg = yaml_config(tmp, """\
        method_options: {nan_from_call: 4}
        episodic: {steps: 6, checkpoint_every: 2, queries: 3}
        eval: {episodes: 4, queries: 3}
    """)
    return ["--plugins", FAULTY_PLUGINS, "--method", "nan_after_steps", "--shots", "2", "--config", str(cfg),
            *TINY_ARGS], None


def _nan_run_checkpoint(run: Callable[[], None], results: Path) -> Path:
    """Run the NaN run once (NaN at step 3 leaves ``checkpoint.pt`` of step 2); its checkpoint."""
    run()
    (ckpt,) = (results / "runs").glob("*nan_after_steps*/checkpoint.pt")
    return ckpt


def tampered_checkpoint(tmp: Path) -> Built:
    """The NaN run's command; ``prepare_tampered_checkpoint`` leaves a pickle payload as its checkpoint."""
    return nan_training_loss(tmp)


def prepare_tampered_checkpoint(run: Callable[[], None], results: Path, tmp: Path) -> Callable[[], None]:
    """Run once (NaN at step 3 leaves ``checkpoint.pt`` of step 2), then swap in a checkpoint whose
    unpickling would call ``os.system``; returns the check that nothing ran."""
    import torch

    ckpt = _nan_run_checkpoint(run, results)
    sentinel = tmp / "PWNED"
    torch.save({"step": 2, "model": _Evil(f"touch {sentinel}")}, ckpt)

    def nothing_ran() -> None:
        assert not sentinel.exists(), "the tampered checkpoint ran code"

    return nothing_ran


def truncated_checkpoint(tmp: Path) -> Built:
    """The NaN run's command; ``prepare_truncated_checkpoint`` cuts its checkpoint in half."""
    return nan_training_loss(tmp)


def prepare_truncated_checkpoint(run: Callable[[], None], results: Path, tmp: Path) -> Callable[[], None]:
    """Run once (leaves ``checkpoint.pt`` of step 2), then truncate it as a full disk or a copy cut short would."""
    ckpt = _nan_run_checkpoint(run, results)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    return lambda: None


# ----------------------------------------------------------------------------- issue 11: identity, episodes, paths, settings, outputs


def _tiny_list(tmp: Path, mutate: Callable[[dict], None], name: str = "eps.json", split: str = "test") -> Path:
    """A 5-way 1-shot 3-query list for the tiny dataset, edited by ``mutate`` (its JSON form),
    with the checksum recomputed: only the validation can catch it."""
    import json

    from fewshot_nsl.data.episodes import Episode, EpisodeList, episode_list_for_store
    from tiny_dataset_access import make_tiny_store

    lst = episode_list_for_store(make_tiny_store(), split, 5, 1, 3, 6, 0)
    obj = {"dataset": lst.dataset, "split": lst.split, "ways": 5, "shots": 1, "queries": 3, "seed": 0,
           "episodes": [e.to_json() for e in lst.episodes]}
    mutate(obj)
    try:
        eps = [Episode.from_json(e) for e in obj["episodes"]]
        obj["sha256"] = EpisodeList(obj["dataset"], obj["split"], obj["ways"], obj["shots"], obj["queries"], 0, eps).sha256
    except Exception:  # the shape is broken beyond hashing: leave the checksum out
        pass
    path = tmp / name
    path.write_text(json.dumps(obj))
    return path


def _episode_args(path: Path) -> List[str]:
    return [*TINY_ARGS, "--episodes", str(path), "--shots", "1", "--queries", "3", "--method", "nearest_neighbor"]


def episodes_support_query_overlap(tmp: Path) -> Built:
    def mutate(o):
        o["episodes"][2][2][1][0] = o["episodes"][2][1][1][0]
    return _episode_args(_tiny_list(tmp, mutate)), None


def episodes_class_twice(tmp: Path) -> Built:
    def mutate(o):
        o["episodes"][1][0][3] = o["episodes"][1][0][0]
    return _episode_args(_tiny_list(tmp, mutate)), None


def episodes_fewer_ways(tmp: Path) -> Built:
    def mutate(o):
        for part in o["episodes"][0]:
            del part[-1]
    return _episode_args(_tiny_list(tmp, mutate)), None


def episodes_ragged_shots(tmp: Path) -> Built:
    def mutate(o):
        o["episodes"][4][1][2].append(29)
    return _episode_args(_tiny_list(tmp, mutate)), None


def episodes_float_rank(tmp: Path) -> Built:
    def mutate(o):
        o["episodes"][3][2][0][1] = 2.5
    return _episode_args(_tiny_list(tmp, mutate)), None


def episodes_other_split(tmp: Path) -> Built:
    return _episode_args(_tiny_list(tmp, lambda o: None, split="val")), None


def episodes_fifo(tmp: Path) -> Built:
    path = tmp / "eps.json"
    os.mkfifo(path)
    return _episode_args(path), None


def episodes_deeply_nested(tmp: Path) -> Built:
    path = tmp / "eps.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return _episode_args(path), None


def yaml_include_cycle(tmp: Path) -> Built:
    (tmp / "a.yaml").write_text("include: b.yaml\nseed: 1\n")
    (tmp / "b.yaml").write_text("include: a.yaml\n")
    return [*TINY_ARGS, "--config", str(tmp / "a.yaml")], None


def yaml_alias_bomb(tmp: Path) -> Built:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("method_options: {bomb: *a9}")
    path = tmp / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return [*TINY_ARGS, "--config", str(path)], None


def _small_images():
    """5 classes of 4 flat 8x8 images per split (train, test): ``(split, class name, rank, PIL image)``."""
    from PIL import Image

    for split in ("train", "test"):
        for c in range(5):
            for i in range(4):
                yield split, f"{split}{c}", i, Image.new("RGB", (8, 8), (40 * c, 10 * i, 90))


def _ravi_with(tmp: Path, row: str) -> Path:
    """A Ravi-style custom dataset of :func:`_small_images` with ``row`` appended to ``test.csv``."""
    root = tmp / "custom"
    (root / "images").mkdir(parents=True)
    rows = {"train": ["filename,label"], "test": ["filename,label"]}
    for split, label, i, image in _small_images():
        name = f"{label}_{i}.png"
        image.save(root / "images" / name)
        rows[split].append(f"{name},{label}")
    rows["test"].append(row)
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def csv_absolute_path(tmp: Path) -> Built:
    outside = tmp / "outside.png"
    outside.write_bytes(b"not read")
    return custom_args(_ravi_with(tmp, f"{outside},test0")), None


def csv_parent_path(tmp: Path) -> Built:
    return custom_args(_ravi_with(tmp, "../outside.png,test0")), None


def image_symlink_loop(tmp: Path) -> Built:
    root = _ravi_with(tmp, "loop.png,test0")
    os.symlink(root / "images" / "loop.png", root / "images" / "loop.png")
    return custom_args(root), None


def image_is_fifo(tmp: Path) -> Built:
    root = _ravi_with(tmp, "pipe.png,test0")
    os.mkfifo(root / "images" / "pipe.png")
    return custom_args(root), None


def dir_symlink_loop(tmp: Path) -> Built:
    root = tmp / "folders"
    for split, label, i, image in _small_images():
        d = root / split / label
        d.mkdir(parents=True, exist_ok=True)
        image.save(d / f"{i}.png")
    os.symlink(root, root / "test" / "test0" / "again")
    return custom_args(root), None


def zero_episodic_steps(tmp: Path) -> Built:
    return [*TINY_ARGS, "--config", str(yaml_config(tmp, "episodic: {steps: 0}\n"))], None


def zero_meta_batch(tmp: Path) -> Built:
    return [*TINY_ARGS, "--config", str(yaml_config(tmp, "episodic: {meta_batch: 0}\n"))], None


def zero_checkpoint_every(tmp: Path) -> Built:
    return [*TINY_ARGS, "--config", str(yaml_config(tmp, "episodic: {checkpoint_every: 0}\n"))], None


def zero_batch_size(tmp: Path) -> Built:
    return [*TINY_ARGS, "--method", "nearest_neighbor", "--config",
            str(yaml_config(tmp, "pretrain: {batch_size: 0}\n"))], None


def zero_train_queries(tmp: Path) -> Built:
    return [*TINY_ARGS, "--config", str(yaml_config(tmp, "episodic: {queries: 0}\n"))], None


def negative_seed(tmp: Path) -> Built:
    return [*TINY_ARGS, "--seed", "-1"], None


def huge_seed(tmp: Path) -> Built:
    return [*TINY_ARGS, "--seed", str(2**64)], None


def huge_image_size(tmp: Path) -> Built:
    return [*TINY_ARGS, "--image-size", "100000"], None


def results_dir_under_a_file(tmp: Path) -> Built:
    blocker = tmp / "a_file"
    blocker.write_text("x")
    return [*TINY_ARGS, "--results-dir", str(blocker / "results")], None


def cache_dir_read_only(tmp: Path) -> Built:
    return [*TINY_ARGS, "--cache-dir", "/proc/fewshot-cache"], None


def _foreign_board(text: bytes):
    def prepare(run: Callable[[], None], results: Path, tmp: Path) -> Callable[[], None]:
        (results / "leaderboard.csv").write_bytes(text)
        return lambda: None
    return prepare


def plugin_method(name: str) -> Callable[[Path], Built]:
    def build(tmp: Path) -> Built:
        return ["--plugins", FAULTY_PLUGINS, *TINY_ARGS, "--method", name, "--shots", "1", "--queries", "3",
                "--n-episodes", "4"], None
    return build


def foreign_identity(tmp: Path) -> Built:
    """The template's command; ``prepare_foreign_identity`` edits its run's identity.json."""
    return [], None


def prepare_foreign_identity(run: Callable[[], None], results: Path, tmp: Path) -> Callable[[], None]:
    import json

    (run_dir,) = (results / "runs").iterdir()
    rec = json.loads((run_dir / "identity.json").read_text())
    rec["dataset_fingerprint"] = "0" * 16
    (run_dir / "identity.json").write_text(json.dumps(rec))
    (run_dir / "summary.json").unlink()  # so the run is not simply complete
    return lambda: None


def csv_same_file_twice(tmp: Path) -> Built:
    root = _ravi_with(tmp, "alias.png,test1")
    os.symlink(root / "images" / "test0_0.png", root / "images" / "alias.png")
    return custom_args(root), None


def csv_dot_duplicate(tmp: Path) -> Built:
    return custom_args(_ravi_with(tmp, "./test0_0.png,test0")), None


def yaml_deeply_nested(tmp: Path) -> Built:
    path = tmp / "deep.yaml"
    path.write_text("method_options: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return [*TINY_ARGS, "--config", str(path)], None
