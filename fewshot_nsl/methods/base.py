"""The one base class every few-shot method (built-in, baseline or plugin) derives from.

A method is an ``nn.Module`` around a backbone with two calls:

* ``fit_support(support_x, support_y)``: absorb the support set of an episode
  (``(ways*shots, 3, H, W)`` images, ``(ways*shots,)`` labels in ``0..ways-1``);
* ``forward(query_x) -> logits``: ``(n_query, 3, H, W)`` -> ``(n_query, ways)``, a real
  floating-point tensor (:meth:`FewShotMethod.logits_problem` says what the harness refuses).

A method is given support images, support labels and query images, each in the episode's own
shuffled order, and nothing else: never the query labels, and no order to read them from.

The harness evaluates under ``torch.no_grad()``; methods that adapt by gradient steps
open ``torch.enable_grad()`` inside ``fit_support`` themselves. Episodic training uses
:meth:`FewShotMethod.loss`, which calls the same ``fit_support``/``forward`` (no copy of
the forward code).

Class attributes declare how a method is trained:

* ``training_stages``: ordered subset of ``("pretrain", "episodic")``. ``pretrain`` trains
  ``pretrain_module()`` plus a linear head on all base classes (cached and shared between
  methods with the same backbone/conv config); ``episodic`` meta-trains on base-class episodes.
* ``default_conv``: the conv spec (see :func:`fewshot_nsl.nn.make_conv_factory`) the backbone
  is built with; ``{}`` means plain ``nn.Conv2d``.
* ``compilable``: whether ``--compile`` may ``torch.compile`` the backbone (:mod:`fewshot_nsl.compiling`);
  ``False`` for the methods whose inner loop rebuilds the network every step (``higher``, learn2learn).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..errors import ConfigError, MethodError


class FewShotMethod(nn.Module):
    """Base class. Subclasses implement :meth:`fit_support` and :meth:`forward`.

    Args:
        backbone: feature extractor (``forward`` -> ``(B, D)``, ``forward_map`` -> ``(B, C, h, w)``).
        image_size: side of the square input images, used to size heads.
    """

    training_stages: ClassVar[Tuple[str, ...]] = ("episodic",)
    default_conv: ClassVar[Dict[str, Any]] = {}
    compilable: ClassVar[bool] = True
    #: Options that change the module pretraining starts from (e.g. a re-initialised backbone): set to other than
    #: their default, they join the pretraining cache key (:func:`fewshot_nsl.training_state.pretraining_options`).
    pretraining_options: ClassVar[Tuple[str, ...]] = ()
    #: Whether a query's prediction depends on the other queries of its episode (e.g. BN normalising the query
    #: batch with its own statistics at test): such rows are marked transductive in every table. A method whose
    #: options decide it overrides :meth:`is_transductive` (and may set the attribute on the instance).
    transductive: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, image_size: int = 84) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size

    @classmethod
    def is_transductive(cls, options: Mapping[str, Any]) -> bool:
        """Whether a run with these ``method_options`` is transductive (the class's :attr:`transductive`)."""
        return bool(cls.transductive)

    @classmethod
    def stages(cls, options: Mapping[str, Any]) -> Tuple[str, ...]:
        """Training stages of a run with these ``method_options``: ``training_stages``, with the
        cached base-class pretraining put first when an episodic method that accepts the option
        ``pretrained_backbone`` is given ``pretrained_backbone: true``.

        Override when another option changes how the method is trained.
        """
        if options.get("pretrained_backbone") and "pretrain" not in cls.training_stages:
            return ("pretrain",) + tuple(cls.training_stages)
        return cls.training_stages

    # ------------------------------------------------------------------ the two calls
    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Absorb an episode's support set: ``(S, 3, H, W)``, ``(S,)`` int64 in ``0..ways-1``."""
        raise NotImplementedError

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Classify queries: ``(Q, 3, H, W)`` -> logits ``(Q, ways)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ batched evaluation (optional)
    def supports_batched_evaluation(self) -> bool:
        """Whether the harness may evaluate this instance many episodes at a time through
        :meth:`evaluate_episodes` (``False`` by default: ``fit_support`` / ``forward`` per episode, the path
        every plugin keeps). A method whose options decide it overrides this."""
        return False

    def evaluate_episodes(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        seeds: Sequence[int],
        ways: int,
    ) -> torch.Tensor:
        """Logits of ``E`` episodes at once, under ``torch.no_grad()`` in eval mode (a method that trains something
        per episode opens ``torch.enable_grad()`` itself).

        The contract: ``result[e]`` equals, up to floating-point rounding, the logits ``forward(query_x[e])``
        returns after ``fit_support(support_x[e], support_y[e])`` with the torch RNG seeded by ``seeds[e]``
        (:func:`~fewshot_nsl.methods.batched.seed_torch`): each episode keeps its own random stream
        (:func:`~fewshot_nsl.methods.batched.replay_draws`). :meth:`evaluate_one_by_one` runs exactly that, one
        episode after another (the reference). This default: :meth:`evaluate_embedded` of the images' embeddings
        where the method declares :meth:`supports_batched_evaluation` and an :meth:`image_embedding`, otherwise
        :meth:`evaluate_one_by_one`; a method with another batched computation overrides it
        (:mod:`fewshot_nsl.methods.batched`).

        Args:
            support_x: ``(E, S, 3, H, W)`` support images of the episodes, each in its episode's shuffled order.
            support_y: ``(E, S)`` int64 labels in ``0..ways-1``.
            query_x: ``(E, Q, 3, H, W)`` query images.
            seeds: the ``E`` episodes' seeds.
            ways: classes per episode (the same for every episode of the batch).

        Returns:
            ``(E, Q, ways)`` logits of a real floating-point dtype.
        """
        embed = self.image_embedding() if self.supports_batched_evaluation() else None
        if embed is None:
            return self.evaluate_one_by_one(support_x, support_y, query_x, seeds, ways)
        from .batched import episode_features

        return self.evaluate_embedded(episode_features(embed, support_x), support_y,
                                      episode_features(embed, query_x), seeds, ways)

    def evaluate_one_by_one(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                            seeds: Sequence[int], ways: int) -> torch.Tensor:
        """:meth:`evaluate_episodes` one episode after another, exactly as the harness's per-episode path runs them:
        the RNG seeded with ``seeds[e]``, ``fit_support``, ``forward`` (the reference every batched path is tested
        against). Same arguments and result."""
        from .batched import seed_torch

        out = []
        for e, seed in enumerate(seeds):
            seed_torch(int(seed), support_x.device)
            labels = support_y[e]
            labels.episode_ways = ways  # type: ignore[attr-defined]
            self.fit_support(support_x[e], labels)
            out.append(self(query_x[e]))
        return torch.stack(out)

    def image_embedding(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Optional, with :meth:`evaluate_embedded`: the function ``(N, 3, H, W) -> (N, *F)`` that the batched path
        applies to every support and query image, for a method where it depends on the image alone (a network
        frozen at test, in eval mode: running BN statistics, no dropout, no random draws, rows independent).

        The harness then embeds each distinct image of an evaluation once, however many episodes draw it (on
        Mini-ImageNet's test split 600 five-shot episodes draw each image about 5 times, on glyphs about 38), and
        calls :meth:`evaluate_embedded` with the episodes' embeddings. ``None`` (default): the images go to
        :meth:`evaluate_episodes`. Only consulted where :meth:`supports_batched_evaluation` is ``True``.
        """
        return None

    def evaluate_embedded(self, support_f: torch.Tensor, support_y: torch.Tensor, query_f: torch.Tensor,
                          seeds: Sequence[int], ways: int) -> torch.Tensor:
        """:meth:`evaluate_episodes` from the episodes' embedded images (:meth:`image_embedding`), same contract.

        Args:
            support_f: ``(E, S, *F)`` embeddings of the support images, in the episodes' shuffled order.
            support_y: ``(E, S)`` int64 labels in ``0..ways-1``.
            query_f: ``(E, Q, *F)`` embeddings of the query images.
            seeds: the ``E`` episodes' seeds.
            ways: classes per episode.

        Returns:
            ``(E, Q, ways)`` logits.
        """
        raise NotImplementedError(f"{type(self).__name__} returns an image_embedding but has no evaluate_embedded")

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """Memory (bytes) one episode of :meth:`evaluate_episodes` holds at its peak, for the automatic
        ``eval.batch_episodes``. Default: every layer's activations of all the episode's images, three times
        (values, gradients, optimiser state: a method that trains the network per episode); a method that
        keeps only features overrides it with less."""
        from .batched import activation_bytes_per_image

        return 3 * (support + queries) * activation_bytes_per_image(self.backbone, image_size)

    # ------------------------------------------------------------------ training hooks
    def loss(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> torch.Tensor:
        """Episodic training loss (scalar): cross-entropy of ``forward`` after ``fit_support``.

        Raises:
            MethodError: ``forward`` returned logits of a complex, boolean or integer dtype.
        """
        self.fit_support(support_x, support_y)
        logits = self(query_x)
        if isinstance(logits, torch.Tensor) and not logits.dtype.is_floating_point:
            raise MethodError(f"method {self.display_name()} returned logits of dtype {logits.dtype} from forward in "
                              f"training; {self.LOGITS_DTYPE}; fix the method")
        return F.cross_entropy(logits, query_y)

    def pretrain_module(self) -> nn.Module:
        """The module trained with a linear head on all base classes (``(B,3,H,W)`` -> ``(B,D)``)."""
        return self.backbone

    def clip_groups(self) -> List[List[nn.Parameter]]:
        """Parameter groups whose gradient norms ``episodic.grad_clip`` clips separately (one group by default)."""
        return [list(self.parameters())]

    def clip_gradients(self) -> None:
        """Called by episodic training after the meta-batch's backward (and the regularisation's), before
        ``episodic.grad_clip``'s norm clipping and the optimiser step: a method clips its own gradients here
        where its source does so in its own way (no-op by default), e.g. Finn et al.'s MAML clips every
        meta-gradient element to +-10, Ravi & Larochelle's MatchingNet the attention LSTM's norm to 0.25."""

    def after_pretrain(self) -> None:
        """Called once the pretrained weights are loaded (e.g. to wrap convs as NSConv2d)."""

    def fit_base(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Use the base classes (no-op by default). Called by the harness for a method whose stages include
        ``pretrain``, after the pretrained weights are trained or loaded (before :meth:`after_pretrain`), on every
        run and resume, only where a method overrides it: SimpleShot centres on the base-class mean, Baseline++
        could initialise from base-class statistics (``examples/simpleshot/`` is a plugin that uses it).

        Args:
            features: ``(N, D)`` float32 features of every base-class (``train`` split) training image from the
                pretrained ``pretrain_module()`` in eval mode, without augmentation (cached with the pretraining).
            labels: ``(N,)`` int64 base-class labels in ``0..n_base_classes-1``.

        State kept here should be a buffer or parameter, so that it travels in ``method.pt``.
        """

    def regularization(self) -> torch.Tensor:
        """Extra loss term added during training (0 by default)."""
        p = next(self.parameters())
        return p.new_zeros(())

    @classmethod
    def display_name(cls) -> str:
        """The name the method is registered under (its class name if it is not registered), for messages."""
        return getattr(cls, "registered_name", cls.__name__)

    @classmethod
    def check_choice(cls, option: str, value: Any, choices: Sequence[str]) -> None:
        """Refuse an option value outside ``choices``, in one line naming the method, the option and the choices.

        Raises:
            ConfigError: ``value not in choices``.
        """
        if value not in choices:
            raise ConfigError(f"{cls.display_name()} {option} must be one of {', '.join(choices)}, got {value!r}")

    #: What :meth:`logits_problem` expects of a logits dtype (messages).
    LOGITS_DTYPE: ClassVar[str] = ("expected a real floating-point dtype (e.g. torch.float32): complex, boolean and "
                                   "integer scores are not logits")

    @classmethod
    def logits_problem(cls, logits: Any, n_query: int, ways: int) -> Optional[Tuple[str, str]]:
        """What is wrong with a ``forward`` result the harness is to score, or None.

        Logits must be a tensor ``(n_query, ways)`` of a real floating-point dtype (float16,
        bfloat16, float32, float64): a complex tensor has no order for ``argmax``, and boolean
        or integer scores tie (the first class would win every tie), so they are refused rather
        than scored.

        Returns:
            ``(what was returned, what was expected)``, e.g. ``("logits of shape (1, 5)",
            "expected (n_query, ways) = (15, 5)")``; None for acceptable logits.
        """
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n_query, ways):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            return f"logits of shape {got}", f"expected (n_query, ways) = ({n_query}, {ways})"
        if not logits.dtype.is_floating_point:  # False for complex, bool and integer dtypes
            return f"logits of dtype {logits.dtype}", cls.LOGITS_DTYPE
        return None

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def num_ways(support_y: torch.Tensor) -> int:
        """Classes of an episode: ``max(support_y) + 1`` (labels are ``0..ways-1``).

        The harness's label tensors carry the count (attribute ``episode_ways``, set by
        :class:`~fewshot_nsl.data.episodes.Materialiser` from the host copy), so reading it costs no device
        synchronisation; any other tensor is read on the device.
        """
        ways = getattr(support_y, "episode_ways", None)
        if ways is not None:
            return int(ways)
        return int(support_y.max().item()) + 1

    @staticmethod
    def class_sums(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """Per-class sums: ``(S, *F)`` features (vectors ``(S, D)`` or maps ``(S, C, h, w)``),
        ``(S,)`` labels in ``0..ways-1`` -> ``(ways, *F)``."""
        return features.new_zeros(ways, *features.shape[1:]).index_add_(0, labels, features)

    @classmethod
    def class_means(cls, features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """Per-class means (prototypes): ``(S, *F)`` features, ``(S,)`` labels -> ``(ways, *F)``
        (a class without examples gets zeros).

        The counts are an ``index_add_`` of ones, like the sums: ``torch.bincount`` would read the labels' min and
        max on the host (two synchronisations of a CUDA device per call)."""
        ones = torch.ones(labels.shape, dtype=torch.long, device=labels.device)
        counts = torch.zeros(ways, dtype=torch.long, device=labels.device).index_add_(0, labels, ones)
        counts = counts.clamp_min(1).to(features.dtype)
        return cls.class_sums(features, labels, ways) / counts.view(-1, *([1] * (features.dim() - 1)))

    @staticmethod
    def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances: ``(A, D)``, ``(B, D)`` -> ``(A, B)``."""
        return torch.cdist(a, b).pow(2)

    @staticmethod
    def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarities: ``(A, D)``, ``(B, D)`` -> ``(A, B)`` in ``[-1, 1]``."""
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
