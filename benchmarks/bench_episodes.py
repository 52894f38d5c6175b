"""Target 1 (episodes): materialising an episode vs learn2learn, and the data share of a ProtoNet evaluation.

Part ``materialise``: a 5-way 5-shot 15-query 84x84 episode from a memory-mapped uint8 store
(synthetic, shaped like the Mini-ImageNet test split: 20 classes x 600 images) to normalised
float tensors ``(N, 3, 84, 84)``:

* ``l2l``: learn2learn's ``TaskDataset`` with ``NWays``/``KShots(shots+queries)``/``LoadData``/
  ``RemapLabels`` over ``MetaDataset(store as a torch Dataset)``; the Dataset returns each image as
  torchvision's ``Normalize(MEAN, STD)(ToTensor()(image))`` (the usual learn2learn pipeline),
  and the task is split into support and query afterwards;
* ``ours (sample+materialise)``: ``EpisodeSampler`` draws the episode, ``Materialiser`` builds it
  (what training does, the same work as the learn2learn side);
* ``ours (materialise)``: ``Materialiser`` on episodes of a fixed list (what evaluation does).

Part ``share``: ``fewshot_nsl.evaluation.evaluate`` of ProtoNet (CNN-4, 32 filters) on a fixed
list of 600 episodes of that store, with the time spent inside ``Materialiser.__call__``
measured; data share = that time / evaluation wall time.

Usage::

    python benchmarks/bench_episodes.py [--reps 7] [--episodes 600] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import warnings

import numpy as np
import torch

# torchvision's ToTensor warns once about the read-only memory map it is given; it only reads it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, make_store, now, print_settings, quiet_learn2learn, ratio_stats, stats, verdict  # noqa: E402

from fewshot_nsl.data.episodes import MEAN, STD, EpisodeSampler, Materialiser, episode_list_for_store  # noqa: E402


class StoreDataset(torch.utils.data.Dataset):
    """The store as a torch Dataset of ``(normalised float (3, H, W), label)`` (torchvision transforms)."""

    def __init__(self, store) -> None:
        import torchvision.transforms as T

        self.store = store
        self.transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.store.labels)

    def __getitem__(self, i: int):
        return self.transform(np.asarray(self.store.images[i])), int(self.store.labels[i])


def l2l_task_sampler(store, ways: int, shots: int, queries: int):
    """A zero-argument callable returning ``(support_x, support_y, query_x, query_y)`` via learn2learn."""
    l2l = quiet_learn2learn()
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    labels_to_indices = {c: store.class_members(c).tolist() for c in range(store.num_classes)}
    meta = l2l.data.MetaDataset(StoreDataset(store), labels_to_indices=labels_to_indices)
    tasks = l2l.data.TaskDataset(
        meta, [NWays(meta, ways), KShots(meta, shots + queries), LoadData(meta), RemapLabels(meta)], num_tasks=-1
    )

    def sample():
        x, y = tasks.sample()
        # support = the first `shots` images of each class, query = the rest
        order = torch.argsort(y, stable=True)
        x, y = x[order], y[order]
        is_support = (torch.arange(len(y)) % (shots + queries)) < shots
        return x[is_support], y[is_support], x[~is_support], y[~is_support]

    return sample


def bench_materialise(store, reps: int, inner: int, ways: int = 5, shots: int = 5, queries: int = 15) -> dict:
    size = store.image_shape[0]
    mat = Materialiser(store, size, torch.device("cpu"))
    sampler = EpisodeSampler(store, "test", ways, shots, queries, seed=0)
    fixed = episode_list_for_store(store, "test", ways, shots, queries, n=max(inner * (reps + 1), 1), seed=1).episodes
    cursor = {"i": 0}

    def ours_fixed():
        cursor["i"] = (cursor["i"] + 1) % len(fixed)
        return mat(fixed[cursor["i"]])

    l2l_sample = l2l_task_sampler(store, ways, shots, queries)
    # sanity: same shapes and labels on both sides (ours are shuffled per episode, learn2learn's class-major)
    a, b = l2l_sample(), mat(next(sampler))
    assert a[0].shape == b.support_x.shape and a[2].shape == b.query_x.shape, (a[0].shape, b.support_x.shape)
    assert torch.equal(a[1].sort().values, b.support_y.sort().values)
    assert torch.equal(a[3].sort().values, b.query_y.sort().values)
    times = interleaved(
        {"l2l": l2l_sample, "ours (sample+materialise)": lambda: mat(next(sampler)), "ours (materialise)": ours_fixed},
        reps=reps, warmup=2, inner=inner,
    )
    print(f"\n-- {ways}-way {shots}-shot {queries}-query {size}x{size} episode -> normalised float tensors "
          f"(ms per episode, median [min-max] of {reps} reps x {inner} episodes)")
    for name, t in times.items():
        print(f"   {name:28s} {fmt_ms(t)}")
    res = {}
    for name in ("ours (sample+materialise)", "ours (materialise)"):
        r = ratio_stats(times["l2l"], times[name])
        res[name] = r
        met = verdict(r["median"], 10.0, ">=")
        print(f"   speed-up of {name:28s} over l2l: {fmt_ratio(r, 1)}   target >= 10x: {met}")
        emit("1a", f"episode speed-up vs learn2learn, {name}", r, ">= 10", met,
             ms_ours=stats(times[name]), ms_l2l=stats(times["l2l"]))
    return res


class _TimedMaterialiser(Materialiser):
    """Materialiser that accumulates the seconds spent materialising episodes (class-level counters): the host
    stage (``stage``, run in the prefetch thread) and the device stage (``load``), which ``__call__`` chains."""

    seconds = 0.0
    calls = 0

    def stage(self, episode):
        t0 = now()
        out = super().stage(episode)
        type(self).seconds += now() - t0
        return out

    def load(self, staged):
        t0 = now()
        out = super().load(staged)
        type(self).seconds += now() - t0
        type(self).calls += 1
        return out


def protonet(image_size: int, filters: int = 32):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "baselines"))
    from fewshot_nsl.backbones import cnn4
    from fewshot_nsl.registry import create_method, load_plugins

    load_plugins([Path(__file__).resolve().parent.parent / "baselines"])
    torch.manual_seed(0)
    return create_method("protonet", backbone=cnn4(filters=filters), image_size=image_size)


def timed_evaluation(store, n_episodes: int, image_size: int, ways=5, shots=5, queries=15, seed=0):
    """Run ``evaluate`` of ProtoNet on ``n_episodes``; returns (wall seconds, Materialiser seconds)."""
    import fewshot_nsl.evaluation as ev

    lst = episode_list_for_store(store, "test", ways, shots, queries, n=n_episodes, seed=seed)
    method = protonet(image_size)
    original = ev.Materialiser
    ev.Materialiser = _TimedMaterialiser  # this benchmark's instrumentation only, restored below
    _TimedMaterialiser.seconds, _TimedMaterialiser.calls = 0.0, 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = now()
            ev.evaluate(method, store, lst, n_episodes, torch.device("cpu"), image_size, Path(tmp) / "eps.csv", progress=False,
                        batch_episodes=1)  # the per-episode path: its data handling is what is timed
            wall = now() - t0
    finally:
        ev.Materialiser = original
    assert _TimedMaterialiser.calls == n_episodes
    return wall, _TimedMaterialiser.seconds


def bench_share(store, n_episodes: int, reps: int) -> dict:
    size = store.image_shape[0]
    shares, walls = [], []
    for _ in range(reps):
        wall, data = timed_evaluation(store, n_episodes, size)
        shares.append(data / wall)
        walls.append(wall)
    s = stats(shares)
    met = verdict(s["median"], 0.05, "<")
    print(f"\n-- ProtoNet (CNN-4, 32 filters) evaluation of {n_episodes} episodes at {size}x{size}: "
          f"wall {stats(walls)['median']:.1f} s; data handling share "
          f"{100 * s['median']:.2f}% [{100 * s['min']:.2f}-{100 * s['max']:.2f}] over {reps} run(s)   target < 5%: {met}")
    emit("1b", "data handling share of a ProtoNet evaluation", s, "< 5%", met, episodes=n_episodes, wall_s=stats(walls))
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=20, help="episodes per timing")
    p.add_argument("--episodes", type=int, default=600, help="episodes of the evaluation (part share)")
    p.add_argument("--share-reps", type=int, default=1)
    p.add_argument("--part", choices=("materialise", "share", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_episodes: target 1")
    if args.quick:
        store = make_store(classes=6, per_class=25, size=84)
        args.reps, args.inner, args.episodes = 2, 2, 3
    else:
        store = make_store()
    if args.part in ("materialise", "all"):
        bench_materialise(store, args.reps, args.inner)
    if args.part in ("share", "all"):
        bench_share(store, args.episodes, args.share_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
