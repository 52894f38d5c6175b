"""Matching Networks (Vinyals et al., NeurIPS 2016) with full-context embeddings, as a plugin.

Support embeddings ``g`` are contextualised by a bidirectional LSTM over the support set
(``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)``); each query embedding ``f`` is refined by an
attention LSTM that reads the support set for ``processing_steps`` (K) steps::

    r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)
    h^_k, c_k = LSTM(f'(x), h_{k-1} + r_{k-1}, c_{k-1});   h_k = h^_k + f'(x)

(the paper concatenates ``[h, r]`` as the hidden state; like most public code we add them so
the state keeps the feature width). A query's probability of class ``c`` is the cosine-
attention mass on the support images of class ``c``; ``forward`` returns its log, so that
cross-entropy on the logits is the negative log-likelihood the paper trains. With
``fce=False``, ``f = f'`` and ``g = g'`` (no LSTMs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("matchingnet")
class MatchingNet(FewShotMethod):
    """Matching Networks: cosine attention over (context-embedded) support images.

    Args:
        backbone: embedding network ``g' = f'`` (``(B, 3, H, W) -> (B, D)``).
        image_size: input side, to size the LSTMs (hidden size ``D``).
        fce: use full-context embeddings (the 55.31 row of the NSL paper's Table 6).
        processing_steps: K, steps of the query attention LSTM.
        attention_scale: multiplies the cosine similarities before the softmax (1 in the paper).
    """

    training_stages = ("episodic",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        fce: bool = True,
        processing_steps: int = 10,
        attention_scale: float = 1.0,
    ) -> None:
        super().__init__(backbone, image_size)
        if fce and processing_steps < 1:
            from fewshot_nsl.errors import ConfigError

            raise ConfigError(f"matchingnet processing_steps must be at least 1 with fce, got {processing_steps}")
        dim = backbone.feature_dim(image_size)
        self.fce = fce
        self.processing_steps = processing_steps
        self.attention_scale = attention_scale
        if fce:
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(dim, dim)
        self.support: Optional[torch.Tensor] = None  # (S, D) embeddings g(x_i)
        self.support_onehot: Optional[torch.Tensor] = None  # (S, ways)

    def embed_support(self, z: torch.Tensor) -> torch.Tensor:
        """``g``: ``(S, D)`` backbone features -> ``(S, D)`` context embeddings."""
        if not self.fce:
            return z
        out, _ = self.support_lstm(z.unsqueeze(0))  # (1, S, 2D): forward and backward halves
        fwd, bwd = out[0].chunk(2, dim=-1)
        return z + fwd + bwd

    def embed_query(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``f``: ``(Q, D)`` features and ``(S, D)`` support embeddings -> ``(Q, D)``."""
        if not self.fce:
            return z
        h = torch.zeros_like(z)
        c = torch.zeros_like(z)
        for _ in range(self.processing_steps):
            r = torch.softmax(h @ g.T, dim=1) @ g  # (Q, D) read-out
            h_hat, c = self.query_cell(z, (h + r, c))
            h = h_hat + z
        return h

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.support = self.embed_support(self.backbone(support_x))
        self.support_onehot = F.one_hot(support_y, self.num_ways(support_y)).to(self.support.dtype)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> ``(Q, ways)`` log of the attention mass per class."""
        f = self.embed_query(self.backbone(query_x), self.support)
        cos = self.cosine_similarities(f, self.support)  # (Q, S)
        attention = torch.softmax(self.attention_scale * cos, dim=1)
        return (attention @ self.support_onehot).clamp_min(1e-8).log()
