"""Manifold-constrained hyper-connections (mHC; DeepSeek, arXiv 2512.24880, building on Hyper-Connections,
arXiv 2409.19606), Motif-3's residual path.

The residual stream is n = `hc_mult` streams of hidden_size per token, x (n, C). Around each sublayer F
(attention, feed-forward), three maps computed from the token's streams decide what F reads and where its
output goes:

    x'     = RMSNorm(vec(x))                                       (weightless, over all n * C numbers)
    H_pre  = sigmoid(a_pre  x' P_pre  + b_pre)                      (1, n)   F's input = H_pre x
    H_post = 2 sigmoid(a_post x' P_post + b_post)                   (1, n)   stream i receives H_post_i F(.)
    H_res  = Sinkhorn(a_res mat(x' P_res) + b_res)                  (n, n)   doubly stochastic stream mixing
    x_next = H_res x + H_post^T F(H_pre x)

Sinkhorn(M): exp(M), then alternately every row and every column divided by its sum (`hc_sinkhorn_iters`
times), which projects onto the doubly-stochastic matrices (the Birkhoff polytope): the mixing neither grows
nor shrinks the streams' total, so a deep stack keeps the identity path's stability. The maps are computed in
fp32 at least. Parameters per sublayer: `fn` (2n + n^2, n C) = [P_pre; P_post; P_res] as rows, `bias`
(2n + n^2) = [b_pre, b_post, b_res], `scale` (3) = (a_pre, a_post, a_res).

Initialisation (kmodel/model/init.py): fn ~ N(0, initializer_range), bias 0, scale `HC_SCALE_INIT` (0.01,
the small gating factor mHC starts from), so at the start H_pre = 1/2, H_post = 1 and H_res = 1/n (uniform)
up to the small data-dependent term, which also breaks the symmetry between streams that start equal (the
embedding is copied into every stream; the final hidden state is the streams' mean, as Motif-3 reduces them;
Hyper-Connections sums them, the same up to the final RMSNorm's eps).
"""

from __future__ import annotations

import torch
from torch import nn

from kmodel.config import ModelConfig

HC_SCALE_INIT = 0.01


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(..., n, n) logits -> approximately doubly-stochastic matrices (columns sum to 1 exactly, rows to within
    the iteration's convergence)."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))  # a common factor: cancels in the sums
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """The pre/post/residual maps around one sublayer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.streams = n = cfg.hc_mult
        self.iters, self.eps = cfg.hc_sinkhorn_iters, cfg.hc_eps
        self.fn = nn.Parameter(torch.empty(2 * n + n * n, n * cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(2 * n + n * n))
        self.scale = nn.Parameter(torch.empty(3))

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, n, C) -> H_pre (batch, seq, n), H_post (batch, seq, n), H_res (batch, seq, n, n)."""
        n = self.streams
        dtype = torch.promote_types(x.dtype, torch.float32)
        flat = x.flatten(-2).to(dtype)
        normed = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)
        pre, post, res = (normed @ self.fn.to(dtype).t()).split((n, n, n * n), dim=-1)
        b_pre, b_post, b_res = self.bias.to(dtype).split((n, n, n * n))
        a_pre, a_post, a_res = self.scale.to(dtype)
        h_pre = torch.sigmoid(a_pre * pre + b_pre)
        h_post = 2 * torch.sigmoid(a_post * post + b_post)
        h_res = sinkhorn((a_res * res + b_res).unflatten(-1, (n, n)), self.iters)
        return h_pre, h_post, h_res

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(the sublayer's input H_pre x (batch, seq, C), the maps `post` needs)."""
        h_pre, h_post, h_res = self.maps(x)
        return torch.einsum("bsn,bsnc->bsc", h_pre.to(x.dtype), x), (h_post, h_res)

    def post(self, x: torch.Tensor, out: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The next streams H_res x + H_post^T out, from the sublayer's output `out` (batch, seq, C)."""
        h_post, h_res = (m.to(x.dtype) for m in maps)
        return torch.einsum("bsij,bsjc->bsic", h_res, x) + h_post.unsqueeze(-1) * out.unsqueeze(-2)
