"""Muon for the hidden weight matrices, AdamW for everything else, and MuonClip's query/key rescale.

Muon (Keller Jordan, 2024; scaled up in Moonlight, arXiv 2502.16982) replaces a matrix's update by the
nearest semi-orthogonal matrix to its momentum. One step for a matrix W (rows m, cols n) with gradient G:

    B <- mu * B + G                               momentum buffer (state "momentum_buffer")
    D  = G + mu * B  (Nesterov)  or  B            the direction
    O  = NS5(D)                                   Newton-Schulz: O ~ U V^T for D = U S V^T
    W <- W - lr * (0.2 * sqrt(max(m, n)) * O + weight_decay * W)

NS5 first divides D by its Frobenius norm (so every singular value is <= 1) and then applies
`newton_schulz_steps` (default 5) rounds of the quintic X <- a X + (b A + c A^2) X with A = X X^T and
(a, b, c) = (3.4445, -4.7750, 2.0315), Keller Jordan's coefficients: they push every singular value in
(0, 1] into roughly [0.7, 1.2] in five steps rather than converging exactly, which is what Muon needs.
The iteration runs on the wide orientation (m <= n), in bf16 on CUDA and fp32 on the CPU. The factor 0.2 * sqrt(max(m, n)) gives the
update the RMS of a typical AdamW update (Moonlight section 2.2), so one learning rate and one weight decay
serve both the Muon and the AdamW parameters.

What counts as a matrix (`matrix_view`): a 2-D weight is one matrix; the stacked routed-expert tensors are
batches of matrices, one per expert (`down_proj` (E, H, I)), and `gate_up_proj` (E, 2I, H) is split into each
expert's gate and up matrices (2E matrices of (I, H)), because they are two projections stored together.
Matrices of the same shape are orthogonalised in one batched call. Which parameters go to Muon is
`kmodel.train.optim.uses_muon` (the standard split, overridable in the recipe).

MuonClip (Kimi K2 report): Muon lets attention logits grow; after every update each attention head whose
largest pre-softmax logit S (scale * q.k over the positions it may attend to, tracked in the step's
forwards) exceeds tau gets gamma = tau / S folded into its query and key weights, so the same inputs give
logits scaled by gamma. Multi-head attention: q and k rows each by sqrt(gamma). Grouped-query attention (a
key head shared by g query heads): the key head by sqrt(min gamma of its group) and each query head by the
rest of its gamma, so each head's logits scale by exactly its own gamma. MLA: the no-RoPE query part and the
head's no-RoPE key rows of kv_b_proj by sqrt(gamma), the RoPE query part by the full gamma (the RoPE key is
shared by all heads and left alone). Projection biases scale with their rows. With QK-norm the logits do
not depend on the scale of the q/k projections, so the rescale is a no-op by design and is not applied;
the logits are still tracked and reported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from kmodel.model.mla import LatentAttention

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic
RMS_MATCH = 0.2  # Moonlight: 0.2 * sqrt(max(m, n)) matches AdamW's update RMS
NS_EPS = 1e-7


def newton_schulz(d: torch.Tensor, steps: int) -> torch.Tensor:
    """The approximately orthogonalised (..., m, n) batch of matrices `d`, returned in fp32. The iteration runs
    in bf16 on CUDA (tensor cores; the quintic tolerates it, as in Keller Jordan's and Moonlight's runs) and
    in fp32 elsewhere (CPU bf16 matmuls are slow, and CPU runs are the bit-exact reference)."""
    a, b, c = NS_COEFFICIENTS
    x = d.float()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    if x.is_cuda:
        x = x.bfloat16()
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.float()
    return x if wide else x.mT


def matrix_view(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(count, rows, cols): the parameter is `count` matrices of (rows, cols), stored consecutively."""
    if len(shape) < 2:
        raise ValueError(f"{name} has shape {tuple(shape)}: Muon updates matrices (2-D, or stacked 3-D experts)")
    rows, cols = shape[-2], shape[-1]
    count = math.prod(shape[:-2])
    if name.endswith("experts.gate_up_proj"):  # each expert's gate rows [0, I) and up rows [I, 2I)
        return 2 * count, rows // 2, cols
    return count, rows, cols


def rms_scale(rows: int, cols: int) -> float:
    return RMS_MATCH * math.sqrt(max(rows, cols))


def orthogonalized(directions: list[torch.Tensor], views: list[tuple[int, int, int]], steps: int) -> list[torch.Tensor]:
    """Muon's update for each direction (any layout holding count * rows * cols numbers, returned flat in
    that layout): NS5 per matrix, RMS-matched; matrices of one shape, across all directions, batched."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, rows, cols) in enumerate(views):
        by_shape[(rows, cols)].append(i)
    out: list[torch.Tensor | None] = [None] * len(directions)
    for (rows, cols), members in by_shape.items():
        stacked = torch.cat([directions[i].reshape(-1, rows, cols) for i in members])
        result = newton_schulz(stacked, steps).mul_(rms_scale(rows, cols))
        for i, part in zip(members, result.split([views[i][0] for i in members])):
            out[i] = part.reshape(-1)
    return out


def momentum_direction(grad: torch.Tensor, buffer: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update the momentum buffer in place with `grad` and return the direction Muon orthogonalises."""
    buffer.mul_(momentum).add_(grad)
    return grad.add(buffer, alpha=momentum) if nesterov else buffer.clone()


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch's AdamW step (same state keys: a float `step` tensor, `exp_avg`, `exp_avg_sq`)."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = state["step"].item()
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


class Muon(torch.optim.Optimizer):
    """Muon groups (`"muon": True`, each parameter described by `views[i]` = its `matrix_view`) and AdamW
    groups (`"muon": False`) in one optimizer, so a single learning rate schedule drives both.

    A Muon group's parameters are whole matrices here. When a distributed engine replaces a group's
    parameters by flat pieces of its matrices (ZeRO partitions, expert-optimizer shards), it registers
    `layouts[first piece]`: an object whose `directions_to_updates(directions)` turns this rank's pieces of the
    directions into its pieces of the orthogonalised updates, running each matrix's Newton-Schulz once, on
    one owner rank (kmodel.parallel.muon_zero). `view_of` keeps each original matrix parameter's view."""

    def __init__(self, groups: list[dict], *, lr: float, momentum: float, nesterov: bool, ns_steps: int,
                 betas: tuple[float, float], eps: float):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "betas": betas,
                    "eps": eps, "weight_decay": 0.0, "muon": False}
        super().__init__(groups, defaults)
        self.view_of: dict[torch.Tensor, tuple[int, int, int]] = {}
        for group in self.param_groups:
            if group["muon"]:
                if len(group["views"]) != len(group["params"]):
                    raise ValueError("a Muon group needs one matrix view per parameter")
                self.view_of.update(zip(group["params"], group["views"]))
        self.layouts: dict[torch.Tensor, object] = {}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                for param in group["params"]:
                    if param.grad is not None:
                        adamw_update(param, param.grad, self.state[param], group)
        return loss

    def _muon_step(self, group: dict) -> None:
        layout = self.layouts.get(group["params"][0]) if group["params"] else None
        # a sharded group's pieces all join the exchange, with or without a gradient
        params = [p for p in group["params"] if p.grad is not None or layout is not None]
        directions = []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(param)
            state["step"] += 1
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            directions.append(momentum_direction(grad, state["momentum_buffer"], group["momentum"], group["nesterov"]))
        if layout is not None:
            updates = layout.directions_to_updates(directions)
        else:
            unknown = [tuple(p.shape) for p in params if p not in self.view_of]
            if unknown:
                raise RuntimeError(f"Muon was handed pieces {unknown[:3]} that are not its matrices (a ZeRO partition?) "
                                   "without a layout: call kmodel.parallel.muon_zero.attach_to_zero after deepspeed.initialize")
            updates = orthogonalized(directions, [self.view_of[p] for p in params], group["ns_steps"])
        for param, update in zip(params, updates):
            param.mul_(1 - group["lr"] * group["weight_decay"])
            param.add_(update.view_as(param), alpha=-group["lr"])


# --- MuonClip ------------------------------------------------------------------------------------------


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module that can track its maximum logits (GQA and MLA), by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "max_logits")}


class QKClip:
    """MuonClip's per-head logit cap: turns on max-logit tracking in every attention module, and after each
    update returns the row factors that bring each head's largest logit back to `tau` (see the module doc).

        clip = QKClip(model, tau)
        ...forward/backward, optimizer step...
        logits = clip.step_logits()            # {layer: (heads,)} this step's maxima (then reset)
        clip.apply(model, clip.row_scales(logits))  # in place on the module weights (engines: on masters)
    """

    def __init__(self, model: nn.Module, tau: float):
        self.tau = tau
        self.layers = attention_modules(model)
        for attn in self.layers.values():
            attn.max_logits = torch.full((attn.num_heads,), -math.inf)

    def step_logits(self) -> dict[str, torch.Tensor]:
        """Each layer's per-head maximum logit over the step's forwards (fp32, CPU; the maximum over all ranks
        when torch.distributed is initialised: collective), then reset."""
        if not self.layers:
            return {}
        stacked = torch.cat([attn.max_logits.detach().float().reshape(-1) for attn in self.layers.values()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        logits = dict(zip(self.layers, stacked.cpu().split([attn.num_heads for attn in self.layers.values()])))
        for attn in self.layers.values():
            attn.max_logits = torch.full_like(attn.max_logits, -math.inf)
        return logits

    def gammas(self, logits: torch.Tensor) -> torch.Tensor:
        """Per head: tau / S where S > tau, else 1."""
        return torch.where(logits > self.tau, self.tau / logits.clamp_min(1e-30), torch.ones_like(logits))

    def row_scales(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{parameter name (relative to the model): factor per output row} for the heads to clip; layers with
        QK-norm (no-op by design) and layers whose heads are all under tau are left out."""
        scales = {}
        for name, attn in self.layers.items():
            gamma = self.gammas(logits[name])
            if bool((gamma == 1).all()) or getattr(attn, "q_norm", None) is not None:
                continue
            for param, factor in qk_row_scales(attn, gamma).items():
                scales[f"{name}.{param}" if name else param] = factor
        return scales

    @staticmethod
    @torch.no_grad()
    def apply(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, factor in scales.items():
            param = params[name]
            shape = (-1,) + (1,) * (param.ndim - 1)
            param.mul_(factor.to(param.device, param.dtype).view(shape))


def qk_row_scales(attn: nn.Module, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name in `attn`: factor per output row} that multiply head h's logits by gamma[h]."""
    if isinstance(attn, LatentAttention):
        root = gamma.sqrt()
        per_head_q = torch.cat((root[:, None].expand(-1, attn.nope_dim), gamma[:, None].expand(-1, attn.rope_dim)), 1)
        per_head_kv = torch.cat((root[:, None].expand(-1, attn.nope_dim), torch.ones(len(gamma), attn.v_dim)), 1)
        q_name = "q_b_proj.weight" if attn.low_rank_query else "q_proj.weight"
        return {q_name: per_head_q.reshape(-1), "kv_b_proj.weight": per_head_kv.reshape(-1)}
    group = attn.num_heads // attn.num_kv_heads
    key = gamma.view(attn.num_kv_heads, group).amin(1).sqrt()  # per key head
    query = gamma / key.repeat_interleave(group)
    scales = {"q_proj": query.repeat_interleave(attn.head_dim), "k_proj": key.repeat_interleave(attn.head_dim)}
    out = {f"{proj}.weight": factor for proj, factor in scales.items()}
    if attn.q_proj.bias is not None:
        out.update({f"{proj}.bias": factor for proj, factor in scales.items()})
    return out
