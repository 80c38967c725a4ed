"""Fused MoE in plain torch, the spec the Triton kernels match: DeepSeek routing, token/expert alignment, expert MLPs.

Routing (DeepSeek-V3 `inference/model.py` Gate; DeepSeek-V2 MoEGate for the softmax methods; DeepSeek-V4 Gate for
sqrtsoftplus and hash routing), all float32:
    scores = sigmoid(logits) | softmax(logits) | sqrt(softplus(logits))  [T, E]  (softplus as torch's: x above 20)
    sel    = scores + e_score_correction_bias   (noaux_tc; else scores)
    groups (noaux_tc, group_limited_greedy, when n_group > 1): group score = sum of the two largest `sel` of the
           group (noaux_tc) or its max (group_limited_greedy); the topk_group best groups are kept, the experts of
           the others get -inf
    ids    = the top_k largest `sel`, or, hash routing (V4's first layers), tid2eid[token_ids] [T, top_k]: no
             selection, the table names the experts
    w      = scores[ids] (unbiased); w /= sum(w) + 1e-20 when norm_topk_prob and top_k > 1 (HF MoEGate);
             w *= routed_scaling_factor
Ties break towards the lowest index (groups and experts): a stable descending sort. NaN logits are not supported.

Alignment (vLLM `moe_align_block_size`, deterministic): the T*k flat slots `t * k + j` are grouped by expert in
ascending slot order, each expert's run padded to a multiple of block_m with the sentinel T*k; expert_ids names the
expert of every block_m rows (-1 past the end); num_tokens_post_padded is the padded total.

Expert MLP for one (token, expert) with weight w (`fmt` picks how weights and activations are stored):
    a   = x, or its fp8 1x128-group / int8 per-token quantize-dequantize (fp8 / int8)
    h   = bf16(a @ W13^T)            [2I]  gate = h[:I], up = h[I:]
    act = bf16(silu(gate) * up)      [I]   (silu in float32), then quantize-dequantized like a
    act = bf16(silu(min(gate, L)) * clamp(up, -L, L)) instead when swiglu_limit L > 0 (DeepSeek-V4)
    y   = act @ W2^T                 [H]   float32
    out[t] = sum_j w_j * y_j (+ the shared expert's y with weight 1), float32, cast to x.dtype at the end.
Weights are dequantized with dsquant.formats (W13 [E, 2I, H], gate rows first; W2 [E, H, I]):
    bf16   w13 bf16;                 no scales
    fp8    w13 float8_e4m3fn;        w13_scale float32 [E, 2I/128, H/128] (128x128 blocks, multiplies)
    int8   w13 int8;                 w13_scale float32 [E, 2I, 1] (per output channel)
    nvfp4  w13 uint8 [E, 2I, H/2];   w13_scale float8_e4m3fn [E, 2I, H/16]; w13_global_scale float32 [E]
    mxfp4  w13 uint8 [E, 2I, H/2];   w13_scale uint8 E8M0 [E, 2I, H/32]
and the same for w2 with (H, I) in place of (2I, H). NVFP4/MXFP4 are W4A16: activations stay bf16, unless NVFP4
input scales are given (a13_scale, a2_scale float32 [E]: the activation global scale of each expert's gate/up and
down, ModelOpt's input_scale), then each GEMM's activation rows are NVFP4 quantize-dequantized with the expert's
scale (dsquant.formats.nvfp4) and the bf16 result is the A operand: W4A4 numerics on a W4A16 kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from dsquant.kernels import format_codes

from dsquant.formats.fp8 import quantize_fp8_per_token_group
from dsquant.formats.int8 import quantize_int8_per_token
from dsquant.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from dsquant.formats.registry import Format, of_kernel_code

SCORING = ("sigmoid", "softmax", "sqrtsoftplus")
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: x itself above this
METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
FORMATS = tuple(format_codes.MOE_FORMATS)
RENORM_EPS = 1e-20  # HF DeepseekV3/V2 MoEGate: denominator = sum + 1e-20


class ExpertWeights(NamedTuple):
    """One stack of expert MLP weights in one format (see the module docstring for shapes and dtypes).

    The shared expert is passed as ExpertWeights with E = 1 ([1, 2I, H], ...); 2-D tensors are accepted too.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    fmt: str = "bf16"
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    w13_global_scale: torch.Tensor | None = None
    w2_global_scale: torch.Tensor | None = None


def expert_format(fmt: str | int) -> Format:
    """The dsquant.formats.registry entry of an expert format, given by name (FORMATS) or format_codes code."""
    if isinstance(fmt, int):
        return of_kernel_code(fmt)
    if fmt not in format_codes.MOE_FORMATS:
        raise ValueError(f"unknown expert format {fmt!r}: choose one of {FORMATS}")
    return of_kernel_code(format_codes.MOE_FORMATS[fmt])


def router_logits(hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], router weight [E, H] -> float32 logits [T, E] (the router GEMM stays in torch, in fp32)."""
    return hidden.float() @ gate_weight.float().t()


def check_route_args(logits, bias, n_group, topk_group, top_k, scoring, method, tid2eid=None, token_ids=None) -> None:
    """ValueError for routing arguments that cannot describe a DeepSeek gate."""
    if logits.dim() != 2:
        raise ValueError(f"router logits: expected [T, E], got shape {tuple(logits.shape)}")
    t, e = logits.shape
    if (tid2eid is None) != (token_ids is None):
        raise ValueError("hash routing needs both tid2eid and token_ids")
    if tid2eid is not None:
        if tid2eid.dim() != 2 or tid2eid.shape[1] != top_k or tid2eid.dtype.is_floating_point:
            raise ValueError(f"tid2eid: expected integer [V, top_k={top_k}], got {tid2eid.dtype} "
                             f"{tuple(tid2eid.shape)}")
        if tuple(token_ids.shape) != (t,) or token_ids.dtype.is_floating_point:
            raise ValueError(f"token_ids: expected integer [T={t}], got {token_ids.dtype} {tuple(token_ids.shape)}")
    if scoring not in SCORING:
        raise ValueError(f"scoring {scoring!r}: choose one of {SCORING}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    if bias is not None and tuple(bias.shape) != (e,):
        raise ValueError(f"e_score_correction_bias: expected shape ({e},), got {tuple(bias.shape)}")
    if method == "greedy":
        n_group, topk_group = 1, 1
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"router: {e} experts cannot form n_group={n_group} groups with topk_group={topk_group}")
    if not 1 <= top_k <= topk_group * (e // n_group):
        raise ValueError(f"router: top_k={top_k} is not in [1, {topk_group * (e // n_group)}] kept experts")


def _top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ties to the lowest index (stable descending sort)."""
    return torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]


def route_scores(x: torch.Tensor, scoring: str) -> torch.Tensor:
    """float32 logits [T, E] -> the gate's scores [T, E]."""
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    return torch.nn.functional.softplus(x, threshold=SOFTPLUS_THRESHOLD).sqrt()


def deepseek_route_ref(
    logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None = None,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    top_k: int = 8,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
    scoring: str = "sigmoid",
    method: str = "noaux_tc",
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek router on precomputed logits (see router_logits).

    Args:
        logits: [T, E] router logits, any float dtype (computed on in float32).
        e_score_correction_bias: float32 [E], added for selection only (noaux_tc); None means zeros.
        n_group, topk_group: expert groups and how many are kept (ignored by "greedy").
        top_k, routed_scaling_factor, norm_topk_prob, scoring, method: the checkpoint's config values.
        tid2eid: integer [V, top_k], with token_ids integer [T]: hash routing, the experts of token t are
            tid2eid[token_ids[t]] (bias and groups unused), weighted by their scores as above.
    Returns:
        (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k]), ids in descending selection order (hash:
        the table's order).
    """
    check_route_args(logits, e_score_correction_bias, n_group, topk_group, top_k, scoring, method, tid2eid,
                     token_ids)
    t, e = logits.shape
    x = logits.float()
    scores = route_scores(x, scoring)  # [T, E]
    if tid2eid is not None:
        return _weigh(scores, tid2eid[token_ids.long()].long(), norm_topk_prob, routed_scaling_factor)
    sel = scores
    if method == "noaux_tc" and e_score_correction_bias is not None:
        sel = scores + e_score_correction_bias.float()
    if method != "greedy" and n_group > 1:
        grouped = sel.view(t, n_group, e // n_group)  # [T, G, E/G]
        if method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # values only: ties do not matter
        else:
            group_score = grouped.amax(dim=-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=x.device)
        keep.scatter_(1, _top_indices(group_score, topk_group), True)
        sel = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)
    return _weigh(scores, _top_indices(sel, top_k), norm_topk_prob, routed_scaling_factor)


def _weigh(scores, ids, norm_topk_prob, routed_scaling_factor):
    """scores [T, E], chosen ids int64 [T, k] -> (weights float32 [T, k], ids int32 [T, k])."""
    weights = scores.gather(1, ids)
    if norm_topk_prob and ids.shape[1] > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def align_sizes(numel: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(rows of sorted_token_ids, entries of expert_ids) for numel = T*k slots: vLLM's worst-case padding."""
    rows = numel + min(num_experts, numel) * (block_m - 1)  # each expert hit adds < block_m padding rows
    return rows, -(-rows // block_m)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the T*k routed slots by expert, padded per expert to block_m rows.

    Args:
        topk_ids: int32 [T, k], values in [0, num_experts).
    Returns:
        sorted_token_ids int32 [R] (flat slot t*k + j; padding = T*k), expert_ids int32 [R / block_m]
        (-1 past the end), num_tokens_post_padded int32 [1]; R from align_sizes.
    """
    numel = topk_ids.numel()
    rows, blocks = align_sizes(numel, num_experts, block_m)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [E] first row of each expert
    first = torch.cumsum(counts, 0) - counts  # [E] first position of each expert in the stable order
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, ascending within one
    e_of = flat[order]
    sorted_ids = torch.full((rows,), numel, dtype=torch.int32, device=dev)
    sorted_ids[starts[e_of] + torch.arange(numel, device=dev) - first[e_of]] = order.to(torch.int32)
    expert_ids = torch.full((blocks,), -1, dtype=torch.int32, device=dev)
    for ex in torch.nonzero(counts).flatten().tolist():
        expert_ids[int(starts[ex]) // block_m:int(starts[ex] + padded[ex]) // block_m] = ex
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, total


def check_expert_weights(ew: ExpertWeights, hidden: int, what: str = "experts") -> tuple[int, int]:
    """ValueError naming the tensor when a stack does not fit the module docstring; returns (E, I)."""
    if ew.fmt not in FORMATS:
        raise ValueError(f"{what}: unknown expert format {ew.fmt!r}; choose one of {FORMATS}")
    f = expert_format(ew.fmt)
    # weight dtype, codes per stored element along K, scale dtype, K per scale column (0: one per row)
    wdt, pack, sdt, per_k = f.element or torch.bfloat16, f.pack, f.scale, f.block[1] if f.block else None
    grid, needs_gs = f.block_grid, f.has_global_scale
    if ew.w13.dim() != 3 or ew.w2.dim() != 3:
        raise ValueError(f"{what}: w13/w2 must be [E, 2I, H] / [E, H, I], got {tuple(ew.w13.shape)} / "
                         f"{tuple(ew.w2.shape)}")
    e, two_i = ew.w13.shape[:2]
    inter = two_i // 2
    for name, w, (n, k) in (("w13", ew.w13, (two_i, hidden)), ("w2", ew.w2, (hidden, inter))):
        if w.dtype != wdt or tuple(w.shape) != (e, n, k // pack) or k % max(per_k or 1, 1):
            raise ValueError(f"{what}.{name}: expected {wdt} [{e}, {n}, {k // pack}] with {k} divisible by "
                             f"{per_k or 1}, got {w.dtype} {tuple(w.shape)}")
        sc = getattr(ew, f"{name}_scale")
        if sdt is not None:
            want = (e, n // 128, k // 128) if grid else (e, n, k // per_k if per_k else 1)
            if sc is None or sc.dtype != sdt or tuple(sc.shape) != want:
                got = None if sc is None else (sc.dtype, tuple(sc.shape))
                raise ValueError(f"{what}.{name}_scale: expected {sdt} {list(want)}, got {got}")
        gs = getattr(ew, f"{name}_global_scale")
        if needs_gs and (gs is None or gs.numel() != e):
            got = None if gs is None else tuple(gs.shape)
            raise ValueError(f"{what}.{name}_global_scale: expected float32 [{e}], got {got}")
    if two_i % 2 or (grid and inter % 128):
        raise ValueError(f"{what}: w13 rows {two_i} must be 2 x I (gate then up); fp8 needs I % 128 == 0")
    return e, inter


def _pick(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else (t[e] if t.dim() > 0 and t.numel() > 1 else t.reshape(()))


def dequantize_expert(fmt: str, q: torch.Tensor, scale: torch.Tensor | None,
                      global_scale: torch.Tensor | None) -> torch.Tensor:
    """One expert's 2-D weight in `fmt` -> float32 [N, K]."""
    return expert_format(fmt).dequantize(q, scale, global_scale, torch.float32)


def quantize_dequantize_activation(fmt: str, a: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernels feed the tensor cores for activation rows a [M, K]: float32 [M, K]. input_scale: an NVFP4
    activation global scale, [] or one per row [M, 1] (nvfp4 only; None: bf16 activations)."""
    code = expert_format(fmt).kernel_code
    if code == format_codes.NVFP4 and input_scale is not None:
        packed, bs, gs = quantize_nvfp4(a, input_scale, name="moe activation")
        return dequantize_nvfp4(packed, bs, gs, dtype=torch.bfloat16).float()
    if code == format_codes.FP8_BLOCK:
        q, s = quantize_fp8_per_token_group(a, 128, name="moe activation")
        return (q.float().view(*a.shape[:-1], -1, 128) * s.unsqueeze(-1)).view(a.shape)
    if code == format_codes.INT8:
        q, s = quantize_int8_per_token(a, name="moe activation")
        return q.float() * s
    return a.float()


def as_stack(ew: ExpertWeights) -> ExpertWeights:
    """Accept 2-D (single expert) tensors by adding the expert dim."""
    if ew.w13.dim() == 3:
        return ew

    def up(t):
        return None if t is None or t.dim() == 0 else t.unsqueeze(0)

    gs13 = None if ew.w13_global_scale is None else ew.w13_global_scale.reshape(1)
    gs2 = None if ew.w2_global_scale is None else ew.w2_global_scale.reshape(1)
    return ExpertWeights(ew.w13.unsqueeze(0), ew.w2.unsqueeze(0), ew.fmt, up(ew.w13_scale), up(ew.w2_scale), gs13, gs2)


def expert_mlp_ref(x: torch.Tensor, ew: ExpertWeights, e: int, swiglu_limit: float = 0.0,
                   a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e of the stack on rows x [M, H] -> float32 [M, H] (module docstring, "Expert MLP")."""
    w13 = dequantize_expert(ew.fmt, ew.w13[e], _pick(ew.w13_scale, e), _pick(ew.w13_global_scale, e))
    w2 = dequantize_expert(ew.fmt, ew.w2[e], _pick(ew.w2_scale, e), _pick(ew.w2_global_scale, e))
    inter = w2.shape[1]
    a = quantize_dequantize_activation(ew.fmt, x, _pick(a13_scale, e))
    h = (a @ w13.t()).to(torch.bfloat16)  # [M, 2I]
    gate, up = h[:, :inter].float(), h[:, inter:].float()
    if swiglu_limit > 0:
        gate, up = gate.clamp(max=swiglu_limit), up.clamp(min=-swiglu_limit, max=swiglu_limit)
    act = (gate * torch.sigmoid(gate) * up).to(torch.bfloat16)  # [M, I]
    return quantize_dequantize_activation(ew.fmt, act, _pick(a2_scale, e)) @ w2.t()  # [M, H] float32


def check_input_scales(fmt: str, num_experts: int, a13_scale, a2_scale) -> None:
    """ValueError unless the NVFP4 activation scales are absent (W4A16) or both float32 [E] of an nvfp4 stack."""
    if a13_scale is None and a2_scale is None:
        return
    if fmt != "nvfp4":
        raise ValueError(f"a13_scale / a2_scale are NVFP4 activation scales; the experts are {fmt}")
    for name, t in (("a13_scale", a13_scale), ("a2_scale", a2_scale)):
        if t is None or t.numel() != num_experts:
            raise ValueError(f"{name}: expected float32 [{num_experts}] with the other one, got "
                             f"{None if t is None else tuple(t.shape)}")


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    fmt: str = "bf16",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_global_scale: torch.Tensor | None = None,
    w2_global_scale: torch.Tensor | None = None,
    shared: ExpertWeights | None = None,
    swiglu_limit: float = 0.0,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts (a loop over the experts hit, as DeepSeek-V3 MoE.forward) plus the optional shared expert.

    Args:
        x: [T, H] bf16 hidden states. w13 [E, 2I, H(/2)], w2 [E, H, I(/2)] and scales: module docstring.
        topk_weights: float32 [T, k]; topk_ids: int32 [T, k] in [0, E).
        shared: the shared expert (weight 1 for every token), any format, unquantized activations.
        swiglu_limit: L > 0 clamps gate to <= L and up to [-L, L] before the SiLU product (routed and shared).
        a13_scale, a2_scale: NVFP4 activation global scales float32 [E] of the routed experts (module docstring).
    Returns:
        [T, H] in x.dtype.
    """
    routed = ExpertWeights(w13, w2, fmt, w13_scale, w2_scale, w13_global_scale, w2_global_scale)
    check_input_scales(fmt, w13.shape[0], a13_scale, a2_scale)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in torch.unique(topk_ids).tolist():
        rows, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        y = expert_mlp_ref(x[rows], routed, e, swiglu_limit, a13_scale, a2_scale)  # [n, H]
        out.index_add_(0, rows, y * topk_weights[rows, slots].float().unsqueeze(-1))
    if shared is not None:
        out += expert_mlp_ref(x, as_stack(shared), 0, swiglu_limit)
    return out.to(x.dtype)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, fmt: str) -> ExpertWeights:
    """Stack high-precision experts w13 [E, 2I, H], w2 [E, H, I] into `fmt` with dsquant.formats, expert by expert.

    NVFP4 gives each expert one global scale for gate and up together (fused partners share it, formats.md).
    """
    f = expert_format(fmt)
    if not f.quantized:
        return ExpertWeights(w13.to(torch.bfloat16), w2.to(torch.bfloat16))
    parts = {}
    for name, w in (("w13", w13), ("w2", w2)):
        per_expert = [f.quantize(w[e], name="expert") for e in range(w.shape[0])]
        parts[name] = torch.stack([p[0] for p in per_expert])
        parts[f"{name}_scale"] = torch.stack([p[1] for p in per_expert])
        if f.has_global_scale:
            parts[f"{name}_global_scale"] = torch.stack([p[2] for p in per_expert]).float()
    return ExpertWeights(fmt=fmt, **parts)


def stack_experts(fmt: str, gate, up, down) -> ExpertWeights:
    """Per-expert stored linears -> the stack fused_moe takes (a copy: build it once per layer, at load).

    Args:
        fmt: "bf16" | "fp8" | "int8" | "nvfp4" | "mxfp4", or the format's format_codes code (what a
            dsquant.formats.registry entry gives as kernel_code).
        gate, up, down: one (q, scale, global_scale) per expert, each as stored for one linear: q [I, H] / [H, I]
            (FP4 packed along the last dim), scale as in the module docstring without the expert dim (None for
            bf16), global_scale float32 [] for nvfp4 (gate and up must share it, as fused partners do) else None.
    """
    f = expert_format(fmt)
    fmt = next(name for name, code in format_codes.MOE_FORMATS.items() if code == f.kernel_code)
    if not len(gate) == len(up) == len(down) > 0:
        raise ValueError(f"experts: {len(gate)} gate, {len(up)} up and {len(down)} down projections")
    w13 = torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)])  # [E, 2I, H]
    w2 = torch.stack([d[0] for d in down])
    if not f.quantized:
        return ExpertWeights(w13, w2)
    s13 = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])
    s2 = torch.stack([d[1] for d in down])
    if not f.has_global_scale:
        return ExpertWeights(w13, w2, fmt, s13, s2)
    for e, (g, u) in enumerate(zip(gate, up)):
        if not torch.equal(g[2].float().reshape(()), u[2].float().reshape(())):
            raise ValueError(f"expert {e}: gate and up global scales differ ({float(g[2])} vs {float(u[2])}); "
                             "NVFP4 gate/up partners must share one")
    gs13 = torch.stack([g[2].float().reshape(()) for g in gate])
    gs2 = torch.stack([d[2].float().reshape(()) for d in down])
    return ExpertWeights(w13, w2, fmt, s13, s2, gs13, gs2)
