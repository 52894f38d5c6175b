"""Matching Networks (Vinyals et al., NeurIPS 2016) with full-context embeddings, as a plugin.

Support embeddings ``g`` are contextualised by a bidirectional LSTM over the support set
(``g(x_i) = g'(x_i) + h_fwd_i + h_bwd_i``); each query embedding ``f`` is refined by an attention
LSTM that reads the support set for ``processing_steps`` (K) steps; ``f = f'`` and ``g = g'`` with
``fce=False`` (no LSTMs). The two places where the published descriptions and the code behind the
NSL paper's 55.31 row (Ravi & Larochelle's run, ``twitter/meta-learning-lstm``) differ are options:

* ``scoring``: ``attention`` (Vinyals et al., Eq. 1): a query's probability of class ``c`` is the
  softmax-over-support cosine-attention mass on class ``c``; ``forward`` returns its log.
  ``summed_cosine`` (Ravi & Larochelle, ``model/baselines/matching-net.lua``): the logit of class
  ``c`` is the sum of the raw cosine similarities of its support items, fed to cross-entropy.
* ``fce_lstms``: ``suite``: the attention LSTM takes ``f'(x)`` as input and ``h + r`` as its hidden
  state (the width-keeping form of public PyTorch ports), bi-LSTM outputs aligned with their items,
  PyTorch's LSTM init. ``ravi`` (``model/baselines/FCE-embedding.lua``)::

      r_1 = mean_i g(x_i)
      h^_k, c_k = LSTM([f'(x), r_k], h_{k-1}, c_{k-1});  h_k = h^_k + f'(x)
      r_{k+1} = sum_i softmax_i(h_k . g(x_i)) g(x_i)

  (the concatenated input is Vinyals et al.'s concatenated state ``[h, r]``); support item ``i``
  gets the backward LSTM's ``i``-th output (which has read items ``S..S-i+1``, not ``S..i``: the
  source never re-reverses it); every LSTM weight starts at zero (their ``RecurrentLSTMNetwork``).

Ravi & Larochelle also clip the attention LSTM's gradient norm to 0.25 at every step
(``lstm_grad_clip``, applied in :meth:`MatchingNet.clip_gradients`) and put dropout 0.1 after each
conv block of the embedding (``dropout``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.errors import ConfigError
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method

SCORINGS = ("attention", "summed_cosine")
FCE_LSTMS = ("suite", "ravi")


def add_block_dropout(backbone: nn.Module, p: float) -> None:
    """Append ``nn.Dropout(p)`` to every block of ``backbone.blocks`` (after its pooling): Ravi & Larochelle's
    ``convLayer`` (``model/matching-net-classifier.lua``). No weights are added, so state dicts are unchanged.

    Raises:
        ConfigError: the backbone has no ``blocks`` made of ``nn.Sequential`` blocks (cnn4 and cnn9 have).
    """
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(b, nn.Sequential) for b in blocks):
        raise ConfigError(f"matchingnet dropout needs a backbone built of blocks (cnn4, cnn9); "
                          f"{type(backbone).__name__} has no `blocks` of nn.Sequential: set method_options.dropout: 0")
    for block in blocks:
        block.append(nn.Dropout(p))


@register_method("matchingnet")
class MatchingNet(FewShotMethod):
    """Matching Networks: cosine similarities of (context-embedded) queries and support images.

    Args:
        backbone: embedding network ``g' = f'`` (``(B, 3, H, W) -> (B, D)``).
        image_size: input side, to size the LSTMs (hidden size ``D``).
        fce: use full-context embeddings (the 55.31 row of the NSL paper's Table 6).
        processing_steps: K, steps of the query attention LSTM.
        attention_scale: multiplies the cosine similarities (both scorings; 1 in the paper and Ravi's code).
        scoring: ``attention`` (Vinyals et al., default) or ``summed_cosine`` (Ravi & Larochelle).
        fce_lstms: ``suite`` (default) or ``ravi``: the form of the FCE LSTMs (see the module docstring).
        lstm_grad_clip: clip the attention LSTM's gradient norm to this before every optimiser step (Ravi &
            Larochelle: 0.25); ``None``: no clipping. Needs ``fce``.
        dropout: dropout probability after each backbone block in training (Ravi & Larochelle: 0.1; 0: none).
    """

    training_stages = ("episodic",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        fce: bool = True,
        processing_steps: int = 10,
        attention_scale: float = 1.0,
        scoring: str = "attention",
        fce_lstms: str = "suite",
        lstm_grad_clip: Optional[float] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(backbone, image_size)
        self._check_options(fce, processing_steps, scoring, fce_lstms, lstm_grad_clip, dropout)
        dim = backbone.feature_dim(image_size)
        self.fce = fce
        self.processing_steps = processing_steps
        self.attention_scale = attention_scale
        self.scoring = scoring
        self.fce_lstms = fce_lstms
        self.lstm_grad_clip = lstm_grad_clip
        if fce:
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * dim if fce_lstms == "ravi" else dim, dim)
            if fce_lstms == "ravi":
                for p in (*self.support_lstm.parameters(), *self.query_cell.parameters()):
                    nn.init.zeros_(p)
        if dropout:
            add_block_dropout(backbone, dropout)
        self.support: Optional[torch.Tensor] = None  # (S, D) embeddings g(x_i)
        self.support_onehot: Optional[torch.Tensor] = None  # (S, ways)

    @classmethod
    def _check_options(cls, fce: bool, steps: int, scoring: str, fce_lstms: str, clip: Optional[float],
                       dropout: float) -> None:
        """Refuse bad options in one line each (:class:`ConfigError`)."""
        cls.check_choice("scoring", scoring, SCORINGS)
        cls.check_choice("fce_lstms", fce_lstms, FCE_LSTMS)
        if fce and steps < 1:
            raise ConfigError(f"matchingnet processing_steps must be at least 1 with fce, got {steps}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"matchingnet dropout must be in [0, 1), got {dropout}")
        if clip is not None and not clip > 0:
            raise ConfigError(f"matchingnet lstm_grad_clip must be positive (or null for none), got {clip}")
        if clip is not None and not fce:
            raise ConfigError("matchingnet lstm_grad_clip needs fce: true (it clips the attention LSTM); "
                              "set lstm_grad_clip: null or fce: true")

    # ------------------------------------------------------------------ full-context embeddings
    def embed_support(self, z: torch.Tensor) -> torch.Tensor:
        """``g``: ``(S, D)`` backbone features -> ``(S, D)`` context embeddings; ``(E, S, D)`` -> ``(E, S, D)`` for
        ``E`` episodes at once (each its own sequence of the bidirectional LSTM's batch)."""
        if not self.fce:
            return z
        episodes = z if z.dim() == 3 else z.unsqueeze(0)  # (E, S, D)
        out, _ = self.support_lstm(episodes)  # (E, S, 2D): forward and backward halves
        fwd, bwd = out.chunk(2, dim=-1)
        if self.fce_lstms == "ravi":  # item i gets the backward LSTM's i-th step (FCE-embedding.lua biLSTM)
            bwd = bwd.flip(-2)
        g = episodes + fwd + bwd
        return g if z.dim() == 3 else g[0]

    def embed_query(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``f``: ``(Q, D)`` features and ``(S, D)`` support embeddings -> ``(Q, D)``; or ``(E, Q, D)`` and
        ``(E, S, D)`` -> ``(E, Q, D)`` for ``E`` episodes at once (the attention cell runs on their ``E * Q`` rows,
        each query reads its own episode's support set)."""
        if not self.fce:
            return z
        h = torch.zeros_like(z)
        c = torch.zeros_like(z).flatten(0, -2)  # the cell's state, (rows, D)
        g_t = g.transpose(-1, -2)

        def cell(x: torch.Tensor, hidden: torch.Tensor, c: torch.Tensor):
            h_hat, c = self.query_cell(x.flatten(0, -2), (hidden.flatten(0, -2), c))
            return h_hat.view_as(z), c

        if self.fce_lstms == "ravi":
            r = g.mean(-2, keepdim=True).expand_as(z)  # r_1: the mean support embedding
            for _ in range(self.processing_steps):
                h_hat, c = cell(torch.cat([z, r], dim=-1), h, c)
                h = h_hat + z
                r = torch.softmax(h @ g_t, dim=-1) @ g  # (Q, D) read-out with the new state
            return h
        for _ in range(self.processing_steps):
            r = torch.softmax(h @ g_t, dim=-1) @ g  # (Q, D) read-out
            h_hat, c = cell(z, h + r, c)
            h = h_hat + z
        return h

    # ------------------------------------------------------------------ the two calls
    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.support = self.embed_support(self.backbone(support_x))
        self.support_onehot = F.one_hot(support_y, self.num_ways(support_y)).to(self.support.dtype)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> ``(Q, ways)`` logits: the log attention mass per class (``attention``) or the
        summed cosines per class (``summed_cosine``)."""
        f = self.embed_query(self.backbone(query_x), self.support)
        return self.class_scores(f, self.support, self.support_onehot)

    def class_scores(self, f: torch.Tensor, g: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Logits from query and support embeddings: ``(Q, D)``, ``(S, D)``, one-hot labels ``(S, ways)`` ->
        ``(Q, ways)``; or with a leading episode dimension ``E`` on all three -> ``(E, Q, ways)``."""
        cos = self.attention_scale * (F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).transpose(-1, -2))  # (Q, S)
        if self.scoring == "summed_cosine":
            return cos @ onehot
        return (torch.softmax(cos, dim=-1) @ onehot).clamp_min(1e-8).log()

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Always: nothing is trained per episode (the LSTMs run with the episodes as their batch)."""
        return True

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """The episode's images, features, embeddings and LSTM states (float32); the backbone runs in fixed chunks."""
        dim = self.backbone.feature_dim(image_size)
        return 4 * ((support + queries) * (3 * image_size**2 + 16 * dim) + 4 * queries * support)

    def image_embedding(self):
        """The backbone (frozen at test, dropout off in eval mode): each image is embedded once per evaluation;
        the full-context embeddings, which depend on the episode, come after (:meth:`evaluate_embedded`)."""
        return self.backbone

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """``E`` episodes at once from their images' features: the full-context embeddings of every episode side
        by side, then the class scores. ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``. Nothing is
        drawn from the RNG (dropout is off in eval mode; ``seeds`` unused)."""
        g = self.embed_support(support_f)  # (E, S, D)
        f = self.embed_query(query_f, g)  # (E, Q, D)
        return self.class_scores(f, g, F.one_hot(support_y, ways).to(g.dtype))

    # ------------------------------------------------------------------ training hooks
    def attention_lstm_parameters(self) -> List[nn.Parameter]:
        """The attention LSTM's parameters (empty without ``fce``)."""
        return list(self.query_cell.parameters()) if self.fce else []

    def clip_gradients(self) -> None:
        """Clip the attention LSTM's gradient norm to ``lstm_grad_clip`` (Ravi & Larochelle, ``FCE-embedding.lua``
        ``model.df``: after every backward, before the optimiser), when set. Their clip of ``grads.biLSTM`` names
        no parameters (the keys are ``biLSTMForward`` / ``biLSTMBackward``) and clips nothing: not modelled."""
        if self.lstm_grad_clip is not None:
            grads = [p for p in self.attention_lstm_parameters() if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.lstm_grad_clip)
