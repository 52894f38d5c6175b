"""A plain CNN run on many episodes at once with a per-episode static similarity ``M_s`` in every conv.

The batched evaluation path of ``static_nsn`` (:mod:`fewshot_nsl.methods.batched`): ``E`` episodes share the
frozen conv weights ``W`` and BN statistics of the pretrained backbone and differ only by their ``M_s``. Activations
are channels-last; BN's eval-mode scale is folded into ``W`` and its shift into the bias; ReLU runs after the
max-pool (they commute).

- DNS, stride 1, ``C_in >= TAPS_MIN_CHANNELS`` (:class:`_DNSTaps`): ``out = sum_p m[e, p] x_p W_p`` tap by tap on
  the flattened padded input, each tap's rows a contiguous block (no patches), ``m[e, p]`` folded into the tap's
  weight per episode (``baddbmm``); the backward pass takes ``G_p = grad W_p^T`` with the shared ``W_p`` and gets
  ``dm[e, p] = <G_p, x_p>`` from it: no weight-gradient GEMM (two GEMMs per conv instead of a convolution's three,
  less the positions of the padded grid that are computed and dropped). Output tiles sized for the L2 cache.
- Otherwise (the RGB input layer, UNS): patches copied into one GEMM operand, each episode's effective weight
  ``M_s^T W`` (``bmm``), autograd for the rest; the first layer's patches are computed once per support set.

On this suite's 2-core CPU (42 px, 5-shot, CNN-4 64 filters, 1 thread, 40 episodes) batched / per-episode time
measured 0.94-0.96 (quick options) and 0.82-1.05 (paper options) between runs: the GEMMs run at ~87% of the core's
~100 GFLOPS, and the per-episode path is compute-bound too (oneDNN convolutions), so batching saves little; a
ratio of 0.3 would need less arithmetic (e.g. Winograd), not less overhead.

Only backbones whose feature map is a sequence of supported layers are planned (:func:`plan_backbone`): CNN-4 and
CNN-9 (:mod:`fewshot_nsl.backbones`) built with plain ``nn.Conv2d``; anything else returns ``None`` and the
method keeps its per-episode path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import CNN4, CNN9, Backbone
from ..nn.amp import autocast_backward, autocast_forward


@dataclass
class ConvStep:
    """A conv (zero padding, groups 1), with the eval-mode BN that follows it folded in when there is one.

    Attributes:
        weight: ``(kh * kw * C_in, C_out)``: ``W[o, c, i, j]`` at row ``(i * kw + j) * C_in + c``, times BN's scale.
        bias: ``(C_out,)`` or ``None``: conv bias and BN shift.
        kernel, stride, padding, dilation: ``(h, w)`` pairs of the conv.
        in_channels, out_channels: ``C_in``, ``C_out``.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    in_channels: int
    out_channels: int

    @property
    def kk(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def taps(self) -> torch.Tensor:
        """``(kk, C_in, C_out)``: the weight of each kernel tap (a view of :attr:`weight`)."""
        return self.weight.view(self.kk, self.in_channels, self.out_channels)


@dataclass
class PoolStep:
    """A 2-D max-pool (``nn.MaxPool2d``'s settings)."""

    kernel: Union[int, Tuple[int, int]]
    stride: Union[int, Tuple[int, int]]
    padding: Union[int, Tuple[int, int]]
    dilation: Union[int, Tuple[int, int]]
    ceil_mode: bool


#: Input channels from which a DNS conv runs tap by tap (:class:`_DNSTaps`); below (the RGB input layer), and for
#: UNS, the patches are copied into one GEMM operand with each episode's effective weight ``M_s^T W`` (``bmm``).
TAPS_MIN_CHANNELS = 8
#: Bytes of one output tile of :class:`_DNSTaps` on a CPU: the nine taps of a tile run while it stays in the L2
#: cache (512 KiB measured 1.6x faster than whole-tensor taps for 66k x 64 rows on this suite's 2-core CPU).
TILE_BYTES = 1 << 19

Step = Union[ConvStep, PoolStep, str]  # str: "relu", "global_mean"


def _fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> ConvStep:
    """The GEMM operand of ``conv`` followed by ``bn`` in eval mode (running statistics, affine)."""
    w = conv.weight.detach()
    c_out = w.shape[0]
    bias = conv.bias.detach() if conv.bias is not None else None
    if bn is not None:
        assert bn.running_mean is not None and bn.running_var is not None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
        w = w * scale.view(-1, 1, 1, 1)
        bias = shift if bias is None else bias * scale + shift
    pad = conv.padding
    return ConvStep(
        weight=w.permute(0, 2, 3, 1).reshape(c_out, -1).t().contiguous(),
        bias=None if bias is None else bias.contiguous(),
        kernel=tuple(conv.kernel_size), stride=tuple(conv.stride), padding=tuple(pad),  # type: ignore[arg-type]
        dilation=tuple(conv.dilation), in_channels=conv.in_channels, out_channels=c_out,  # type: ignore[arg-type]
    )  # fmt: skip


def plan_backbone(backbone: nn.Module) -> Optional[List[Step]]:
    """The feature map of ``backbone`` as a list of steps, or ``None`` where it is not a plain CNN-4 / CNN-9.

    Supported: ``nn.Conv2d`` (int padding, zero padding mode, groups 1, dilation 1), ``nn.BatchNorm2d`` with running
    statistics (applied as in eval mode), ``nn.ReLU``, ``nn.MaxPool2d``, and CNN-9's ``global_pool``.
    The convs are listed in the order :func:`~fewshot_nsl.nn.wrap_convs_static` wraps them.
    """
    cls = type(backbone)
    if getattr(cls, "forward_map", None) not in (CNN4.forward_map, CNN9.forward_map) or cls.forward is not Backbone.forward:
        return None
    leaves = [m for m in backbone.blocks.modules() if not list(m.children())]
    steps: List[Step] = []
    i = 0
    while i < len(leaves):
        m = leaves[i]
        if isinstance(m, nn.Conv2d):
            if (type(m) is not nn.Conv2d or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
                    or tuple(m.dilation) != (1, 1)):
                return None
            bn = leaves[i + 1] if i + 1 < len(leaves) and isinstance(leaves[i + 1], nn.BatchNorm2d) else None
            if bn is not None and (bn.running_mean is None or type(bn) is not nn.BatchNorm2d):
                return None
            steps.append(_fold_bn(m, bn))
            i += 2 if bn is not None else 1
        elif isinstance(m, nn.ReLU):
            steps.append("relu")
            i += 1
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            steps.append(PoolStep(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode))  # type: ignore[arg-type]
            i += 1
        else:
            return None
    if isinstance(backbone, CNN9) and backbone.global_pool:
        steps.append("global_mean")
    # ReLU then max-pool = max-pool then ReLU (ReLU is monotone; the gradient reaches the same input, or is zero
    # where the window's maximum is not positive): the ReLU then runs on the pooled map, a quarter of the size.
    for k in range(len(steps) - 1):
        if steps[k] == "relu" and isinstance(steps[k + 1], PoolStep):
            steps[k], steps[k + 1] = steps[k + 1], steps[k]
    return steps


def conv_steps(steps: Sequence[Step]) -> List[ConvStep]:
    """The conv steps of a plan, in order (one ``M_s`` each)."""
    return [s for s in steps if isinstance(s, ConvStep)]


def _tiles(episodes: int, rows: int, c_out: int, device: torch.device) -> List[Tuple[slice, slice]]:
    """Tiles ``(episodes, rows)`` of the ``(E, rows, C_out)`` output, each about :data:`TILE_BYTES` on a CPU (all
    nine taps of a tile run while it is in cache); one tile on a GPU."""
    if device.type != "cpu":
        return [(slice(0, episodes), slice(0, rows))]
    tile_rows = max(1, TILE_BYTES // (4 * c_out))
    if 2 * rows >= 3 * tile_rows:  # an episode in tiles of equal size (one per episode up to 1.5 tiles' rows)
        size = -(-rows // round(rows / tile_rows))
        return [(slice(e, e + 1), slice(r, min(rows, r + size))) for e in range(episodes) for r in range(0, rows, size)]
    group = max(1, tile_rows // rows)
    return [(slice(e, min(episodes, e + group)), slice(0, rows)) for e in range(0, episodes, group)]


class _DNSTaps(torch.autograd.Function):
    """A stride-1 conv with per-episode DNS ``M_s`` applied tap by tap on the flattened padded input (no patches).

    The padded channels-last input is flattened over ``(image, row, col)`` to ``xf`` ``(N * Hp * Wp + extra, C_in)``;
    output position ``q`` of the ``(N, Hp, Wp)`` grid reads row ``q + off_p`` of ``xf`` for tap ``p``
    (``off_p = i * Wp + j``), so each tap's input is one contiguous block, and episode ``e``'s positions are one
    contiguous block of ``b * Hp * Wp`` rows. Forward: ``out_e += x_{e,p} @ (m[e, p] W_p)`` for every tap.
    Backward: ``G_p = grad @ W_p^T`` (the shared ``W_p``), ``dm[e, p] = <G_p, x_p>_e`` and
    ``dx[q + off_p] += m[e, p] G_p[q]``. Both run tile by tile (:func:`_tiles`). Grid positions past ``Ho`` /
    ``Wo`` are computed and dropped (their gradient is zero).
    """

    @staticmethod
    @autocast_forward(torch.float32)  # fp32 under autocast (the batched static NSN itself leaves autocast to the per-episode path)
    def forward(ctx, x, m, taps, bias, kernel, padding, episodes):  # type: ignore[override]
        """``x`` ``(N, H, W, C_in)``, ``m`` ``(E, kk)``, ``taps`` ``(kk, C_in, C_out)``, ``bias`` ``(C_out,)`` or None
        -> ``(N, Ho, Wo, C_out)``."""
        (kh, kw), (ph, pw) = kernel, padding
        n, h, w, c = x.shape
        hp, wp = h + 2 * ph, w + 2 * pw
        ho, wo = hp - kh + 1, wp - kw + 1
        grid = n * hp * wp
        extra = (kh - 1) * wp + kw - 1
        xf = _padded_rows(x, ph, pw, extra)
        rows = grid // episodes
        c_out = taps.shape[2]
        out = x.new_empty(episodes, rows, c_out)
        weights = m.t().reshape(kh * kw, episodes, 1, 1) * taps.unsqueeze(1)  # (kk, E, C_in, C_out)
        for es, rs in _tiles(episodes, rows, c_out, x.device):
            o = out[es, rs]  # contiguous: one episode's rows, or whole episodes
            for p in range(kh * kw):
                off = (p // kw) * wp + p % kw
                x_p = xf[off:off + grid].view(episodes, rows, c)[es, rs]
                if p > 0:
                    o.baddbmm_(x_p, weights[p, es])
                elif bias is not None:
                    torch.baddbmm(bias.expand_as(o), x_p, weights[p, es], out=o)
                else:
                    torch.bmm(x_p, weights[p, es], out=o)
        ctx.save_for_backward(xf, m, taps)
        ctx.geometry = (n, h, w, c, hp, wp, ho, wo, kh, kw, ph, pw, episodes)
        ctx.has_bias = bias is not None
        return out.view(n, hp, wp, c_out)[:, :ho, :wo]

    @staticmethod
    @autocast_backward
    def backward(ctx, grad):  # type: ignore[override]
        xf, m, taps = ctx.saved_tensors
        n, h, w, c, hp, wp, ho, wo, kh, kw, ph, pw, episodes = ctx.geometry
        grid, rows, c_out = n * hp * wp, n * hp * wp // episodes, taps.shape[2]
        gfull = grad.new_empty(n, hp, wp, c_out)
        gfull[:, :ho, :wo] = grad
        gfull[:, ho:].zero_()
        gfull[:, :ho, wo:].zero_()
        gf = gfull.view(episodes, rows, c_out)
        need_x = ctx.needs_input_grad[0]
        gxf = None
        if need_x:  # every row below `grid` is first written by tap 0 of its tile (tiles run last to first)
            gxf = xf.new_empty(xf.shape)
            gxf[grid:].zero_()
        gm = m.new_zeros(m.shape)
        taps_t = taps.transpose(1, 2)  # (kk, C_out, C_in)
        for es, rs in reversed(_tiles(episodes, rows, c_out, xf.device)):
            g = gf[es, rs]
            k = g.shape[0]
            for p in range(kh * kw):
                off = (p // kw) * wp + p % kw
                g_p = torch.matmul(g, taps_t[p])  # (k, r, C_in)
                x_p = xf[off:off + grid].view(episodes, rows, c)[es, rs]
                gm[es, p] += torch.bmm(g_p.reshape(k, 1, -1), x_p.reshape(k, -1, 1)).view(k)
                if gxf is not None:
                    # tap p of this tile reaches rows [start + off, end + off): its own and the next tile's, which
                    # already ran (its tap 0 wrote them): accumulate; tap 0 writes this tile's rows first.
                    target = gxf[off:off + grid].view(episodes, rows, c)[es, rs]
                    if p == 0:
                        torch.mul(g_p, m[es, p].view(k, 1, 1), out=target)
                    else:
                        target.addcmul_(g_p, m[es, p].view(k, 1, 1))
        gx = gxf[:grid].view(n, hp, wp, c)[:, ph:ph + h, pw:pw + w] if gxf is not None else None
        gb = gfull.sum((0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, gm, None, gb, None, None, None


def _padded_rows(x: torch.Tensor, ph: int, pw: int, extra: int) -> torch.Tensor:
    """``(N, H, W, C)`` -> the zero-padded ``(N, H + 2 ph, W + 2 pw, C)`` flattened to rows, ``extra`` zero rows after."""
    n, h, w, c = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    xf = x.new_empty(n * hp * wp + extra, c)
    grid = xf[:n * hp * wp].view(n, hp, wp, c)
    grid[:, ph:ph + h, pw:pw + w] = x
    if ph:
        grid[:, :ph].zero_()
        grid[:, ph + h:].zero_()
    if pw:
        grid[:, ph:ph + h, :pw].zero_()
        grid[:, ph:ph + h, pw + w:].zero_()
    xf[n * hp * wp:].zero_()
    return xf


def activation_elements(steps: Sequence[Step], image_size: int) -> int:
    """Elements of every step's output for one ``image_size`` square image (what a step's forward keeps per image)."""
    side, channels, total = image_size, 3, 0
    for step in steps:
        if isinstance(step, ConvStep):
            side = (side + 2 * step.padding[0] - step.kernel[0]) // step.stride[0] + 1
            channels = step.out_channels
        elif isinstance(step, PoolStep):
            k, st, pad = (_first(v) for v in (step.kernel, step.stride if step.stride is not None else step.kernel,
                                               step.padding))
            side = (side + 2 * pad - _first(step.dilation) * (k - 1) - 1 + (st - 1 if step.ceil_mode else 0)) // st + 1
        elif step == "global_mean":
            side = 1
        total += channels * max(side, 1) ** 2
    return total


def _first(v: Union[int, Tuple[int, ...]]) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _uses_taps(step: ConvStep, m: torch.Tensor) -> bool:
    """Whether a conv runs tap by tap (:class:`_DNSTaps`) rather than through patches and per-episode weights."""
    return m.dim() == 2 and step.stride == (1, 1) and step.in_channels >= TAPS_MIN_CHANNELS


def _patches(x: torch.Tensor, step: ConvStep) -> Tuple[torch.Tensor, int, int]:
    """``x`` ``(N, H, W, C)`` channels-last -> its conv patches ``(N, Ho * Wo * kh * kw * C)`` (channels innermost),
    ``Ho``, ``Wo``."""
    (kh, kw), (sh, sw), (ph, pw) = step.kernel, step.stride, step.padding
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    cols = x.unfold(1, kh, sh).unfold(2, kw, sw).permute(0, 1, 2, 4, 5, 3)  # (N, Ho, Wo, kh, kw, C): a view
    return cols.reshape(x.shape[0], -1), cols.shape[1], cols.shape[2]


def input_patches(steps: Sequence[Step], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The first conv's patches of images ``(E, n, 3, H, W)``: ``(E, n, P)``, for :func:`episode_forward`'s
    ``patches`` (computed once per support set, gathered per step); ``None`` when the first step is no conv."""
    if not steps or not isinstance(steps[0], ConvStep):
        return None
    e, n = x.shape[:2]
    cols, _, _ = _patches(x.reshape(e * n, *x.shape[2:]).permute(0, 2, 3, 1), steps[0])
    return cols.view(e, n, -1)


def _similar_conv(x: Optional[torch.Tensor], step: ConvStep, m: torch.Tensor, episodes: int,
                  patches: Optional[torch.Tensor] = None, size: Tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """One conv with per-episode ``M_s``: ``x`` ``(E*b, H, W, C_in)`` channels-last, ``m`` ``(E, kk)`` (DNS) or
    ``(E, kk, kk)`` (UNS) -> ``(E*b, Ho, Wo, C_out)``. ``patches`` ``(E, b, P)`` (:func:`input_patches`) replace
    ``x`` (then ``size`` gives ``(N, H, W)``)."""
    (kh, kw), (sh, sw), (ph, pw) = step.kernel, step.stride, step.padding
    if x is not None and _uses_taps(step, m):
        return _DNSTaps.apply(x, m, step.taps, step.bias, step.kernel, step.padding, episodes)
    if patches is None:
        assert x is not None
        cols, ho, wo = _patches(x, step)
        n = x.shape[0]
    else:
        n, h, w = size
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = patches
    c = step.in_channels
    cols = cols.reshape(episodes, -1, kh * kw * c)
    taps = step.taps  # (kk, C_in, C_out)
    if m.dim() == 2:  # DNS: W'[p] = m[p] W[p]
        weight = m.view(episodes, kh * kw, 1, 1) * taps
    else:  # UNS: W'[q] = sum_p M[p, q] W[p]
        weight = torch.einsum("epq,pco->eqco", m, taps)
    weight = weight.reshape(episodes, kh * kw * c, step.out_channels)
    if step.bias is None:
        out = torch.bmm(cols, weight)
    else:
        out = torch.baddbmm(step.bias, cols, weight)
    return out.view(n, ho, wo, step.out_channels)


def _max_pool(x: torch.Tensor, step: PoolStep) -> torch.Tensor:
    """``nn.MaxPool2d`` on a channels-last ``(N, H, W, C)`` tensor (the channels-last kernel)."""
    y = F.max_pool2d(x.permute(0, 3, 1, 2), step.kernel, step.stride, step.padding, step.dilation, step.ceil_mode)
    return y.permute(0, 2, 3, 1)


def episode_forward(steps: Sequence[Step], x: torch.Tensor, sims: Sequence[torch.Tensor],
                    patches: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Features of every episode's images with its own ``M_s`` in every conv.

    Args:
        steps: :func:`plan_backbone` of the pretrained backbone.
        x: ``(E, b, 3, H, W)`` images.
        sims: one per conv step: ``(E, kk)`` DNS diagonals or ``(E, kk, kk)`` UNS matrices.
        patches: optional :func:`input_patches` of ``x`` (``(E, b, P)``), used instead of ``x`` by the first conv
            when it goes through patches.

    Returns:
        ``(E, b, D)``: the backbone's flattened features (``(C, h, w)`` order, as ``Backbone.forward``), equal up
        to rounding to the per-episode network with these ``M_s`` in eval mode.
    """
    e, b = x.shape[:2]
    h = x.reshape(e * b, *x.shape[2:]).permute(0, 2, 3, 1)  # (E*b, H, W, 3): a channels-last view
    it = iter(sims)
    for k, step in enumerate(steps):
        if isinstance(step, ConvStep):
            m = next(it)
            if k == 0 and patches is not None and not _uses_taps(step, m):
                h = _similar_conv(None, step, m, e, patches, (e * b, x.shape[3], x.shape[4]))
            else:
                h = _similar_conv(h.contiguous(), step, m, e)
        elif isinstance(step, PoolStep):
            h = _max_pool(h, step)
        elif step == "relu":
            h = F.relu(h)
        else:  # global_mean
            h = h.mean(dim=(1, 2), keepdim=True)
    return h.permute(0, 3, 1, 2).reshape(e, b, -1)
