"""Embed each distinct image of an evaluation once (:class:`EmbeddingCache`), for methods whose batched path starts
by applying a per-image function to every support and query image (:meth:`FewShotMethod.image_embedding`).

An evaluation's episodes draw from one split: 600 five-shot 5-way episodes with 15 queries make 60,000 draws, from
12,000 test images on Mini-ImageNet (each drawn about 5 times) and about 1,600 on glyphs (about 38 times). A frozen
network's features of an image are the same in every episode that draws it, so computing them per draw repeats the
costliest part of the evaluation. The cache keeps the embeddings by store index on the evaluation's device; for each
batch of episodes it embeds only the images it has not seen (taken from the batch's own materialised images) and
gathers every episode's ``(S, *F)`` and ``(Q, *F)`` rows. Its size is bounded (:data:`CACHE_BUDGET_FRACTION` of the
evaluation's memory budget); when full it starts again, so it never holds more than the bound.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .methods.batched import feature_chunk_images, memory_budget

#: Share of the evaluation's memory budget (:func:`~fewshot_nsl.methods.batched.memory_budget`) the cache may hold.
CACHE_BUDGET_FRACTION = 0.25


class EmbeddingCache:
    """Embeddings of store images by index, for one evaluation.

    Args:
        embed: ``(N, 3, H, W) -> (N, *F)``, rows independent (the method's :meth:`image_embedding`).
        n_images: images in the store (indices are ``0..n_images-1``).
        device: the evaluation's device (where its memory budget is read).
        budget_bytes: most bytes of embeddings held (default: :data:`CACHE_BUDGET_FRACTION` of the memory budget);
            a single batch whose distinct images need more gets them all the same.
    """

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], n_images: int, device: torch.device,
                 budget_bytes: Optional[int] = None) -> None:
        self.embed = embed
        self.budget_bytes = int(budget_bytes if budget_bytes is not None
                                else CACHE_BUDGET_FRACTION * memory_budget(torch.device(device)))
        self.slot = np.full(int(n_images), -1, dtype=np.int64)  # store index -> row of self.rows; -1: not held
        self.rows: Optional[torch.Tensor] = None  # (capacity, *F), rows 0..used-1 held
        self.used = 0
        #: image draws served, images embedded (``served / embedded``: the factor of embedding work saved), restarts
        self.served = self.embedded = self.restarts = 0

    def _most(self, n: int, values: torch.Tensor) -> int:
        """Rows the budget allows for embeddings like ``values`` ``(M, *F)`` (at least ``n``; at most the store)."""
        return max(n, min(len(self.slot), self.budget_bytes // max(1, values[0].numel() * values.element_size())))

    def _add(self, ids: np.ndarray, values: torch.Tensor) -> None:
        """Hold ``values`` ``(M, *F)`` as the embeddings of the distinct store indices ``ids`` ``(M,)`` (none held), in
        the free rows or in rows grown by doubling up to the budget (:meth:`features` has made room)."""
        n = len(ids)
        if self.rows is not None and (self.rows.shape[1:] != values.shape[1:] or self.rows.dtype != values.dtype):
            raise RuntimeError(f"image_embedding returned {values.dtype} rows of shape {tuple(values.shape[1:])} after "
                               f"{self.rows.dtype} rows of shape {tuple(self.rows.shape[1:])}; an image's embedding "
                               f"must not depend on the call")
        if self.rows is None or self.used + n > len(self.rows):
            size = min(self._most(n, values), max(self.used + n, 2 * (0 if self.rows is None else len(self.rows))))
            grown = torch.empty((size, *values.shape[1:]), dtype=values.dtype, device=values.device)
            if self.used:
                grown[: self.used] = self.rows[: self.used]
            self.rows = grown
        self.rows[self.used:self.used + n] = values
        self.slot[ids] = np.arange(self.used, self.used + n)
        self.used += n

    def _embed_rows(self, support: torch.Tensor, query: torch.Tensor, pos: np.ndarray) -> torch.Tensor:
        """The embeddings of rows ``pos`` ``(M,)``, ascending, of the batch's images (support rows
        ``0..len(support)-1``, then query rows), in chunks of :func:`feature_chunk_images` images gathered one chunk
        at a time (the batch's images are not copied whole)."""
        chunk, n_s, parts = feature_chunk_images(support.device), len(support), []
        for k in range(0, len(pos), chunk):
            p = pos[k:k + chunk]
            s, q = p[p < n_s], p[p >= n_s] - n_s  # ascending: the support rows come first
            rows = [support[torch.as_tensor(s, device=support.device)]] if len(s) else []
            if len(q):
                rows.append(query[torch.as_tensor(q, device=query.device)])
            parts.append(self.embed(rows[0] if len(rows) == 1 else torch.cat(rows)))
        return torch.cat(parts)

    def features(self, support_x: torch.Tensor, query_x: torch.Tensor, support_ids: np.ndarray,
                 query_ids: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """The embeddings of a batch's images, embedding only those not held yet.

        Args:
            support_x: ``(E, S, 3, H, W)`` the batch's support images; ``query_x`` ``(E, Q, 3, H, W)``.
            support_ids: ``(E, S)`` their store indices (host); ``query_ids`` ``(E, Q)``.

        Returns:
            ``(E, S, *F)`` and ``(E, Q, *F)``: row for row the embeddings of the images.
        """
        e, s = support_ids.shape
        q, n_s = query_ids.shape[1], support_ids.size
        flat = np.concatenate([support_ids.reshape(-1), query_ids.reshape(-1)])
        unique, first = np.unique(flat, return_index=True)
        missing = self.slot[unique] < 0
        if missing.any():
            order = np.argsort(first[missing], kind="stable")  # each new image's first row in the batch, ascending
            ids, pos = unique[missing][order], first[missing][order]
            values = self._embed_rows(support_x.flatten(0, 1), query_x.flatten(0, 1), pos)  # (M, *F)
            self.embedded += len(ids)
            held = unique[~missing]
            if self.used + len(ids) > self._most(len(ids) + len(held), values):
                # the budget is reached: start again, with the batch's images it held going in beside the new ones
                if len(held):
                    kept = self.rows[torch.as_tensor(self.slot[held], device=self.rows.device)]
                    ids, values = np.concatenate([ids, held]), torch.cat([values, kept])
                self.slot[:] = -1
                self.used = 0
                self.restarts += 1
            self._add(ids, values)
        self.served += len(flat)
        out = self.rows.index_select(0, torch.as_tensor(self.slot[flat], device=self.rows.device))
        return out[:n_s].unflatten(0, (e, s)), out[n_s:].unflatten(0, (e, q))
