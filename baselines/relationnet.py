"""Relation Networks (Sung et al., CVPR 2018), as a plugin.

The backbone's feature maps of a query and of a class (K-shot: the sum of the class's
support maps, as in the paper) are concatenated along channels and scored by a relation
module: two conv blocks (3x3 conv, BN, ReLU, 2x2 max-pool) and two fully connected layers
(hidden width 8, ReLU, sigmoid output). Training regresses the scores onto one-hot targets
with mean squared error.

Sung et al.'s own network is ``backbone_options: {filters: 64, pool: [true, true, false, false],
padding: [0, 0, 1, 1]}`` (64x19x19 maps at 84 px) with ``relation_padding: 0, relation_ceil: false``
(their relation convs are unpadded and pool 17 -> 8 -> 6 -> 3). The defaults suit the suite's fully
pooled CNN-4 (5x5 maps at 84x84, 1x1 at small sizes): padded relation convs, ceil-mode pooling,
skipped where the map is already 1 pixel wide. Sung et al. clip the gradient norm of the encoder
and of the relation module separately (0.5): :meth:`RelationNet.clip_groups` gives those two groups.

Two settings of Sung et al.'s code are options (``floodsung/LearningToCompare_FSL``, ``miniimagenet/``):

* ``test_bn``: their BN layers are built with ``momentum=1`` and the test script never calls ``.eval()``,
  so a test episode is normalised with its own batch statistics: the support set as one batch, the
  queries as another, the (query, class) pairs in the relation module as a third. ``test_bn: batch``
  does that at test (the harness evaluates in eval mode: the method switches its BN layers to batch
  statistics itself, without touching the running statistics). A row run so is **transductive**: a
  query's score depends on the other queries of its episode (:attr:`RelationNet.transductive`).
  ``running`` (default): the running statistics of training, the usual inductive protocol.
* ``encoder_init``: their ``weights_init`` is applied to the encoder and the relation module alike
  (``sung``); ``default`` keeps PyTorch's init for the encoder. The relation module always gets it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.backbones import dry_run
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.methods.batched import batching_pays, feature_chunk_images
from fewshot_nsl.registry import register_method


def sung_init(m: nn.Module) -> None:
    """Sung et al.'s initialisation (their ``weights_init``): He-normal convs (fan-out), unit BN, and
    fully connected layers with N(0, 0.01) weights and biases of 1, which keeps the 8 hidden ReLUs
    alive at the start (with PyTorch's default init the scores tend to collapse to a constant 1/ways)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        if m.bias is not None:  # the suite's backbone convs have none (BN follows)
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.ones_(m.bias)


TEST_BNS = ("running", "batch")
ENCODER_INITS = ("default", "sung")


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer of ``module`` normalises with the statistics of its current batch, in eval mode
    too, and updates nothing: the running statistics are set aside (a BN layer without them uses batch
    statistics, PyTorch's documented ``track_running_stats=False`` behaviour) and put back afterwards."""
    saved = [(bn, bn.running_mean, bn.running_var) for bn in module.modules()
             if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None]
    try:
        for bn, _, _ in saved:
            bn.running_mean, bn.running_var = None, None
        yield
    finally:
        for bn, mean, var in saved:
            bn.running_mean, bn.running_var = mean, var


def group_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group: int) -> torch.Tensor:
    """``bn`` applied to ``x`` ``(G * group, C, *spatial)`` with every consecutive ``group`` rows normalised by
    their own batch statistics, as :func:`batch_statistics` normalises one batch of ``group`` rows; nothing is
    updated. One ``F.batch_norm`` in training mode (without running statistics) on the groups laid side by side as
    channels, ``(group, G * C, *spatial)``: the per-group arithmetic of the per-episode path.

    Raises:
        ValueError: the batch is not a whole number of groups.
    """
    if x.shape[0] % group:
        raise ValueError(f"group_batch_norm: a batch of {x.shape[0]} rows is not a multiple of groups of {group}")
    g, rest = x.shape[0] // group, x.shape[1:]
    side_by_side = x.reshape(g, group, *rest).transpose(0, 1).reshape(group, g * rest[0], *rest[1:])
    weight = bn.weight.repeat(g) if bn.weight is not None else None
    bias = bn.bias.repeat(g) if bn.bias is not None else None
    y = F.batch_norm(side_by_side, None, None, weight, bias, True, 0.0, bn.eps)
    return y.reshape(group, g, *rest).transpose(0, 1).reshape(x.shape)


@contextmanager
def group_batch_statistics(module: nn.Module, group: int) -> Iterator[None]:
    """Every BatchNorm layer of ``module`` normalises each consecutive ``group`` rows of its batch with their own
    statistics (:func:`group_batch_norm`; forward hooks replace the layer's output and are removed afterwards):
    ``G`` episodes stacked episode-major get, episode by episode, what :func:`batch_statistics` gives one episode's
    batch of ``group`` rows. Nothing is updated (the layers stay in eval mode)."""
    def hook(bn: nn.Module, inputs, _output) -> torch.Tensor:
        return group_batch_norm(bn, inputs[0], group)

    handles = [bn.register_forward_hook(hook) for bn in module.modules()
               if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class RelationBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 2x2 max-pool (skipped on 1-pixel maps).

    Args:
        cin: input channels.
        cout: output channels.
        padding: conv zero padding (1 by default; Sung et al.: 0).
        ceil: ceil-mode pooling (default; Sung et al.: floor).
    """

    def __init__(self, cin: int, cout: int, padding: int = 1, ceil: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=padding)
        self.bn = nn.BatchNorm2d(cout)
        self.ceil = ceil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, cin, h, w)`` -> ``(B, cout, h', w')``, ``h' = round((h + 2 padding - 2) / 2)`` (ceil or floor)."""
        x = F.relu(self.bn(self.conv(x)))
        if min(x.shape[-2:]) >= 2:
            x = F.max_pool2d(x, 2, ceil_mode=self.ceil)
        return x


@register_method("relationnet")
class RelationNet(FewShotMethod):
    """RelationNet: a learned relation module scores (query, class) feature-map pairs in [0, 1].

    Args:
        backbone: embedding network (``forward_map`` -> ``(B, C, h, w)``).
        image_size: input side, to size the fully connected layers.
        relation_channels: width of the relation convs (default: the backbone's ``C``, as Sung et al.).
        hidden: width of the first fully connected layer (8 in the paper).
        pretrained_backbone: start the embedding from the suite's cached base-class pretraining
            (the same one the finetune and NSN methods use) instead of from scratch, then train
            episodically as usual. Sung et al. train from scratch (``False``, the default).
        relation_padding: zero padding of the relation convs (Sung et al.: 0).
        relation_ceil: ceil-mode pooling in the relation blocks (Sung et al.: floor, ``False``).
        test_bn: ``running`` (default) or ``batch``: BN statistics at test (Sung et al.: ``batch``, transductive).
        encoder_init: ``default`` (PyTorch's) or ``sung`` (Sung et al.'s ``weights_init``) for the encoder.

    Attributes:
        transductive: whether test predictions depend on the other queries of the episode (``test_bn: batch``).
    """

    training_stages = ("episodic",)
    transductive: bool = False  # the class default; an instance says what its test_bn makes it
    #: ``encoder_init: sung`` re-initialises the backbone that a ``pretrained_backbone`` pretraining starts from: its
    #: own pretraining (:func:`fewshot_nsl.training_state.pretraining_options`), not the built-ins' shared one.
    pretraining_options = ("encoder_init",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        relation_channels: Optional[int] = None,
        hidden: int = 8,
        pretrained_backbone: bool = False,
        relation_padding: int = 1,
        relation_ceil: bool = True,
        test_bn: str = "running",
        encoder_init: str = "default",
    ) -> None:
        super().__init__(backbone, image_size)
        self.check_choice("test_bn", test_bn, TEST_BNS)
        self.check_choice("encoder_init", encoder_init, ENCODER_INITS)
        self.test_bn = test_bn
        self.transductive = self.is_transductive({"test_bn": test_bn})
        c = backbone.out_channels
        width = relation_channels or c
        self.blocks = nn.Sequential(
            RelationBlock(2 * c, width, relation_padding, relation_ceil),
            RelationBlock(width, width, relation_padding, relation_ceil),
        )
        for name, value, low in (("hidden", hidden, 1), ("relation_channels", relation_channels, 1),
                                 ("relation_padding", relation_padding, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"relationnet: {name} must be an integer of at least {low}, got {value!r}")
        side = self._map_side(backbone, image_size)
        with torch.no_grad():  # size of the relation blocks' output map, by a dry run in eval mode
            self.blocks.eval()
            try:
                flat = self.blocks(torch.zeros(1, 2 * c, side, side)).numel()
            except RuntimeError:  # an unpadded 3x3 conv on a map smaller than 3x3
                raise ConfigError(
                    f"relationnet: the backbone's {side}x{side} feature map at {image_size} px is too small for two "
                    f"3x3 relation convs with padding {relation_padding}; use a larger --image-size or "
                    f"method_options.relation_padding: 1"
                ) from None
            self.blocks.train()
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.blocks.apply(sung_init)
        self.fc.apply(sung_init)
        if encoder_init == "sung":  # feature_encoder.apply(weights_init) in Sung et al.'s train scripts
            self.backbone.apply(sung_init)
        self.prototypes: Optional[torch.Tensor] = None  # (ways, C, h, w) summed support maps

    @staticmethod
    def _map_side(backbone, image_size: int) -> int:
        """Side ``h`` of the backbone's (square) feature map for ``image_size`` inputs."""
        return int(dry_run(backbone, backbone.forward_map, image_size).shape[-1])

    @classmethod
    def is_transductive(cls, options: Mapping[str, Any]) -> bool:
        """Whether a run with these ``method_options`` is transductive (``test_bn: batch``), for tables."""
        return options.get("test_bn", "running") == "batch"

    @contextmanager
    def _test_statistics(self, group: Optional[int] = None) -> Iterator[None]:
        """At test (eval mode) with ``test_bn: batch``, BN uses the current batch's statistics (with ``group``: those
        of each consecutive ``group`` rows, one episode's batch, :func:`group_batch_statistics`); else nothing."""
        if self.test_bn == "batch" and not self.training:
            with batch_statistics(self) if group is None else group_batch_statistics(self, group):
                yield
        else:
            yield

    def clip_groups(self):
        """Encoder and relation module, clipped separately (Sung et al. clip each network's norm to 0.5)."""
        return [list(self.backbone.parameters()), list(self.blocks.parameters()) + list(self.fc.parameters())]

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Class maps ``(ways, C, h, w)``: the sums of the support maps (the support set is one BN batch)."""
        with self._test_statistics():
            maps = self.backbone.forward_map(support_x)  # (S, C, h, w)
        ways = self.num_ways(support_y)
        self.prototypes = self.class_sums(maps, support_y, ways)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> relation scores ``(Q, ways)`` in ``[0, 1]`` (the queries are one BN batch, their
        pairs with the classes another)."""
        with self._test_statistics():
            q = self.backbone.forward_map(query_x)  # (Q, C, h, w)
            n_q, ways = q.shape[0], self.prototypes.shape[0]
            pairs = torch.cat(
                [q.unsqueeze(1).expand(-1, ways, -1, -1, -1),
                 self.prototypes.unsqueeze(0).expand(n_q, -1, -1, -1, -1)],
                dim=2,
            ).flatten(0, 1)  # (Q * ways, 2C, h, w)
            scores = torch.sigmoid(self.fc(self.blocks(pairs).flatten(1)))
        return scores.view(n_q, ways)

    # ------------------------------------------------------------------ batched evaluation
    #: Batch episodes on a CPU too (off by default: on the 2-core CPU, 42 px 5-shot, 1 thread, the batched evaluation
    #: took 1.72x the per-episode time, and 1.42x in the quick grid at 2 threads; the relation module's pair batches
    #: are already large). The equivalence tests set it.
    batched_on_cpu: bool = False

    def supports_batched_evaluation(self) -> bool:
        """On accelerators (with ``test_bn: batch`` each episode's BN batches keep their own statistics); on a CPU
        only with :attr:`batched_on_cpu` (:func:`~fewshot_nsl.methods.batched.batching_pays`)."""
        return batching_pays(self, self.batched_on_cpu)

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """The episode's images, feature maps and class maps (float32); the backbone and the relation module run in
        chunks of whole episodes of bounded size."""
        map_numel = int(dry_run(self.backbone, self.backbone.forward_map, image_size)[0].numel())
        return 4 * ((support + queries) * 3 * image_size**2 + (2 * support + queries) * map_numel + 2 * queries * support)

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways) -> torch.Tensor:
        """``E`` episodes at once: feature maps of all their images, every episode's class maps, then the relation
        module on every (query, class) pair. Each network runs on chunks of whole episodes; with ``test_bn: batch``
        each episode's support set, query set and pairs are normalised with their own statistics, as in the
        per-episode path. ``(E, S, 3, H, W)``, ``(E, S)``, ``(E, Q, 3, H, W)`` -> ``(E, Q, ways)``. Nothing is drawn
        from the RNG (``seeds`` unused)."""
        e, n_s, n_q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        image_numel = support_x[0, 0].numel()
        dev = support_x.device
        maps = self._by_episodes(lambda sl: self.backbone.forward_map(support_x[sl].flatten(0, 1)), e, n_s,
                                 image_numel, dev)  # (E, S, C, h, w)
        labels = support_y + ways * torch.arange(e, device=support_y.device).unsqueeze(1)  # (E, S): class of E*ways
        prototypes = self.class_sums(maps.flatten(0, 1), labels.flatten(), e * ways).view(e, ways, *maps.shape[2:])
        q = self._by_episodes(lambda sl: self.backbone.forward_map(query_x[sl].flatten(0, 1)), e, n_q,
                              image_numel, dev)  # (E, Q, C, h, w)

        def relation(sl: slice) -> torch.Tensor:
            qs, ps = q[sl], prototypes[sl]  # (e', Q, C, h, w), (e', ways, C, h, w)
            pairs = torch.cat([qs.unsqueeze(2).expand(-1, -1, ways, -1, -1, -1),
                               ps.unsqueeze(1).expand(-1, n_q, -1, -1, -1, -1)], dim=3)  # (e', Q, ways, 2C, h, w)
            return torch.sigmoid(self.fc(self.blocks(pairs.flatten(0, 2)).flatten(1)))  # (e' * Q * ways, 1)

        scores = self._by_episodes(relation, e, n_q * ways, 2 * q[0, 0].numel(), dev)
        return scores.view(e, n_q, ways)

    def _by_episodes(self, fn: Callable[[slice], torch.Tensor], episodes: int, rows: int, row_numel: int,
                     device: torch.device) -> torch.Tensor:
        """``fn`` over chunks of whole episodes, each chunk's BN statistics per episode (``test_bn: batch``).

        Args:
            fn: maps a slice of the episodes (``e'`` of them) to ``(e' * rows, *F)``, episode-major.
            episodes: ``E``.
            rows: rows per episode (one BN batch of the per-episode path).
            row_numel: elements of one input row, to bound a chunk's input like
                :func:`~fewshot_nsl.methods.batched.feature_chunk_images` images bound the backbone's.

        Returns:
            ``(E, rows, *F)``.
        """
        per_chunk = max(1, feature_chunk_images(device) * 3 * self.image_size**2 // max(1, rows * row_numel))
        out = []
        for start in range(0, episodes, per_chunk):
            with self._test_statistics(group=rows):
                y = fn(slice(start, start + per_chunk))
            out.append(y.view(-1, rows, *y.shape[1:]))
        return torch.cat(out)

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Mean squared error between relation scores and one-hot query labels."""
        self.fit_support(support_x, support_y)
        scores = self(query_x)
        return F.mse_loss(scores, F.one_hot(query_y, scores.shape[1]).to(scores.dtype))
