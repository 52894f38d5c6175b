"""Episodes: seeded sampling, fixed versioned episode lists, and materialisation to tensors.

An episode is ``(classes, support ranks, query ranks)``: ``ways`` class names and, per class,
the ranks (position within the class, canonical store order) of its support and query
images. Episode lists are JSON files under ``episodes/<dataset>/`` carrying a sha256 content
hash; every result records the hash of the list it was evaluated on.

Presentation order. A method never sees an episode in class order (query ``i`` of class
``i // queries`` would let a method that ignores every pixel score 100%): every episode the
suite makes carries an :class:`EpisodeOrder`, a permutation of its support and of its query
images, which :class:`Materialiser` applies to images and labels alike.

* Episodes of a fixed list: derived from ``(list seed, episode index)`` by the scheme
  :data:`ORDER_SCHEME` (:func:`list_episode_order`, pure ``hashlib``: the same permutation on
  every platform and numpy version); not stored per episode, but the scheme's name is written
  in the file (``"order"``) and the scheme and the seed are part of :attr:`EpisodeList.sha256`,
  so results computed under another layout are never reused under this hash.
* Training episodes (:class:`EpisodeSampler`): drawn from the sampler's seeded generator right
  after the episode's classes and ranks (so a checkpoint of its generator state resumes exactly).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..resources import resource_dir
from .store import ImageStore

#: Per-channel normalisation applied to every image (ImageNet statistics).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: The committed lists: ``episodes/`` of a checkout, ``fewshot_nsl/episodes`` of an installed copy.
EPISODES_DIR = resource_dir("episodes")


#: Name of the scheme that orders a fixed list's episodes (:func:`list_episode_order`); written in
#: each list file and hashed into :attr:`EpisodeList.sha256`. Change it whenever the permutations change.
ORDER_SCHEME = "sha256-sort-v1"


@dataclass(frozen=True)
class EpisodeOrder:
    """The order a method is shown an episode's images in.

    Attributes:
        support: permutation of ``range(ways*shots)``: position ``k`` of ``support_x``/``support_y``
            holds item ``support[k]`` of the class-major layout (class 0's shots, then class 1's, ...).
        query: permutation of ``range(ways*queries)``, the same for ``query_x``/``query_y``.
    """

    support: Tuple[int, ...]
    query: Tuple[int, ...]


@dataclass(frozen=True)
class Episode:
    """One few-shot task.

    Attributes:
        classes: ``ways`` class names; episode label ``i`` is ``classes[i]``.
        support: per class, ``shots`` ranks within the class.
        query: per class, ``queries`` ranks within the class.
        order: presentation order of the support and query images (:class:`EpisodeOrder`);
            ``None`` only for a hand-built episode, which is then materialised class-major.
            Every episode of an :class:`EpisodeList` or an :class:`EpisodeSampler` has one.
            Not part of :meth:`to_json` (a list derives it from its seed).
    """

    classes: Tuple[str, ...]
    support: Tuple[Tuple[int, ...], ...]
    query: Tuple[Tuple[int, ...], ...]
    order: Optional[EpisodeOrder] = None

    @property
    def ways(self) -> int:
        return len(self.classes)

    def to_json(self) -> list:
        return [list(self.classes), [list(s) for s in self.support], [list(q) for q in self.query]]

    @classmethod
    def from_json(cls, obj: list) -> "Episode":
        classes, support, query = obj
        return cls(tuple(classes), tuple(tuple(s) for s in support), tuple(tuple(q) for q in query))


def sample_episode(
    rng: np.random.Generator,
    class_names: Sequence[str],
    class_sizes: Sequence[int],
    ways: int,
    shots: int,
    queries: int,
) -> Episode:
    """Draw ``ways`` classes and disjoint support/query ranks within each.

    Args:
        rng: numpy generator (the only source of randomness).
        class_names: candidate classes (one split).
        class_sizes: number of images of each candidate class.
    """
    if ways > len(class_names):
        raise DataError(
            f"{ways}-way episodes need {ways} classes but the split has {len(class_names)}; lower --ways"
        )
    chosen = rng.choice(len(class_names), size=ways, replace=False)
    support, query = [], []
    for c in chosen:
        if class_sizes[c] < shots + queries:
            raise DataError(
                f"class {class_names[c]} has {class_sizes[c]} images, fewer than shots+queries={shots + queries}; "
                f"lower --shots/--queries"
            )
        ranks = rng.choice(class_sizes[c], size=shots + queries, replace=False)
        support.append(tuple(int(r) for r in ranks[:shots]))
        query.append(tuple(int(r) for r in ranks[shots:]))
    return Episode(tuple(class_names[c] for c in chosen), tuple(support), tuple(query))


class EpisodeSampler:
    """Seeded on-the-fly sampler of training episodes from one split of a store.

    Each episode comes with a shuffled :class:`EpisodeOrder` drawn from ``rng`` (the only
    state: saving ``rng.bit_generator.state`` and restoring it resumes the same sequence).
    """

    def __init__(self, store: ImageStore, split: str, ways: int, shots: int, queries: int, seed: int) -> None:
        self.classes = store.classes_in_split(split)
        self.names = [store.class_names[c] for c in self.classes]
        self.sizes = [store.class_size(c) for c in self.classes]
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rng = np.random.default_rng(seed)
        # Validate once, up front, so a bad request fails before any training.
        if ways > len(self.names):
            raise DataError(
                f"{ways}-way episodes need {ways} classes but split '{split}' of {store.name} has "
                f"{len(self.names)}; lower --ways"
            )
        small = [n for n, s in zip(self.names, self.sizes) if s < shots + queries]
        if small:
            raise DataError(
                f"{store.name}: class {small[0]} ({split}) has fewer than shots+queries={shots + queries} images; "
                f"lower --shots/--queries"
            )

    def __next__(self) -> Episode:
        """The next episode, with a presentation order drawn from the same generator."""
        e = sample_episode(self.rng, self.names, self.sizes, self.ways, self.shots, self.queries)
        order = EpisodeOrder(
            tuple(int(k) for k in self.rng.permutation(self.ways * self.shots)),
            tuple(int(k) for k in self.rng.permutation(self.ways * self.queries)),
        )
        return replace(e, order=order)

    def __iter__(self) -> "EpisodeSampler":
        return self


# ----------------------------------------------------------------------------- fixed lists
def _sha256_permutation(n: int, key: str) -> Tuple[int, ...]:
    """``range(n)`` sorted by ``sha256(key/j)``: a permutation fixed by ``key`` alone."""
    prefix = hashlib.sha256(f"{key}/".encode())

    def rank(j: int) -> bytes:
        h = prefix.copy()
        h.update(str(j).encode())
        return h.digest()

    return tuple(sorted(range(n), key=rank))


def list_episode_order(seed: int, index: int, n_support: int, n_query: int) -> EpisodeOrder:
    """Presentation order of episode ``index`` of a list made with ``seed`` (scheme :data:`ORDER_SCHEME`).

    Support and query permutations sort positions by ``sha256("<scheme>/<seed>/<index>/<part>/<j>")``,
    ``part`` being ``support`` or ``query``: the same on every platform, independent of the
    episode's content, different between episodes and between seeds.

    Args:
        n_support: ``ways*shots``.
        n_query: ``ways*queries``.
    """
    key = f"{ORDER_SCHEME}/{seed}/{index}"
    return EpisodeOrder(_sha256_permutation(n_support, f"{key}/support"), _sha256_permutation(n_query, f"{key}/query"))


def _with_list_order(e: Episode, seed: int, index: int) -> Episode:
    order = list_episode_order(seed, index, sum(len(s) for s in e.support), sum(len(q) for q in e.query))
    return e if e.order == order else replace(e, order=order)


@dataclass
class EpisodeList:
    """A fixed, versioned list of episodes plus its metadata.

    Every episode is given its presentation order from ``(seed, index)`` on construction
    (:func:`list_episode_order`), whatever order the given :class:`Episode` objects carried.
    """

    dataset: str
    split: str
    ways: int
    shots: int
    queries: int
    seed: int
    episodes: List[Episode]
    path: Optional[str] = None  # the file it was read from (messages); not part of the hash

    def __post_init__(self) -> None:
        self.episodes = [_with_list_order(e, self.seed, i) for i, e in enumerate(self.episodes)]

    def episode(self, index: int) -> Episode:
        """Episode ``index`` with its presentation order derived afresh from ``(seed, index)``
        (what evaluation materialises, even if ``episodes`` was reassigned after construction)."""
        return _with_list_order(self.episodes[index], self.seed, index)

    @property
    def sha256(self) -> str:
        """Content hash over (split, ways, shots, queries, episodes, order scheme, seed); 16 hex chars.

        The order scheme and the seed determine the presentation order of every episode, so a
        list differing only in them is a different list.
        """
        return self._content_hash({"order": ORDER_SCHEME, "seed": self.seed})

    def _unordered_sha256(self) -> str:
        """The hash lists recorded before episodes were shuffled (no order scheme, no seed):
        only to verify the checksum of such a file on load."""
        return self._content_hash()

    def _content_hash(self, *extra: object) -> str:
        payload = json.dumps(
            [self.split, self.ways, self.shots, self.queries, [e.to_json() for e in self.episodes], *extra],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.episodes)

    def save(self, path: Path) -> None:
        """Write JSON (one episode per line, for readable diffs) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {
            "dataset": self.dataset, "split": self.split, "ways": self.ways, "shots": self.shots,
            "queries": self.queries, "seed": self.seed, "n_episodes": len(self.episodes),
            "order": ORDER_SCHEME, "sha256": self.sha256,
        }
        lines = ",\n".join(json.dumps(e.to_json(), separators=(",", ":")) for e in self.episodes)
        text = json.dumps(head)[:-1] + ',\n"episodes": [\n' + lines + "\n]}\n"
        from ..safe_io import atomic_write_text

        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: Path) -> "EpisodeList":
        """Read, verify and validate an episode list: its recorded hash must match its content,
        and every episode must be well formed (:meth:`validate`).

        The file's ``"order"`` must name :data:`ORDER_SCHEME`. A file without one was written
        before episodes were shuffled: its recorded (class-major) hash is verified, and the list
        is then used shuffled under the current scheme, so its :attr:`sha256` differs from the
        recorded one and no result of the class-major layout is reused.

        Raises:
            DataError: one line naming the file and, for a bad episode, the first one.
        """
        from ..safe_io import load_json

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            from ..console import command_name

            raise DataError(f"episode list {path} does not exist; pass --episodes FILE (in a checkout, "
                            f"`{command_name()} --make-episodes` regenerates the committed lists)")
        obj = load_json(path, "episode list", DataError)
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("episodes"), list):
                raise TypeError("expected a mapping with an 'episodes' list")
            head = {}
            for k in ("ways", "shots", "queries", "seed"):
                v = obj[k]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"'{k}' must be an integer, got {v!r}")
                head[k] = v
            if not isinstance(obj["split"], str) or not isinstance(obj["dataset"], str):
                raise TypeError("'split' and 'dataset' must be strings")
            if "order" in obj and not isinstance(obj["order"], str):
                raise TypeError(f"'order' must be a string, got {obj['order']!r}")
            eps = []
            for i, e in enumerate(obj["episodes"]):
                if not (isinstance(e, list) and len(e) == 3 and all(isinstance(part, list) for part in e)
                        and all(isinstance(r, list) for part in e[1:] for r in part)):
                    raise TypeError(f"episode {i} must be [classes, support ranks per class, query ranks per class]")
                eps.append(Episode.from_json(e))
            lst = cls(obj["dataset"], obj["split"], head["ways"], head["shots"], head["queries"], head["seed"], eps)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"episode list {path} is malformed ({exc}); regenerate it with --make-episodes") from None
        scheme = obj.get("order")
        if scheme is not None and scheme != ORDER_SCHEME:
            raise DataError(f"episode list {path} orders its episodes by scheme '{scheme}', which this version does "
                            f"not know ('{ORDER_SCHEME}'); regenerate it with --make-episodes or upgrade fewshot-nsl")
        recorded = obj.get("sha256")
        if recorded != lst.sha256 and not (scheme is None and recorded == lst._unordered_sha256()):
            raise DataError(f"episode list {path} fails its checksum (edited or corrupted); restore it from git")
        lst.path = str(path)
        lst.validate()
        return lst

    def validate(self) -> None:
        """Check every episode against the declared shape: ``ways`` distinct classes, ``shots``
        support and ``queries`` query ranks per class, ranks non-negative integers, support and
        query disjoint. (Class names and rank ranges are checked against a store by
        :func:`check_episodes_match_store`.)

        Raises:
            DataError: naming the file and the first bad episode.
        """
        where = f"episode list {self.path or self.dataset}"
        if self.split not in ("train", "val", "test"):
            raise DataError(f"{where}: unknown split '{self.split}'; use train, val or test")
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise DataError(f"{where} declares {self.ways}-way {self.shots}-shot {self.queries}-query; "
                            f"needs at least 2 ways, 1 shot and 1 query")
        if not self.episodes:
            raise DataError(f"{where} has no episodes; regenerate it with --make-episodes")
        for i, e in enumerate(self.episodes):
            bad = _episode_problem(e, self.ways, self.shots, self.queries)
            if bad:
                raise DataError(f"{where}: episode {i} {bad}; regenerate the list (--make-episodes) or fix it")


def _episode_problem(e: Episode, ways: int, shots: int, queries: int) -> Optional[str]:
    """What is wrong with one episode against the declared shape, or None."""
    if len(e.classes) != ways:
        return f"has {len(e.classes)} classes, the list declares {ways}-way"
    if any(not isinstance(c, str) for c in e.classes):
        return "names a class that is not a string"
    if len(set(e.classes)) != len(e.classes):
        dup = next(c for c in e.classes if e.classes.count(c) > 1)
        return f"names class {dup} twice"
    if len(e.support) != ways or len(e.query) != ways:
        return f"has support/query ranks for {len(e.support)}/{len(e.query)} classes, not {ways}"
    for c, sup, qry in zip(e.classes, e.support, e.query):
        if len(sup) != shots:
            return f"has {len(sup)} support images of class {c}, the list declares {shots}-shot"
        if len(qry) != queries:
            return f"has {len(qry)} query images of class {c}, the list declares {queries} queries"
        for r in sup + qry:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                return f"has rank {r!r} for class {c}: ranks must be non-negative integers"
        if len(set(sup)) != len(sup) or len(set(qry)) != len(qry):
            return f"repeats an image of class {c} within its support or query set"
        both = set(sup) & set(qry)
        if both:
            return f"uses image {min(both)} of class {c} as both support and query"
    return None


def generate_episode_list(
    dataset: str,
    class_names: Sequence[str],
    class_sizes: Sequence[int],
    split: str,
    ways: int,
    shots: int,
    queries: int,
    n_episodes: int,
    seed: int,
) -> EpisodeList:
    """Generate ``n_episodes`` episodes from one split with a seeded generator."""
    rng = np.random.default_rng(seed)
    eps = [sample_episode(rng, class_names, class_sizes, ways, shots, queries) for _ in range(n_episodes)]
    return EpisodeList(dataset, split, ways, shots, queries, seed, eps)


def episode_list_for_store(store: ImageStore, split: str, ways: int, shots: int, queries: int, n: int, seed: int) -> EpisodeList:
    """Generate an episode list from the classes of ``split`` in ``store``."""
    classes = store.classes_in_split(split)
    return generate_episode_list(
        store.name, [store.class_names[c] for c in classes], [store.class_size(c) for c in classes],
        split, ways, shots, queries, n, seed,
    )


def default_episode_path(dataset: str, split: str, ways: int, shots: int, queries: int = 15, n: int = 600, seed: int = 0) -> Path:
    """``episodes/<dataset>/<split>_<ways>w<shots>s<queries>q_<n>_seed<seed>.json``."""
    return EPISODES_DIR / dataset / f"{split}_{ways}w{shots}s{queries}q_{n}_seed{seed}.json"


def check_episodes_match_store(lst: EpisodeList, store: ImageStore) -> None:
    """Refuse an episode list naming classes or ranks the store does not have."""
    index = store.class_index()
    where = f"episode list {lst.path}" if lst.path else "episode list"
    for i, e in enumerate(lst.episodes):
        for name, sup, qry in zip(e.classes, e.support, e.query):
            if name not in index:
                raise DataError(
                    f"{where}: episode {i} names class {name}, which {store.name} does not have; "
                    f"use an episode list made for this dataset"
                )
            if store.class_splits[index[name]] != lst.split:
                raise DataError(f"{where}: episode {i} class {name} is not in split '{lst.split}' of {store.name}; "
                                f"use an episode list made for this dataset and split")
            size = store.class_size(index[name])
            if max(sup + qry) >= size:
                raise DataError(
                    f"{where}: episode {i} asks for image {max(sup + qry)} of class {name}, which has {size}; "
                    f"the list was made for a larger dataset"
                )


# ----------------------------------------------------------------------------- tensors
@dataclass
class EpisodeTensors:
    """Materialised episode.

    Attributes:
        support_x: ``(ways*shots, 3, H, W)`` float, normalised; on CPU in ``torch.channels_last``
            memory format by default (see :class:`Materialiser`).
        support_y: ``(ways*shots,)`` int64 in ``0..ways-1``, in the episode's shuffled order.
        query_x: ``(ways*queries, 3, H, W)``, shuffled likewise.
        query_y: ``(ways*queries,)``: the answers, for the harness to score with; never given
            to a method.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass
class StagedEpisode:
    """An episode gathered on the host, ready to be copied to the device (:meth:`Materialiser.stage`).

    Attributes:
        images: ``(n_support + n_query, H, W, 3)`` uint8 store images, support first, in the episode's
            presentation order; in pinned memory when the device is CUDA.
        support_y: ``(n_support,)`` int64 labels in ``0..ways-1`` (pinned likewise).
        query_y: ``(n_query,)`` int64 labels (pinned likewise).
        ways: classes of the episode (read from the labels before they became tensors).
        image_ids: ``(n_support + n_query,)`` int64 store indices of ``images``, row for row (None for a staged
            episode built by hand): what lets an evaluation embed an image drawn by many episodes once.
    """

    images: torch.Tensor
    support_y: torch.Tensor
    query_y: torch.Tensor
    ways: int = 0
    image_ids: Optional[np.ndarray] = None


class Materialiser:
    """Turns episodes into normalised float tensors on a device.

    uint8 images are gathered from the store in one fancy-index, converted once on the
    target device, resized (antialiased) only if ``image_size`` differs from the store's.

    The work is split in two stages, so an input pipeline can run the first one in a background
    thread (:mod:`fewshot_nsl.data.prefetch`): :meth:`gather` / :meth:`stage` read the store into host
    memory (pinned when the device is CUDA, so the copy can be asynchronous), :meth:`to_device` /
    :meth:`load` copy with ``non_blocking=True`` and normalise on the device. :meth:`images` and
    :meth:`__call__` run both. Neither stage draws random numbers, and :class:`Materialiser` holds no
    state that changes after construction, so one instance may serve a worker thread and the caller.

    Args:
        store: the image store.
        image_size: side of the square output images.
        device: where the tensors are made.
        channels_last: give the ``(n, 3, H, W)`` tensors the ``torch.channels_last`` memory
            format (NHWC in memory, the store's own layout), so that convolutions, batch norm and
            pooling run their faster channels-last CPU kernels (benchmarks/RESULTS.md: CNN-4
            evaluation about 2x faster on a 2-core CPU). Values are the same either way.
            ``None`` (default): on for CPU devices, off elsewhere.
    """

    def __init__(
        self, store: ImageStore, image_size: int, device: torch.device, channels_last: Optional[bool] = None
    ) -> None:
        self.store = store
        self.image_size = image_size
        self.device = torch.device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        #: host buffers in page-locked memory (asynchronous host-to-device copies): CUDA devices only
        self.pin_memory = self.device.type == "cuda"
        self.index = store.class_index()
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255.0
        # ``mean``/``std`` laid out as one ``(S, S, 3)`` image (S = image_size, the size of every output):
        # normalising NHWC memory against them runs vectorised (broadcasting a size-3 innermost channel
        # dimension does not). Built here, never later, so that concurrent calls share read-only state.
        s = image_size
        self._hwc = tuple(t.view(3).expand(s, s, 3).contiguous() for t in (self.mean, self.std))

    def _host_tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` as a host tensor, copied into pinned memory when the device is CUDA."""
        t = torch.from_numpy(array)
        return t.pin_memory() if self.pin_memory else t

    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """Store indices ``(n,)`` -> their uint8 images ``(n, H, W, 3)`` on the host (pinned for a CUDA device)."""
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to memory maps
        out = torch.empty((len(idx),) + tuple(self.store.image_shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        out.numpy()[order] = self.store.images[idx[order]]
        return out

    def to_device(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, H, W, 3)`` host images -> normalised ``(n, 3, image_size, image_size)`` float32 on the device.

        The copy is non-blocking (asynchronous from pinned memory): no host synchronisation.
        """
        src = raw.to(self.device, non_blocking=True)  # (n, H, W, 3) uint8
        # One pass converts to float in the wanted layout; normalise in place (same ops, same bits
        # as ``(x - mean) / std``): cheaper than normalising a strided view and then copying.
        if self.channels_last:
            x = torch.empty(src.shape, dtype=torch.float32, device=self.device)
            x.copy_(src)
            x = x.permute(0, 3, 1, 2)  # (n, 3, H, W), channels_last strides
        else:
            src = src.permute(0, 3, 1, 2)
            x = torch.empty(src.shape, dtype=torch.float32, device=self.device)
            x.copy_(src)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            x = x.contiguous(memory_format=fmt)
        if self.channels_last:
            mean, std = self._hwc
            x.permute(0, 2, 3, 1).sub_(mean).div_(std)  # the contiguous NHWC view, in place
            return x
        return x.sub_(self.mean).div_(self.std)

    def images(self, idx: np.ndarray) -> torch.Tensor:
        """Store indices ``(n,)`` -> normalised ``(n, 3, image_size, image_size)`` float32 on the device."""
        return self.to_device(self.gather(idx))

    def stage(self, episode: Episode) -> StagedEpisode:
        """The host stage of :meth:`__call__`: images and labels of ``episode`` in its presentation order
        (``episode.order``; class-major for a hand-built episode without one), on the host."""
        cls = [self.index[n] for n in episode.classes]
        s_idx = np.concatenate([self.store.index_of(c, r) for c, r in zip(cls, episode.support)])
        q_idx = np.concatenate([self.store.index_of(c, r) for c, r in zip(cls, episode.query)])
        s_lab = np.repeat(np.arange(episode.ways), [len(r) for r in episode.support])
        q_lab = np.repeat(np.arange(episode.ways), [len(r) for r in episode.query])
        if episode.order is not None:
            s_perm, q_perm = np.asarray(episode.order.support), np.asarray(episode.order.query)
            s_idx, s_lab, q_idx, q_lab = s_idx[s_perm], s_lab[s_perm], q_idx[q_perm], q_lab[q_perm]
        ids = np.concatenate([s_idx, q_idx]).astype(np.int64)
        return StagedEpisode(self.gather(ids), self._host_tensor(s_lab.astype(np.int64)),
                             self._host_tensor(q_lab.astype(np.int64)), int(s_lab.max()) + 1 if len(s_lab) else 0, ids)

    def load(self, staged: StagedEpisode) -> EpisodeTensors:
        """The device stage of :meth:`__call__`: non-blocking copies and normalisation on the device."""
        x = self.to_device(staged.images)
        n_support = len(staged.support_y)
        support_y = staged.support_y.to(self.device, non_blocking=True)
        query_y = staged.query_y.to(self.device, non_blocking=True)
        # the class count known on the host, so FewShotMethod.num_ways needs no device synchronisation
        support_y.episode_ways = query_y.episode_ways = staged.ways
        return EpisodeTensors(x[:n_support], support_y, x[n_support:], query_y)

    def __call__(self, episode: Episode) -> EpisodeTensors:
        """Images and labels of ``episode`` in its presentation order (``episode.order``;
        class-major for a hand-built episode without one), on the device."""
        return self.load(self.stage(episode))
