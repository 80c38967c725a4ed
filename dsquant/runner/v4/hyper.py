"""Manifold-constrained hyper-connections (mHC): the `hc_mult` residual streams of a DeepSeek-V4 block.

The residual is n = hc_mult streams X [B, S, n, D]. Around each sublayer (attention, then MoE), with the
block's `hc_{attn,ffn}_fn` [(2+n)n, nD], `_base` [(2+n)n] and `_scale` [3] (float32):
    u    = X.flatten(nD) * rsqrt(mean(X^2) + rms_norm_eps)          (unweighted RMS over all n*D, float32)
    mix  = u @ fn^T, split into pre [n], post [n], comb [n, n] (row-major)
    pre  = sigmoid(mix_pre * scale0 + base_pre) + hc_eps
    post = 2 * sigmoid(mix_post * scale1 + base_post)
    comb = softmax_j(mix_comb * scale2 + base_comb) + hc_eps, then column-normalised, then
           (hc_sinkhorn_iters - 1) times row- then column-normalised (each sum + hc_eps)
    sublayer input y = sum_i pre_i X_i;  output X'_j = post_j * f(y) + sum_i comb[i, j] X_i
The final head collapses the streams with `hc_head_{fn,base,scale}` (pre only, one scale) before the norm.
Matches transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead and the official Block.hc_pre/hc_post.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mix(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, S, n, D] -> fn-projection of the RMS-normalised flattened streams, float32 [B, S, rows of fn]."""
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return F.linear(flat, fn.float())


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, args):
    """x [B, S, n, D] -> (sublayer input [B, S, D] in x.dtype, post float32 [B, S, n], comb float32 [B, S, n, n])."""
    n = args.hc_mult
    pre_w, post_w, comb_w = _mix(x, fn, args.rms_norm_eps).split([n, n, n * n], dim=-1)
    base = base.float()
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + args.hc_eps
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s_comb + comb_b.view(n, n), dim=-1) + args.hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + args.hc_eps)
    for _ in range(args.hc_sinkhorn_iters - 1):  # Sinkhorn-Knopp towards a doubly-stochastic matrix
        comb = comb / (comb.sum(dim=-1, keepdim=True) + args.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + args.hc_eps)
    y = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
    return y, post, comb


def hc_post(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Streams x [B, S, n, D], sublayer output out [B, S, D] -> new streams [B, S, n, D] (comb used transposed)."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, args) -> torch.Tensor:
    """Final collapse of the streams x [B, S, n, D] -> [B, S, D] in x.dtype."""
    pre = torch.sigmoid(_mix(x, fn, args.rms_norm_eps) * scale.float() + base.float()) + args.hc_eps
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
