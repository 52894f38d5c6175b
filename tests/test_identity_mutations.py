"""Issue 25, item 9: mutate a finished run's inputs one at a time; each mutation either changes the
run's identity or cannot change its number, and no later run reuses a stale result.

One tiny finished cell is the baseline: a custom dataset in the class-folder layout (written here,
PNGs without compression, so that a one-pixel edit keeps the file's size, and its modification time
is put back), a plugin method from a plugin folder whose method file imports a helper module, the
``smoke`` profile at 16 px, a few pretraining and episodic steps, 5 test episodes, all config
sections used (the method pretrains and meta-trains). Then, on the same results folder and caches
(so a stale store, pretraining, trained method or episode result *could* be reused):

* every kind of data edit: one pixel of an image (of each split), an image added, a class folder
  renamed, a file the loader does not read (``.DS_Store``, ``notes.txt``) added;
* every code file the run loaded from the plugin folder: the method file and the helper module,
  each with a constant edited that changes the number (then put back: the baseline is reused);
* the episode list: an explicit ``--episodes`` copy (same list: reused), one rank edited (refused: the
  checksum), one rank edited and the file re-hashed (a new list: a new run);
* every key of the resolved ``config.yaml`` set to another valid value (or, where it has none, refused
  in one line).

For each mutation: either the run identity (its run folder) changes, or the key is one documented as
not affecting the numbers (:data:`NOT_IN_IDENTITY`); and in every case the row the mutated run gives is
the row a fresh process on fresh caches (new results folder, new cache) computes from the same inputs,
episode by episode. The references run in one subprocess per plugin-code state
(:func:`fresh_rows`). The exhaustive sweeps (every image file, every config key) are ``slow``; a fast
subset of each runs by default.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fewshot_nsl
from fewshot_nsl.errors import FewShotError

REPO = Path(__file__).resolve().parent.parent
TEST_PLUGINS = REPO / "tests" / "plugins"

#: Config keys documented as not changing a run's numbers (README "--compile", docs/robustness.md): output
#: and cache locations, the device choice, compilation, where the data and the episode list are read from.
NOT_IN_IDENTITY = {"results_dir", "cache_dir", "device", "compile", "data_root", "episodes_file",
                   "eval.batch_episodes"}  # how many episodes per call: the same logits up to rounding

#: Splits and class counts of the dataset; 8 images of 16x16 per class.
SPLITS = {"train": 4, "val": 3, "test": 3}
PER_CLASS, SIZE = 8, 16

NAME = f"mutation_probe_{uuid.uuid4().hex[:8]}"
HELPER = f"mutation_helper_{uuid.uuid4().hex[:8]}"

METHOD_FILE = '''"""Nearest class mean on a backbone pretrained on the base classes, then meta-trained (both stages,
so every config section is used). PRIOR (helper module) and SIGN are the constants the test edits."""
import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method
from {helper} import PRIOR

SIGN = -1.0


@register_method("{name}")
class MutationProbe(FewShotMethod):
    training_stages = ("pretrain", "episodic")

    def __init__(self, backbone, image_size=84, scale=1.0):
        super().__init__(backbone, image_size)
        self.scale = scale

    def fit_support(self, support_x, support_y):
        self.means = self.class_means(self.backbone(support_x), support_y, self.num_ways(support_y))

    def forward(self, query_x):
        logits = SIGN * self.scale * self.squared_distances(self.backbone(query_x), self.means)
        bias = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
        bias[0] = PRIOR
        return logits + bias
'''
HELPER_FILE = "PRIOR = 0.0\n"


# ----------------------------------------------------------------------------- inputs
def write_dataset(root: Path) -> None:
    """``{train,val,test}/<class>/<i>.png``: each class a colour plus noise (learnable, not trivial),
    PNGs stored without compression (a pixel edit keeps the file size)."""
    rng = np.random.default_rng(0)
    for split, n in SPLITS.items():
        for c in range(n):
            folder = root / split / f"{split}_class{c}"
            folder.mkdir(parents=True)
            colour = rng.uniform(40, 215, 3)
            for i in range(PER_CLASS):
                img = np.clip(colour + rng.normal(0, 60, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png", compress_level=0)


def edit_pixel(path: Path) -> None:
    """Change one pixel of a PNG, keeping its size and modification time (a cache keyed on them is fooled)."""
    st = path.stat()
    img = np.array(Image.open(path).convert("RGB"))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(path, compress_level=0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


@dataclass
class Baseline:
    """The finished baseline cell and where its inputs live."""

    root: Path
    pristine: Path  # the dataset as first written (restored before each data mutation)
    data: Path  # the data root every in-process run reads
    plugins: Path  # the plugin folder (edited in place)
    kwargs: Dict[str, Any]  # benchmark() arguments of the baseline
    row: Dict[str, Any]

    @property
    def results(self) -> Path:
        return Path(self.kwargs["results_dir"])

    def run_dir(self, row: Dict[str, Any]) -> Path:
        """The folder of the run a call made (a row that aggregates several seeds names them all: the
        run of the call's own seed)."""
        runs = str(row["run_id"]).split(";")
        mine = [r for r in runs if f"_seed{row.get('_seed', 0)}_" in r]
        return Path(row.get("_results_dir") or self.results) / "runs" / (mine or runs)[0]

    def restore_data(self) -> None:
        shutil.rmtree(self.data)
        shutil.copytree(self.pristine, self.data)  # copy2: contents and modification times

    def restore_code(self) -> None:
        (self.plugins / "probe_method.py").write_text(METHOD_FILE.format(helper=HELPER, name=NAME))
        (self.plugins / f"{HELPER}.py").write_text(HELPER_FILE)


def base_kwargs(root: Path, data: Path, plugins: Path) -> Dict[str, Any]:
    return dict(method=NAME, plugins=[str(plugins)], dataset="custom", data_root=str(data), shots=1, ways=3,
                profile="smoke", image_size=SIZE, backbone_options={"filters": 8}, method_options={"scale": 1.0},
                pretrain={"max_steps": 4, "batch_size": 16, "epochs": 1},
                episodic={"steps": 3, "queries": 2, "checkpoint_every": 2},
                eval={"episodes": 5, "queries": 2}, results_dir=str(root / "results"), cache_dir=str(root / "cache"),
                threads=1)


def run(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """One benchmark() call in this process (the runs share results folder and caches); its row."""
    threads = torch.get_num_threads()
    try:
        rows = fewshot_nsl.benchmark(**kwargs)
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 1
    return {**rows.iloc[0].to_dict(), "_results_dir": kwargs["results_dir"], "_seed": kwargs.get("seed", 0)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Iterator[Baseline]:
    root = tmp_path_factory.mktemp("mutations")
    pristine, data, plugins = root / "pristine", root / "data", root / "probe_plugins"
    write_dataset(pristine)
    shutil.copytree(pristine, data)
    plugins.mkdir()
    b = Baseline(root, pristine, data, plugins, base_kwargs(root, data, plugins), {})
    b.restore_code()
    b.row = run(b.kwargs)
    assert int(b.row["episodes"]) == 5 and (b.run_dir(b.row) / "summary.json").is_file()
    yield b


# ----------------------------------------------------------------------------- fresh references
FRESH_WORKER = r'''
import csv, json, os, sys
from pathlib import Path

jobs = json.loads(Path(sys.argv[1]).read_text())
import fewshot_nsl
out = []
for kw in jobs:
    os.environ["FEWSHOT_NSL_CACHE"] = kw["cache_dir"]
    try:
        rows = fewshot_nsl.benchmark(**kw)
    except fewshot_nsl.errors.FewShotError as exc:
        out.append({"error": str(exc)})
        continue
    r = rows.iloc[0]
    run_dir = Path(kw["results_dir"]) / "runs" / r["run_id"]
    with open(run_dir / "episodes.csv", newline="") as f:
        by_episode = {int(x["episode"]): int(x["correct"]) for x in csv.DictReader(f)}
    summary = json.loads((run_dir / "summary.json").read_text())
    out.append({"accuracy": float(summary["accuracy"]), "episodes": int(summary["episodes"]), "run_id": r["run_id"],
                "row_accuracy": float(r["accuracy"]), "correct": [by_episode[i] for i in sorted(by_episode)]})
Path(sys.argv[2]).write_text(json.dumps(out))
'''


def fresh_rows(jobs: List[Dict[str, Any]], workdir: Path) -> List[Dict[str, Any]]:
    """What a fresh process on fresh caches computes for each job (benchmark() kwargs): one new
    results folder and one new cache per job, one subprocess per distinct plugin folder (a plugin
    folder's method name can be registered by one file per process)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    groups: Dict[str, List[int]] = {}
    for i, kw in enumerate(jobs):
        groups.setdefault(json.dumps(kw.get("plugins", [])), []).append(i)
    script = workdir / "fresh_worker.py"
    script.write_text(FRESH_WORKER)
    for g, idx in enumerate(groups.values()):
        batch = []
        for i in idx:
            fresh = workdir / f"fresh_{i}"
            batch.append({**jobs[i], "results_dir": str(fresh / "results"), "cache_dir": str(fresh / "cache")})
        spec, result = workdir / f"jobs_{g}.json", workdir / f"rows_{g}.json"
        spec.write_text(json.dumps(batch))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSHOT_NSL_CACHE": str(workdir / f"cache_{g}")}
        proc = subprocess.run([sys.executable, str(script), str(spec), str(result)], capture_output=True, text=True,
                              timeout=900, cwd=workdir, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for i, r in zip(idx, json.loads(result.read_text())):
            out[i] = r
    return out  # type: ignore[return-value]


def run_numbers(run_dir: Path) -> Tuple[float, int, List[int]]:
    """``(accuracy, episodes, correct queries per episode)`` of a finished run (its ``summary.json``
    and ``episodes.csv``): the numbers its identity stands for."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return float(summary["accuracy"]), int(summary["episodes"]), correct_counts(run_dir)


def correct_counts(run_dir: Path) -> List[int]:
    with open(run_dir / "episodes.csv", newline="") as f:
        by_episode = {int(r["episode"]): int(r["correct"]) for r in csv.DictReader(f)}
    return [by_episode[i] for i in sorted(by_episode)]


def identity_of(run_dir: Path) -> Dict[str, Any]:
    record = json.loads((run_dir / "identity.json").read_text())
    record.pop("code_files", None)
    return record


def changed(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@dataclass
class Outcome:
    """One mutation: the row it gave (or the one-line refusal) and the fresh reference."""

    what: str
    row: Optional[Dict[str, Any]] = None
    refused: Optional[str] = None
    kwargs: Optional[Dict[str, Any]] = None
    snapshot: Optional[Dict[str, Any]] = None  # the kwargs of the reference (inputs copied as mutated)
    fresh: Optional[Dict[str, Any]] = None
    against: Optional[Dict[str, Any]] = None  # the row it must differ from (default: the baseline's)


def mutate_and_run(b: Baseline, what: str, kwargs: Dict[str, Any], snapshot: Callable[[Path], Dict[str, Any]],
                   workdir: Path) -> Outcome:
    """Run ``kwargs`` in this process (baseline's folders and caches), then copy the inputs as they are
    now for the fresh reference (``snapshot(folder)`` returns its kwargs)."""
    outcome = Outcome(what, kwargs=kwargs)
    try:
        outcome.row = run(kwargs)
    except FewShotError as exc:
        outcome.refused = str(exc)
        return outcome
    outcome.snapshot = snapshot(workdir / f"inputs_{len(list(workdir.glob('inputs_*')))}")
    return outcome


def check_outcomes(b: Baseline, outcomes: List[Outcome], workdir: Path,
                   allowed_same: Callable[[Outcome], bool] = lambda o: False) -> None:
    """Each mutation changed the identity (or ``allowed_same`` says it cannot change the number), and
    its row equals what a fresh process on fresh caches computes, episode by episode."""
    ran = [o for o in outcomes if o.row is not None]
    for o, fresh in zip(ran, fresh_rows([o.snapshot for o in ran], workdir / "fresh")):
        o.fresh = fresh
    problems = []
    for o in outcomes:
        if o.refused is not None:
            report_row(o.what, "refused", f"`error: {o.refused}`", "-")
            continue
        rdir = b.run_dir(o.row)
        same_identity = identity_of(rdir) == identity_of(b.run_dir(o.against or b.row))
        if same_identity and not allowed_same(o):
            problems.append(f"{o.what}: identity unchanged ({o.row['run_id']})")
        if "error" in o.fresh:
            problems.append(f"{o.what}: ran here but a fresh process refused it: {o.fresh['error']}")
            continue
        got, want = run_numbers(rdir), (o.fresh["accuracy"], o.fresh["episodes"], o.fresh["correct"])
        if got != want:
            problems.append(f"{o.what}: run {o.row['run_id']} has {got} but a fresh process computes {want} "
                            f"(stale result reused)")
        diff = changed(identity_of(rdir), identity_of(b.run_dir(o.against or b.row)))
        reused = rdir == b.run_dir(o.against or b.row)
        report_row(o.what, ", ".join(diff) if diff else "none", "reused the finished run" if reused else "new run",
                   f"{got[0]:.2f} / {want[0]:.2f}" + (" (equal)" if got == want else " (DIFFERENT)"))
        # the row: the run's own numbers, or (a row aggregates every finished seed of its cell) several seeds
        if int(o.row["n_seeds"]) == 1 and float(o.row["accuracy"]) != o.fresh["row_accuracy"]:
            problems.append(f"{o.what}: row {o.row['accuracy']} but a fresh process's row is {o.fresh['row_accuracy']}")
    assert not problems, "\n".join(problems)


def report_row(what: str, identity: str, outcome: str, numbers: str) -> None:
    """With ``FEWSHOT_NSL_MUTATIONS_MD=FILE``, append the mutation's row to FILE (the table in
    docs/robustness.md, "Issue 25: adversarial round")."""
    path = os.environ.get("FEWSHOT_NSL_MUTATIONS_MD")
    if not path:
        return
    new = not Path(path).is_file()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("| mutation | identity components changed | what the run did | accuracy here / fresh process |\n"
                    "|---|---|---|---|\n")
        cells = [c.replace("|", "\\|") for c in (what, identity, outcome, numbers)]
        f.write("| " + " | ".join(cells) + " |\n")


def copied(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- data
def data_mutations(b: Baseline, every_image: bool) -> List[Tuple[str, Callable[[Path], None]]]:
    """``(description, edit of the data root)``: a pixel of one image per split (or of every image),
    an image added, a class folder renamed, files the loader does not read added."""
    images = sorted(p.relative_to(b.pristine) for p in b.pristine.rglob("*.png"))
    if not every_image:  # a base-class image (pretraining, episodic training) and a test image
        images = [next(p for p in images if p.parts[0] == split) for split in ("train", "test")]
    out: List[Tuple[str, Callable[[Path], None]]] = [
        (f"one pixel of {p.as_posix()}", lambda root, p=p: edit_pixel(root / p)) for p in images]
    out += [
        ("an image added to test/test_class0",
         lambda root: shutil.copy2(root / "test/test_class1/0.png", root / "test/test_class0/9.png")),
        ("class folder test/test_class2 renamed", lambda root: (root / "test/test_class2").rename(root / "test/zebra")),
        ("class folder train/train_class0 renamed",
         lambda root: (root / "train/train_class0").rename(root / "train/aardvark")),
    ]
    return out


#: Files the class-folder loader does not read (folders/__init__ docstring): editing them cannot change a number.
UNREAD = [("train/train_class0/.DS_Store", b"\x00\x01"), ("test/test_class0/notes.txt", b"taken on a Monday"),
          ("test/test_class1/._0.png", b"AppleDouble")]


def run_data_mutations(b: Baseline, mutations, workdir: Path) -> None:
    outcomes = []
    try:
        for what, edit in mutations:
            b.restore_data()
            edit(b.data)
            outcomes.append(mutate_and_run(b, f"data: {what}", dict(b.kwargs), lambda d: {
                **b.kwargs, "data_root": str(copied(b.data, d))}, workdir))
        b.restore_data()
        for rel, content in UNREAD:
            (b.data / rel).write_bytes(content)
        outcomes.append(mutate_and_run(b, "data: files the loader does not read added", dict(b.kwargs),
                                       lambda d: {**b.kwargs, "data_root": str(copied(b.data, d))}, workdir))
    finally:
        b.restore_data()
    assert all(o.refused is None for o in outcomes), [o.refused for o in outcomes]
    check_outcomes(b, outcomes, workdir, allowed_same=lambda o: "not read" in o.what)
    unread = outcomes[-1]
    assert unread.row["run_id"] == b.row["run_id"], "an unread file changed the identity"
    # the restored data is the baseline's data: reused, not recomputed
    assert run(b.kwargs)["run_id"] == b.row["run_id"]


def test_each_data_edit_changes_the_identity_or_cannot_change_the_number(baseline, tmp_path):
    run_data_mutations(baseline, data_mutations(baseline, every_image=False), tmp_path)


@pytest.mark.slow
def test_every_image_file_edited_one_at_a_time(baseline, tmp_path):
    run_data_mutations(baseline, data_mutations(baseline, every_image=True), tmp_path)


# ----------------------------------------------------------------------------- code
CODE_MUTATIONS = [
    ("helper module: PRIOR 0.0 -> 1e6 (always predicts class 0)", lambda b: f"{HELPER}.py", "PRIOR = 0.0", "PRIOR = 1e6"),
    ("method file: SIGN -1.0 -> 1.0 (farthest class mean)", lambda b: "probe_method.py", "SIGN = -1.0", "SIGN = 1.0"),
]


def test_each_code_file_the_run_loaded_is_in_its_identity(baseline, tmp_path):
    b = baseline
    base_files = {f["path"] for f in json.loads((b.run_dir(b.row) / "identity.json").read_text())["code_files"]}
    assert {f"{b.plugins.name}/probe_method.py", f"{b.plugins.name}/{HELPER}.py"} <= base_files
    outcomes = []
    try:
        for what, file_of, old, new in CODE_MUTATIONS:
            b.restore_code()
            path = b.plugins / file_of(b)
            text = path.read_text()
            assert old in text
            path.write_text(text.replace(old, new))
            outcome = mutate_and_run(b, f"code: {what}", dict(b.kwargs), lambda d: {
                **b.kwargs, "plugins": [str(copied(b.plugins, d / b.plugins.name))]}, tmp_path)
            outcomes.append(outcome)
            assert outcome.refused is None, outcome.refused
            assert changed(identity_of(b.run_dir(outcome.row)), identity_of(b.run_dir(b.row))) == ["code_hash"]
    finally:
        b.restore_code()
    check_outcomes(b, outcomes, tmp_path)
    # each edit changes the number (so reusing the baseline's row would have been wrong) ...
    assert all(correct_counts(b.run_dir(o.row)) != correct_counts(b.run_dir(b.row)) for o in outcomes)
    # ... and the code put back is the baseline's code: its run is reused in this same process
    again = run(b.kwargs)
    assert again["run_id"] == b.row["run_id"] and float(again["accuracy"]) == float(b.row["accuracy"])


# ----------------------------------------------------------------------------- episode list
def test_the_episode_list_is_in_the_identity_and_its_path_is_not(baseline, tmp_path):
    b = baseline
    generated = sorted(b.results.glob("episodes/custom-*/test_3w1s2q_600_seed0.json"))
    fingerprint = identity_of(b.run_dir(b.row))["dataset_fingerprint"]
    listed = [p for p in generated if p.parent.name.endswith(fingerprint)]
    assert len(listed) == 1
    copy = tmp_path / "lists" / "copy.json"
    copy.parent.mkdir()
    shutil.copy(listed[0], copy)

    # the same list from another path: the same run, reused
    same = run({**b.kwargs, "episodes_file": str(copy)})
    assert same["run_id"] == b.row["run_id"]
    report_row("episode list: the same list from another path (--episodes copy)", "none", "reused the finished run",
               f"{float(same['accuracy']):.2f} (the baseline's)")

    # one rank edited by hand: the checksum refuses it in one line, before any run folder
    from fewshot_nsl.data.episodes import EpisodeList

    doc = json.loads(copy.read_text())
    first = doc["episodes"][0]
    used = set(first[1][0]) | set(first[2][0])
    spare = next(r for r in range(PER_CLASS) if r not in used)
    edited = tmp_path / "lists" / "edited.json"
    doc["episodes"][0][2][0][0] = spare
    edited.write_text(json.dumps(doc))
    runs_before = sorted(p.name for p in (b.results / "runs").iterdir())
    with pytest.raises(FewShotError, match="fails its checksum") as info:
        run({**b.kwargs, "episodes_file": str(edited)})
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (b.results / "runs").iterdir()) == runs_before
    report_row("episode list: one query rank edited by hand", "refused", f"`error: {info.value}`", "-")

    # the same edit, re-hashed as a user regenerating the list would: a new list, a new run
    rehashed = tmp_path / "lists" / "rehashed.json"
    lst = EpisodeList.load(copy)
    e0 = lst.episodes[0]
    query = (tuple((spare, *e0.query[0][1:])),) + e0.query[1:]
    lst.episodes[0] = type(e0)(e0.classes, e0.support, query)
    lst.save(rehashed)
    outcome = mutate_and_run(b, "episode list: one query rank, re-hashed", {**b.kwargs, "episodes_file": str(rehashed)},
                             lambda d: {**b.kwargs, "episodes_file": str(shutil.copy(rehashed, d.with_suffix(".json")))},
                             tmp_path)
    assert changed(identity_of(b.run_dir(outcome.row)), identity_of(b.run_dir(b.row))) == ["episode_hash"]
    check_outcomes(b, [outcome], tmp_path)


# ----------------------------------------------------------------------------- config keys
def flat_keys(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``config.yaml`` as ``{dotted key: value}``; an option dict is one key per option (an empty one, itself)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def nested(key: str, value: Any) -> Dict[str, Any]:
    head, _, rest = key.partition(".")
    return {head: nested(rest, value) if rest else value}


def merged(kwargs: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """``kwargs`` with config key ``key`` (dotted) set to ``value``; sections merge key by key."""
    from fewshot_nsl.config import merge

    head = key.split(".")[0]
    out = dict(kwargs)
    if head in ("method", "shots", "backbone"):  # benchmark()'s own arguments
        out[head] = value
    else:
        out.update(merge({head: out.get(head)} if isinstance(out.get(head), dict) else {}, nested(key, value)))
    return out


def config_alternatives(b: Baseline, workdir: Path) -> Dict[str, Optional[Callable[[], Any]]]:
    """For each key of ``config.yaml``: how to set it to another valid value, as benchmark() kwargs over
    the baseline's; ``(before, after)`` where the key needs another one set first (compared with
    ``before``'s run); ``None`` where the key has no other valid value for this cell (refused in one line)."""
    kw = b.kwargs

    def set_(key: str, value: Any) -> Callable[[], Dict[str, Any]]:
        return lambda: merged(kw, key, value)

    def with_validation(key: str, value: Any) -> Callable[[], Tuple[Dict[str, Any], Dict[str, Any]]]:
        """``key`` needs validation on (``val_every``): compared with the run that has it on."""
        section = key.split(".")[0]
        on = merged(kw, f"{section}.val_every", 2)
        return lambda: (on, merged(on, key, value))

    def data_copy() -> Dict[str, Any]:
        return {**kw, "data_root": str(copied(b.data, workdir / "data_copy"))}

    def list_copy() -> Dict[str, Any]:
        listed = sorted(b.results.glob("episodes/custom-*/test_3w1s2q_600_seed0.json"))
        fingerprint = identity_of(b.run_dir(b.row))["dataset_fingerprint"]
        src = next(p for p in listed if p.parent.name.endswith(fingerprint))
        dst = workdir / "episodes_copy.json"
        shutil.copy(src, dst)
        return {**kw, "episodes_file": str(dst)}

    return {
        "method": lambda: {**kw, "method": "protonet", "method_options": {}},  # protonet has no 'scale'

        "method_options.scale": set_("method_options.scale", 0.5),
        "conv": set_("conv", {"kind": "static", "structure": "dns"}),
        "backbone": lambda: {**kw, "backbone": "cnn9", "backbone_options": {"stem": 8, "widths": [8, 8, 8]}},
        "backbone_options.filters": set_("backbone_options.filters", 12),
        "dataset": lambda: {**kw, "dataset": "tiny", "data_root": None, "plugins": [*kw["plugins"], str(TEST_PLUGINS)]},
        "data_root": data_copy,
        "dataset_options": None,  # the custom loader takes no options
        "ways": set_("ways", 2),
        "shots": set_("shots", 2),
        "image_size": set_("image_size", 20),
        "profile": set_("profile", "quick"),
        "seed": set_("seed", 1),
        "device": set_("device", "cpu"),
        "deterministic": set_("deterministic", True),
        "compile": set_("compile", "off"),
        "precision": set_("precision", "bf16"),
        "episodes_file": list_copy,
        "results_dir": set_("results_dir", str(workdir / "other_results")),
        "cache_dir": set_("cache_dir", str(workdir / "other_cache")),
        "pretrain.epochs": set_("pretrain.epochs", 2),
        "pretrain.batch_size": set_("pretrain.batch_size", 8),
        "pretrain.optimizer": set_("pretrain.optimizer", "adam"),
        "pretrain.schedule": set_("pretrain.schedule", "constant"),
        "pretrain.lr": set_("pretrain.lr", 0.01),
        "pretrain.momentum": set_("pretrain.momentum", 0.5),
        "pretrain.weight_decay": set_("pretrain.weight_decay", 0.0),
        "pretrain.max_steps": set_("pretrain.max_steps", 3),
        "pretrain.augment": set_("pretrain.augment", False),
        "pretrain.val_every": set_("pretrain.val_every", 2),
        "pretrain.val_episodes": with_validation("pretrain.val_episodes", 2),
        "pretrain.val_metric": with_validation("pretrain.val_metric", "loss"),
        "pretrain.val_select": with_validation("pretrain.val_select", "best"),
        "pretrain.val_patience": with_validation("pretrain.val_patience", 1),
        "episodic.steps": set_("episodic.steps", 2),
        "episodic.meta_batch": set_("episodic.meta_batch", 2),
        "episodic.lr": set_("episodic.lr", 0.01),
        "episodic.ways": set_("episodic.ways", 2),
        "episodic.shots": set_("episodic.shots", 2),
        "episodic.queries": set_("episodic.queries", 3),
        "episodic.checkpoint_every": set_("episodic.checkpoint_every", 1),
        "episodic.lr_step": set_("episodic.lr_step", 1),
        "episodic.lr_gamma": set_("episodic.lr_gamma", 0.1),
        "episodic.grad_clip": set_("episodic.grad_clip", 0.5),
        "episodic.val_every": set_("episodic.val_every", 2),
        "episodic.val_episodes": with_validation("episodic.val_episodes", 2),
        "episodic.val_metric": with_validation("episodic.val_metric", "loss"),
        "episodic.val_select": with_validation("episodic.val_select", "best"),
        "episodic.val_patience": with_validation("episodic.val_patience", 1),
        "eval.episodes": set_("eval.episodes", 4),
        "eval.queries": set_("eval.queries", 3),
        "eval.split": set_("eval.split", "val"),
        "eval.batch_episodes": set_("eval.batch_episodes", 1),
    }


#: The fast subset: two documented non-identity keys, and keys read by the pretraining (its cache), the
#: method and the evaluation.
FAST_KEYS = ("device", "results_dir", "seed", "pretrain.lr", "method_options.scale", "eval.split")


def run_config_mutations(b: Baseline, keys: Optional[Tuple[str, ...]], workdir: Path) -> List[Outcome]:
    saved = flat_keys(yaml.safe_load((b.run_dir(b.row) / "config.yaml").read_text()))
    alternatives = config_alternatives(b, workdir)
    assert set(saved) == set(alternatives), (
        f"config.yaml keys without a mutation here: {sorted(set(saved) - set(alternatives))}; "
        f"mutations of keys it no longer has: {sorted(set(alternatives) - set(saved))}")
    outcomes = []
    for key in keys or sorted(saved):
        alt = alternatives[key]
        if alt is None:  # no other valid value: any other value is refused in one line, before a run folder
            runs_before = sorted(p.name for p in (b.results / "runs").iterdir())
            with pytest.raises(FewShotError) as info:
                run(merged(b.kwargs, key, {"anything": 1}))
            assert "\n" not in str(info.value)
            assert sorted(p.name for p in (b.results / "runs").iterdir()) == runs_before
            outcomes.append(Outcome(f"config: {key}", refused=str(info.value)))
            continue
        kwargs = alt()
        against = None
        if isinstance(kwargs, tuple):  # a key that needs another one set first: compared with that run
            before, kwargs = kwargs
            against = run(before)
            saved_before = flat_keys(yaml.safe_load((b.run_dir(against) / "config.yaml").read_text()))
        outcome = mutate_and_run(b, f"config: {key}", kwargs, lambda d, kwargs=kwargs: dict(kwargs), workdir)
        outcome.against = against
        assert outcome.refused is None, f"{key}: {outcome.refused}"
        if b.run_dir(outcome.row) != b.run_dir(against or b.row):  # a run of its own: config.yaml has the new value
            mutated = flat_keys(yaml.safe_load((b.run_dir(outcome.row) / "config.yaml").read_text()))
            old = (saved_before if against else saved)[key]
            assert mutated.get(key) != old, f"{key} was not changed: {mutated.get(key)}"
        outcomes.append(outcome)
    check_outcomes(b, outcomes, workdir, allowed_same=lambda o: o.what.split(": ")[1] in NOT_IN_IDENTITY)
    for o in outcomes:
        if o.row is not None and o.what.split(": ")[1] in NOT_IN_IDENTITY:
            # documented as not changing the number: same identity (where the run could be reused, it was)
            assert identity_of(b.run_dir(o.row)) == identity_of(b.run_dir(b.row)), o.what
            assert correct_counts(b.run_dir(o.row)) == correct_counts(b.run_dir(b.row)), o.what
    return outcomes


def test_config_keys_change_the_identity_or_cannot_change_the_number(baseline, tmp_path):
    run_config_mutations(baseline, FAST_KEYS, tmp_path)


@pytest.mark.slow
def test_every_config_key_changes_the_identity_or_cannot_change_the_number(baseline, tmp_path):
    run_config_mutations(baseline, None, tmp_path)


# ----------------------------------------------------------------------------- Ray workers
def test_a_ray_worker_never_evaluates_a_store_decoded_before_the_data_changed(baseline, tmp_path):
    from fewshot_nsl import executors
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.errors import DataError
    from fewshot_nsl.runner import load_store, run_dir_of, run_identity

    b = baseline
    data = copied(b.pristine, tmp_path / "data")
    over = {k: v for k, v in b.kwargs.items() if k not in ("plugins", "threads")}
    cfg = resolve_config({**over, "data_root": str(data), "results_dir": str(tmp_path / "results"),
                          "cache_dir": str(tmp_path / "cache")})
    threads = torch.get_num_threads()
    executors._STORES.clear()
    try:
        first = executors._worker_context(cfg, [str(b.plugins)], 1)
        edit_pixel(data / "test/test_class0/0.png")
        fresh = load_store(cfg)
        on_disk = fresh.fingerprint()
        assert on_disk != first.store.fingerprint()
        # the driver prepared the run on the data as it is now and passes its run folder to every task
        expect = run_dir_of(cfg, run_identity(cfg, fresh)).name
        second = executors._worker_context(cfg, [str(b.plugins)], 1, expect)
        assert second.store.fingerprint() == on_disk, "the worker evaluates the pixels decoded before the edit"
        assert second.identity.dataset_fingerprint == on_disk and second.run_dir.name == expect
        # a task for a run the worker cannot reproduce (data changed again after the driver prepared it) refuses
        with pytest.raises(DataError, match="changed while the run was in flight"):
            executors._worker_context(cfg, [str(b.plugins)], 1, first.run_dir.name)
    finally:
        executors._STORES.clear()
        torch.set_num_threads(threads)
