"""Shared checks of the batched evaluation path (:meth:`FewShotMethod.evaluate_episodes`) against the
per-episode path, episode by episode, in float64 (where rounding cannot flip a prediction).

The reference is :meth:`FewShotMethod.evaluate_one_by_one`: for each episode the torch RNG is
seeded with the episode's seed, then ``fit_support`` and ``forward`` run, exactly as the harness's per-episode
path runs them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from fewshot_nsl.config import resolve_config
from fewshot_nsl.methods.base import FewShotMethod
from fewshot_nsl.methods.batched import episode_seed
from fewshot_nsl.runner import build_method

from conftest import synthetic_episode  # noqa: E402

IMAGE_SIZE = 16


def build(name: str, profile: str = "quick", method_options: Optional[Dict[str, Any]] = None,
          image_size: int = IMAGE_SIZE, shots: int = 2, ways: int = 5, filters: int = 8,
          extra: Optional[Dict[str, Any]] = None) -> FewShotMethod:
    """A method built as a run of ``profile`` builds it (tiny backbone), in float64 and eval mode, with its
    ``after_pretrain`` hook run (as the harness runs it after loading the pretrained weights)."""
    cfg = {"method": name, "profile": profile, "dataset": "tiny", "image_size": image_size, "ways": ways,
           "shots": shots, "backbone": "cnn4", "backbone_options": {"filters": filters}, "device": "cpu"}
    if method_options:
        cfg["method_options"] = method_options
    cfg.update(extra or {})
    torch.manual_seed(0)
    method = build_method(resolve_config(cfg))
    if "pretrain" in method.stages(method_options or {}):
        method.after_pretrain()
    return method.double().eval()


def episodes(n: int, ways: int = 5, shots: int = 2, queries: int = 3, size: int = IMAGE_SIZE, seed: int = 0
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` episodes stacked, float64, each in its own shuffled order: ``(n, S, 3, H, W)``, ``(n, S)``, ``(n, Q, 3, H, W)``."""
    sxs, sys_, qxs = [], [], []
    g = torch.Generator().manual_seed(seed + 12345)
    for e in range(n):
        sx, sy, qx, _ = synthetic_episode(ways, shots, queries, seed + e, size, dtype=torch.float64)
        ps, pq = torch.randperm(len(sy), generator=g), torch.randperm(len(qx), generator=g)
        sxs.append(sx[ps]), sys_.append(sy[ps]), qxs.append(qx[pq])
    return torch.stack(sxs), torch.stack(sys_), torch.stack(qxs)


def both_paths(method: FewShotMethod, n: int = 3, ways: int = 5, shots: int = 2, queries: int = 3,
               seeds: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(per-episode logits, batched logits)``, each ``(n, Q, ways)``, on ``n`` synthetic episodes; also checks
    that the batched path declared itself and left the method's parameters as they were."""
    if hasattr(type(method), "batched_on_cpu"):  # methods whose batched path is off on a CPU by default
        method.batched_on_cpu = True
    assert method.supports_batched_evaluation(), f"{type(method).__name__} does not declare batched evaluation"
    sx, sy, qx = episodes(n, ways, shots, queries, size=sx_size(method))
    seeds = list(seeds) if seeds is not None else [episode_seed(0, i) for i in range(n)]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        ref = FewShotMethod.evaluate_one_by_one(method, sx, sy, qx, seeds, ways)
        got = method.evaluate_episodes(sx, sy, qx, seeds, ways)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), f"evaluate_episodes changed {k}"
    return ref, got


def sx_size(method: FewShotMethod) -> int:
    return int(getattr(method, "image_size", IMAGE_SIZE))


def assert_same_logits(ref: torch.Tensor, got: torch.Tensor, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """Equal up to float64 rounding, and the same prediction for every query of every episode."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
