"""Triton MoE kernels against the reference: router (ties, bias, groups), dispatch, grouped SwiGLU, combine,
the fused moe_experts, and the tiny model with `kernels: triton` against `kernels: torch`.

CPU runs use the Triton interpreter in fp32 with tiny shapes and compare with float64 references; bf16 checks
and the no-host-sync check under CUDA's sync debug mode are GPU-only tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel launches; the kernels read it lazily

pytest.importorskip("triton")

from kmodel.kernels import triton_support  # noqa: E402
from kmodel.kernels.moe import reference, triton_impl  # noqa: E402
from kmodel.kernels.testing import assert_low_precision_close  # noqa: E402
from kmodel.safe_path import python_command  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter GEMM blocks are 32 rows by 128 columns. WIDE sizes span two column tiles, the second partial
# (H = 136, 2I = 144); NARROW ones fit one partial tile and keep the slow interpreter runs short.
WIDE, NARROW = (136, 72), (40, 24)


def _close(actual, expected, tol=1e-4, name=""):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=name)


# ----------------------------------------------------------------------------------------------------- router


ROUTER_CASES = {
    "sigmoid_bias": dict(top_k=2, score_func="sigmoid"),
    "softmax": dict(top_k=3, score_func="softmax"),
    "groups": dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "top1_unnormalised": dict(top_k=1, score_func="softmax", norm_topk_prob=False, routed_scaling_factor=0.5),
    "top_k_all": dict(top_k=12, score_func="sigmoid"),
    "one_expert_per_group": dict(top_k=2, score_func="sigmoid", n_group=12, topk_group=3),
}


@pytest.mark.parametrize("case", ROUTER_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_route_matches_reference(case, ties):
    num_tokens, num_experts = 41, 12
    gen = torch.Generator().manual_seed(0)
    if ties:  # four distinct logits: equal scores within tokens and equal group scores, decided by index
        # (no value pairs like a, -a whose sigmoids sum to 1 up to rounding: ties must be exact everywhere)
        logits = torch.tensor([-1.5, 0.25, 1.0, 2.0])[torch.randint(0, 4, (num_tokens, num_experts), generator=gen)]
        bias = torch.randint(0, 2, (num_experts,), generator=gen).float() * 0.25
    else:
        logits = torch.randn(num_tokens, num_experts, generator=gen)
        bias = torch.randn(num_experts, generator=gen) * 0.1
    options = ROUTER_CASES[case]
    bias = bias if options["score_func"] == "sigmoid" else None
    expected = reference.route(logits, bias, **options)
    actual = triton_impl.route(logits.to(DEVICE), None if bias is None else bias.to(DEVICE), **options)
    assert torch.equal(actual.experts.cpu(), expected.experts)
    assert torch.equal(actual.tokens_per_expert.cpu(), expected.tokens_per_expert)
    assert actual.experts.dtype == actual.tokens_per_expert.dtype == torch.int64
    _close(actual.weights, expected.weights, 1e-6)
    _close(actual.scores, expected.scores, 1e-6)


def test_route_bias_steers_selection_but_not_weights():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 8, generator=gen).to(DEVICE)
    bias = torch.zeros(8, device=DEVICE)
    bias[5] = 10.0  # expert 5 is always chosen ...
    routing = triton_impl.route(logits, bias, top_k=2, routed_scaling_factor=2.0)
    assert (routing.experts == 5).any(dim=1).all()
    # ... yet every weight is the unbiased sigmoid score, renormalised over the chosen pair and scaled.
    chosen = logits.sigmoid().gather(1, routing.experts)
    _close(routing.weights, 2.0 * chosen / chosen.sum(dim=1, keepdim=True), 1e-6)


@pytest.mark.parametrize("case", ["sigmoid_bias", "softmax", "groups", "top1_unnormalised"])
def test_route_gradient_matches_float64(case):
    """d(weights . g_w + scores . g_s)/d logits against a float64 evaluation of the same selection."""
    options = ROUTER_CASES[case]
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(23, 12, generator=gen, dtype=torch.float64)
    bias = torch.randn(12, generator=gen) * 0.1 if options["score_func"] == "sigmoid" else None
    grad_weights = torch.randn(23, options["top_k"], generator=gen, dtype=torch.float64)
    grad_scores = torch.randn(23, 12, generator=gen, dtype=torch.float64)

    logits32 = logits.float().to(DEVICE).requires_grad_()
    routing = triton_impl.route(logits32, None if bias is None else bias.to(DEVICE), **options)
    loss = (routing.weights * grad_weights.float().to(DEVICE)).sum()
    (loss + (routing.scores * grad_scores.float().to(DEVICE)).sum()).backward()

    # float64 weights for the selection the kernel made (the selection itself is checked against the reference).
    logits64 = logits.clone().requires_grad_()
    scores = logits64.sigmoid() if options["score_func"] == "sigmoid" else logits64.softmax(-1)
    weights = scores.gather(1, routing.experts.cpu())
    if options.get("norm_topk_prob", True):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * options.get("routed_scaling_factor", 1.0)
    ((weights * grad_weights).sum() + (scores * grad_scores).sum()).backward()
    _close(logits32.grad, logits64.grad, 1e-5)


def test_route_rejects_bad_configuration():
    logits = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="top_k=9"):
        triton_impl.route(logits, None, top_k=9)
    with pytest.raises(ValueError, match="n_group=3"):
        triton_impl.route(logits, None, top_k=2, n_group=3)
    with pytest.raises(ValueError, match="kept groups"):
        triton_impl.route(logits, None, top_k=5, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="score function"):
        triton_impl.route(logits, None, top_k=2, score_func="relu")


# ----------------------------------------------------------------------------------- dispatch and experts


def _assignments(kind: str, num_tokens: int, num_experts: int, top_k: int, gen) -> torch.Tensor:
    """(tokens, k) distinct expert ids per token, with the load pattern `kind`."""
    if kind == "all_to_one":  # expert 2 gets every token (its segment spans several GEMM tiles)
        rest = torch.stack([torch.randperm(num_experts - 1, generator=gen)[: top_k - 1] for _ in range(num_tokens)])
        rest = rest + (rest >= 2).long()
        return torch.cat([torch.full((num_tokens, 1), 2), rest], dim=1)
    experts = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if kind == "empty_experts":  # experts 0 and last receive no token
        experts = torch.stack(
            [torch.randperm(num_experts - 2, generator=gen)[:top_k] + 1 for _ in range(num_tokens)]
        )
    return experts


def _expert_inputs(num_tokens, num_experts, top_k, kind, seed, sizes=NARROW):
    hidden, inter = sizes
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    experts = _assignments(kind, num_tokens, num_experts, top_k, gen)
    weights = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen, dtype=torch.float64) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen, dtype=torch.float64) * inter**-0.5
    return x, experts, weights, gate_up, down


def _grads_of(fn, inputs, differentiable, grad_out):
    leaves = [t.detach().clone().requires_grad_() if i in differentiable else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaves[i].grad for i in differentiable]


def _to_device32(tensors):
    """fp32 copies on DEVICE (integer tensors keep their dtype; None, an absent bias, stays None)."""
    return [None if t is None else t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in tensors]


MOE_CASES = [  # (tokens, experts, top_k, load pattern, sizes)
    (37, 6, 2, "random", WIDE),  # 74 rows: uneven expert segments, some longer than one 32-row tile
    (37, 6, 2, "empty_experts", NARROW),
    (37, 6, 2, "all_to_one", NARROW),  # one 37-row segment: two tiles, the second partial
    (19, 5, 1, "random", NARROW),  # top-1
    (11, 4, 4, "random", NARROW),  # top-k = number of experts
    (1, 3, 2, "random", NARROW),  # a single token
]


@pytest.mark.parametrize("num_tokens, num_experts, top_k, kind, sizes", MOE_CASES)
def test_moe_experts_matches_float64_reference(num_tokens, num_experts, top_k, kind, sizes):
    inputs = _expert_inputs(num_tokens, num_experts, top_k, kind, seed=num_tokens + top_k, sizes=sizes)
    grad_out = torch.randn(num_tokens, sizes[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    differentiable = (0, 2, 3, 4)  # x, weights, gate_up_proj, down_proj
    expected, expected_grads = _grads_of(reference.moe_experts, inputs, differentiable, grad_out)
    actual, actual_grads = _grads_of(triton_impl.moe_experts, _to_device32(inputs), differentiable, grad_out.to(DEVICE))
    _close(actual, expected, name="out")
    for name, got, want in zip(("x", "weights", "gate_up_proj", "down_proj"), actual_grads, expected_grads):
        _close(got, want, name=f"grad {name}")


def test_routing_weight_gradient_survives_the_autotune_sequence():
    """On a GPU triton.autotune first runs every config on the live buffers, then the winner. The routing-weight
    gradient is summed from one partial column per BLOCK_N slice; a buffer column written only by narrow
    configs once kept the last benchmark's value when a wider winner ran (I = 96: two 64-wide slices, one
    128-wide), so d weight came out wrong by about its own size. Replayed here under the interpreter, every
    autotuned MoE kernel with it, the winner the widest config after narrower ones."""
    inputs = _expert_inputs(13, 3, 2, "random", seed=3, sizes=(32, 96))
    grad_out = torch.randn(13, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    differentiable = (0, 2, 3, 4)
    expected, expected_grads = _grads_of(reference.moe_experts, inputs, differentiable, grad_out)
    widest_first = triton_impl._grouped_mm_kernel.configs[0].kwargs["BLOCK_N"]
    assert widest_first == max(config.kwargs["BLOCK_N"] for config in triton_impl._grouped_mm_kernel.configs)
    with triton_support.replay_autotuning(winner=0):
        actual, actual_grads = _grads_of(
            triton_impl.moe_experts, _to_device32(inputs), differentiable, grad_out.to(DEVICE)
        )
    _close(actual, expected, name="out")
    for name, got, want in zip(("x", "weights", "gate_up_proj", "down_proj"), actual_grads, expected_grads):
        _close(got, want, name=f"grad {name}")


def test_moe_experts_with_no_tokens():
    _, _, _, gate_up, down = _to_device32(_expert_inputs(1, 4, 2, "random", seed=0))
    gate_up.requires_grad_()
    x = torch.zeros(0, NARROW[0], device=DEVICE)
    experts = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    out = triton_impl.moe_experts(x, experts, torch.zeros(0, 2, device=DEVICE), gate_up, down)
    assert out.shape == (0, NARROW[0])
    out.sum().backward()
    assert not gate_up.grad.any()
    # With gpt-oss's options: the bias gradients are zeros too (written, not left uninitialised).
    gate_up_bias = torch.ones(4, 2 * NARROW[1], device=DEVICE, requires_grad=True)
    down_bias = torch.ones(4, NARROW[0], device=DEVICE, requires_grad=True)
    out = triton_impl.moe_experts(x, experts, torch.zeros(0, 2, device=DEVICE), gate_up, down,
                                  gate_up_bias=gate_up_bias, down_bias=down_bias, activation="clamped_swiglu")
    assert out.shape == (0, NARROW[0])
    out.sum().backward()
    assert not gate_up_bias.grad.any() and not down_bias.grad.any()


@pytest.mark.parametrize("kind, sizes", [("random", WIDE), ("empty_experts", NARROW), ("all_to_one", NARROW)])
def test_permute_grouped_swiglu_combine_match_float64_reference(kind, sizes):
    """The separate pieces expert parallelism calls, each forward and backward against float64."""
    num_tokens, num_experts, top_k = 29, 6, 3
    x, experts, weights, gate_up, down = _expert_inputs(num_tokens, num_experts, top_k, kind, seed=3, sizes=sizes)
    x_sorted, order, counts = reference.permute(x, experts, num_experts)
    got_sorted, got_order, got_counts = triton_impl.permute(x.float().to(DEVICE), experts.to(DEVICE), num_experts)
    assert torch.equal(got_order.cpu(), order) and torch.equal(got_counts.cpu(), counts)
    assert got_order.dtype == got_counts.dtype == torch.int64
    _close(got_sorted, x_sorted, 1e-6)

    gen = torch.Generator().manual_seed(4)
    rows = torch.randn_like(x_sorted)
    grad_x = _grads_of(lambda t: reference.permute(t, experts, num_experts)[0], [x], (0,), rows)[1][0]
    got_grad_x = _grads_of(
        lambda t: triton_impl.permute(t, experts.to(DEVICE), num_experts)[0], _to_device32([x]), (0,), rows.to(DEVICE)
    )[1][0]
    _close(got_grad_x, grad_x, name="permute grad")

    grad_y = torch.randn(x_sorted.shape, generator=gen, dtype=torch.float64)
    swiglu_inputs = [x_sorted, counts, gate_up, down]
    expected, expected_grads = _grads_of(reference.grouped_swiglu, swiglu_inputs, (0, 2, 3), grad_y)
    actual, actual_grads = _grads_of(
        triton_impl.grouped_swiglu, _to_device32(swiglu_inputs), (0, 2, 3), grad_y.to(DEVICE)
    )
    _close(actual, expected, name="grouped_swiglu")
    for name, got, want in zip(("x_sorted", "gate_up_proj", "down_proj"), actual_grads, expected_grads):
        _close(got, want, name=f"grouped_swiglu grad {name}")

    grad_out = torch.randn(num_tokens, sizes[0], generator=gen, dtype=torch.float64)
    combine_inputs = [rows, order, weights]
    expected, expected_grads = _grads_of(reference.combine, combine_inputs, (0, 2), grad_out)
    actual, actual_grads = _grads_of(triton_impl.combine, _to_device32(combine_inputs), (0, 2), grad_out.to(DEVICE))
    _close(actual, expected, name="combine")
    for name, got, want in zip(("y_sorted", "weights"), actual_grads, expected_grads):
        _close(got, want, name=f"combine grad {name}")


# ------------------------------------------------------------------------------ gpt-oss expert options


GPT_OSS_OPTIONS = {  # (expert biases, activation)
    "clamped_biases": (True, "clamped_swiglu"),
    "clamped": (False, "clamped_swiglu"),
    "biases": (True, "swiglu"),
}
# Clamp limits tried, all exact in binary: the one whose clamp edge is farthest from every pre-activation is
# used, so fp32 and float64 agree on which side of the edge each value falls.
LIMIT_CANDIDATES = [1.0 + j / 64 for j in range(32)]
CLAMP_MARGIN = 1e-5  # fp32 pre-activation errors at these sizes are below 1e-6


def _gpt_oss_inputs(num_tokens, num_experts, top_k, kind, seed, sizes, options):
    """Expert inputs plus gpt-oss's options: [x, experts, weights, gate_up, down, gate_up_bias, down_bias] and the
    keyword arguments (activation, swiglu_alpha, swiglu_limit).

    Pre-activations are spread (std about 2) so the clamp bites above the limit for gate and on both sides for
    up. With biases, token 0 is zero and its first expert's biases put one gate and two up values exactly on
    the clamp edges (+limit, +limit, -limit), where torch.clamp's gradient still passes."""
    biases, activation = GPT_OSS_OPTIONS[options]
    x, experts, weights, gate_up, down = _expert_inputs(num_tokens, num_experts, top_k, kind, seed, sizes)
    hidden, inter = sizes
    gen = torch.Generator().manual_seed(seed + 1000)
    gate_up = gate_up * 2.0
    gate_up_bias = down_bias = None
    if biases:
        gate_up_bias = torch.randn(num_experts, 2 * inter, generator=gen, dtype=torch.float64) * 0.5
        down_bias = torch.randn(num_experts, hidden, generator=gen, dtype=torch.float64) * 0.5
        x[0] = 0.0
    inputs = [x, experts, weights, gate_up, down, gate_up_bias, down_bias]
    if activation == "swiglu":
        return inputs, dict(activation="swiglu")

    def pre_activations(bias):
        """Gate and up pre-activations of every (token, slot) except the exact token 0 (when pinned)."""
        tokens = torch.arange(num_tokens).repeat_interleave(top_k)
        rows = torch.einsum("rh,rch->rc", x[tokens], gate_up[experts.flatten()])
        if bias is not None:
            rows = rows + bias[experts.flatten()]
            rows = rows[tokens != 0]
        return rows[:, :inter], rows[:, inter:]

    best = None
    for limit in LIMIT_CANDIDATES:
        bias = gate_up_bias
        if biases:
            bias = gate_up_bias.clone()
            bias[experts[0, 0], [0, inter, inter + 1]] = torch.tensor([limit, limit, -limit], dtype=torch.float64)
        gate, up = pre_activations(bias)
        margin = min((gate - limit).abs().min().item(), (up.abs() - limit).abs().min().item())
        if best is None or margin > best[0]:
            best = (margin, limit, bias)
    margin, limit, gate_up_bias = best
    assert margin > CLAMP_MARGIN, f"no clamp limit keeps {CLAMP_MARGIN} away from every pre-activation"
    gate, up = pre_activations(gate_up_bias)
    assert (gate > limit).any() and (gate < limit).any() and (up > limit).any() and (up < -limit).any()
    inputs[5] = gate_up_bias
    return inputs, dict(activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=limit)


def _present(inputs, positions):
    """The positions of inputs that are tensors (an absent bias is None)."""
    return tuple(i for i in positions if inputs[i] is not None)


GPT_OSS_CASES = [  # (tokens, experts, top_k, load pattern, sizes, options)
    (37, 6, 2, "random", WIDE, "clamped_biases"),  # H spans two column tiles (bias adds, d gate_up_bias)
    (37, 6, 2, "empty_experts", NARROW, "clamped_biases"),  # experts without tokens: zero bias gradients
    (23, 5, 2, "all_to_one", (40, 136), "clamped_biases"),  # I spans two column slices (d weight, d down_bias)
    (19, 5, 1, "random", NARROW, "clamped_biases"),  # top-1
    (11, 4, 4, "random", NARROW, "clamped_biases"),  # top-k = number of experts
    (17, 4, 2, "random", NARROW, "clamped"),  # the clamped activation without biases
    (17, 4, 2, "random", NARROW, "biases"),  # biases with plain SwiGLU
]
EXPERT_GRAD_NAMES = ("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


@pytest.mark.parametrize("num_tokens, num_experts, top_k, kind, sizes, options", GPT_OSS_CASES)
def test_moe_experts_gpt_oss_options_match_float64_reference(num_tokens, num_experts, top_k, kind, sizes, options):
    """Forward and every gradient (x, routing weights, both weights, both biases) with gpt-oss's expert options,
    clamps biting on every side and values exactly on the clamp edges."""
    inputs, kwargs = _gpt_oss_inputs(num_tokens, num_experts, top_k, kind, num_tokens + top_k, sizes, options)
    grad_out = torch.randn(num_tokens, sizes[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    differentiable = _present(inputs, (0, 2, 3, 4, 5, 6))

    def call(module):
        return lambda x, e, w, gu, dn, gub, dnb: module.moe_experts(
            x, e, w, gu, dn, gate_up_bias=gub, down_bias=dnb, **kwargs
        )

    expected, expected_grads = _grads_of(call(reference), inputs, differentiable, grad_out)
    actual, actual_grads = _grads_of(call(triton_impl), _to_device32(inputs), differentiable, grad_out.to(DEVICE))
    _close(actual, expected, name="out")
    names = [EXPERT_GRAD_NAMES[(0, 2, 3, 4, 5, 6).index(i)] for i in differentiable]
    for name, got, want in zip(names, actual_grads, expected_grads):
        _close(got, want, name=f"grad {name}")
    if kind == "empty_experts":  # experts 0 and last own no rows: their bias gradients are exactly zero
        for name, got in zip(names, actual_grads):
            if name.endswith("bias"):
                assert not got[[0, -1]].any(), name


@pytest.mark.parametrize("kind, sizes", [("empty_experts", NARROW), ("random", (40, 136))])
def test_grouped_swiglu_gpt_oss_options_match_float64_reference(kind, sizes):
    """The expert-parallel piece with biases and the clamped activation: forward, d x_sorted, both weights and
    both biases against float64."""
    (x, experts, _, gate_up, down, gate_up_bias, down_bias), kwargs = _gpt_oss_inputs(
        29, 6, 3, kind, seed=11, sizes=sizes, options="clamped_biases"
    )
    x_sorted, _, counts = reference.permute(x, experts, 6)
    inputs = [x_sorted, counts, gate_up, down, gate_up_bias, down_bias]
    grad_y = torch.randn(x_sorted.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)

    def call(module):
        return lambda xs, c, gu, dn, gub, dnb: module.grouped_swiglu(
            xs, c, gu, dn, gate_up_bias=gub, down_bias=dnb, **kwargs
        )

    differentiable = (0, 2, 3, 4, 5)
    expected, expected_grads = _grads_of(call(reference), inputs, differentiable, grad_y)
    actual, actual_grads = _grads_of(call(triton_impl), _to_device32(inputs), differentiable, grad_y.to(DEVICE))
    _close(actual, expected, name="grouped_swiglu")
    names = ("x_sorted", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")
    for name, got, want in zip(names, actual_grads, expected_grads):
        _close(got, want, name=f"grouped_swiglu grad {name}")


def test_clamped_swiglu_gradient_is_zero_where_clamped():
    """Every gate above the limit and every up beyond it (both signs): h is a constant per column, so no
    gradient reaches x, gate_up_proj or gate_up_bias (exactly zero, as autograd through the reference's clamps
    gives), while down_proj, down_bias and the routing weights still get theirs."""
    x, experts, weights, gate_up, down = _expert_inputs(13, 4, 2, "random", seed=13)
    inter = NARROW[1]
    signs = torch.ones(2 * inter, dtype=torch.float64)
    signs[inter + 1 :: 2] = -1.0  # every other up column clamped from below
    gate_up_bias = (20.0 * signs).expand(4, -1).clone()
    down_bias = torch.randn(4, NARROW[0], generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    inputs = [x, experts, weights, gate_up, down, gate_up_bias, down_bias]
    kwargs = dict(activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)
    grad_out = torch.randn(13, NARROW[0], generator=torch.Generator().manual_seed(15), dtype=torch.float64)

    def call(module):
        return lambda x, e, w, gu, dn, gub, dnb: module.moe_experts(
            x, e, w, gu, dn, gate_up_bias=gub, down_bias=dnb, **kwargs
        )

    differentiable = (0, 2, 3, 4, 5, 6)
    expected, expected_grads = _grads_of(call(reference), inputs, differentiable, grad_out)
    actual, actual_grads = _grads_of(call(triton_impl), _to_device32(inputs), differentiable, grad_out.to(DEVICE))
    _close(actual, expected, name="out")
    for name, got, want in zip(EXPERT_GRAD_NAMES, actual_grads, expected_grads):
        if name in ("x", "gate_up_proj", "gate_up_bias"):
            assert not want.any() and not got.any(), name
        else:
            assert want.abs().max() > 0.1, name
            _close(got, want, name=f"grad {name}")


@contextlib.contextmanager
def _host_reads_forbidden():
    """Fail on Python-side reads of tensor values (.item(), .tolist(), bool(), int(), float())."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbid(name):
        def read(*_args, **_kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")

        return read

    for name in names:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_triton_path_never_reads_tensor_values_on_the_host():
    x, experts, weights, gate_up, down = _to_device32(_expert_inputs(13, 4, 2, "random", seed=5))
    logits = torch.randn(13, 4, device=DEVICE, requires_grad=True)
    gate_up.requires_grad_()
    gate_up_bias = torch.zeros(4, gate_up.shape[1], device=DEVICE, requires_grad=True)
    gpt_oss = dict(gate_up_bias=gate_up_bias, down_bias=torch.zeros(4, x.shape[1], device=DEVICE),
                   activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=0.5)
    with _host_reads_forbidden():
        routing = triton_impl.route(logits, torch.zeros(4, device=DEVICE), top_k=2)
        out = triton_impl.moe_experts(x, routing.experts, routing.weights, gate_up, down)
        out = out + triton_impl.moe_experts(x, routing.experts, routing.weights, gate_up, down, **gpt_oss)
        out.sum().backward()
    assert logits.grad is not None and gate_up.grad is not None and gate_up_bias.grad is not None
    # And the guard does catch what it is meant to catch.
    with _host_reads_forbidden(), pytest.raises(AssertionError, match="tolist"):
        reference.grouped_swiglu(x, torch.tensor([13, 0, 0, 0]), gate_up, down)


def test_moe_inputs_are_validated():
    x, experts, weights, gate_up, down = _to_device32(_expert_inputs(5, 4, 2, "random", seed=6))
    with pytest.raises(ValueError, match="do not match"):
        triton_impl.moe_experts(x, experts, weights, gate_up[:, :, :-1], down)
    with pytest.raises(ValueError, match="weights shape"):
        triton_impl.moe_experts(x, experts, weights[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="gate_up_bias shape"):
        triton_impl.moe_experts(x, experts, weights, gate_up, down, gate_up_bias=torch.zeros(4, 1, device=DEVICE))
    with pytest.raises(ValueError, match="down_bias shape"):
        triton_impl.grouped_swiglu(x, torch.tensor([5, 0, 0, 0]), gate_up, down, down_bias=gate_up[:, :, 0])
    with pytest.raises(ValueError, match="unknown expert activation 'gelu'"):
        triton_impl.moe_experts(x, experts, weights, gate_up, down, activation="gelu")
    with pytest.raises(TypeError, match="share one dtype"):
        triton_impl.moe_experts(x, experts, weights, gate_up, down, down_bias=x.new_zeros(4, 40).double())
    if DEVICE == "cpu":  # on CUDA the id check is a device-side assert (asynchronous), by design
        with pytest.raises(RuntimeError, match="expert id"):
            triton_impl.moe_experts(x, experts + 4, weights, gate_up, down)
        with pytest.raises(RuntimeError, match="add up"):
            triton_impl.grouped_swiglu(x, torch.tensor([1, 1, 1, 1]), gate_up, down)


# ----------------------------------------------------------------------------------------------------- model


def _randomise_expert_biases(model) -> None:
    """gpt-oss's expert biases start at zero; give them values (the same for every model of the recipe)."""
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".experts." in name and name.endswith("_bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _clamp_hits(model, limit: float, input_ids) -> tuple[int, int, int]:
    """(gates above the limit, ups above it, ups below -limit) among the routed experts' pre-activations in a
    forward of `input_ids`, seen through a hook on every Experts module."""
    hits = [0, 0, 0]

    def hook(experts, args):
        tokens, routing = args[0].detach(), args[1]
        inter = experts.down_proj.shape[-1]
        for expert in range(experts.gate_up_proj.shape[0]):
            rows = tokens[(routing.experts == expert).any(dim=1)]
            gate_up = rows @ experts.gate_up_proj[expert].detach().t() + experts.gate_up_proj_bias[expert].detach()
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            for i, count in enumerate(((gate > limit).sum(), (up > limit).sum(), (up < -limit).sum())):
                hits[i] += int(count)

    handles = [moe.experts.register_forward_pre_hook(hook) for moe in model.moe_layers().values()]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(hits)


# gpt-oss: expert biases and clamped_swiglu, with a limit the tiny model's pre-activations (std about 0.23) cross.
TINY_RECIPES = {"tiny-ko-moe": ("recipes/tiny-ko-moe.yaml", []),
                "gpt-oss": ("recipes/tiny/gpt-oss.yaml", ["model.swiglu_limit=0.25"])}


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_tiny_model_triton_kernels_match_torch_kernels(recipe):
    """A tiny recipe with kernels torch vs triton (moe, norm, loss; attention has its own tests): logits,
    loss and every parameter gradient of a training step, then after the optimizer step and, with sigmoid
    routing, the MoE bias update (fed by the router's token counts) the balancing bias and the next step's
    loss. gpt-oss runs its expert biases (randomised) and clamped SwiGLU, clamps biting, through the Triton
    experts: `kernels.moe=triton` takes them (and `auto` picks Triton on CUDA) rather than refusing."""
    from kmodel.config import load_config
    from kmodel.model import build_model

    path, extra = TINY_RECIPES[recipe]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 8192, (2, 8), generator=gen).to(DEVICE)
    labels = torch.randint(0, 8192, (2, 8), generator=gen).to(DEVICE)
    labels[0, :2] = -100
    results = {}
    for impl in ("torch", "triton"):
        cfg = load_config(path, overrides=extra + [f"kernels.{op}={impl}" for op in ("moe", "norm", "loss")])
        model = build_model(cfg, DEVICE)
        assert all(moe.kernel is (triton_impl if impl == "triton" else reference)
                   for moe in model.moe_layers().values())
        if cfg.model.expert_bias:
            _randomise_expert_biases(model)
        if cfg.model.expert_activation == "clamped_swiglu" and impl == "torch":
            hits = _clamp_hits(model, cfg.model.swiglu_limit, input_ids)
            assert min(hits) > 0, f"the clamp never bites: {hits}"
        model.train()
        out = model(input_ids, labels=labels, return_logits=True)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        model.end_step()
        biases = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
        with torch.no_grad():
            next_loss = model(input_ids, labels=labels).loss
        results[impl] = (out.logits.detach(), out.loss.detach(), grads, biases, next_loss)
    expected, actual = results["torch"], results["triton"]
    _close(actual[0], expected[0], 1e-4, "logits")
    _close(actual[1], expected[1], 1e-5, "loss")
    assert actual[2].keys() == expected[2].keys()
    expert_params = ["experts.gate_up_proj", "experts.down_proj"]
    if cfg.model.expert_bias:
        expert_params += ["experts.gate_up_proj_bias", "experts.down_proj_bias"]
    for param in expert_params:
        assert any(name.endswith(param) for name in expected[2]), param
    for name, grad in expected[2].items():
        _close(actual[2][name], grad, 1e-4, f"grad {name}")
    if cfg.model.router == "sigmoid" and cfg.model.router_bias_update_rate > 0:
        assert expected[3] and all(bias.any() for bias in expected[3].values())  # the bias update did happen
    for name, bias in expected[3].items():
        assert torch.equal(actual[3][name], bias), name
    _close(actual[4], expected[4], 1e-5, "loss after one step")


# ------------------------------------------------------------------------------------- benchmark and compile


@pytest.mark.parametrize("experts", ["swiglu", "gpt-oss"])
def test_moe_benchmark_runs_in_reduced_cpu_mode(tmp_path, experts):
    from kmodel.kernels.moe import bench

    impls = ["triton", "grouped_mm", "reference", "loop"] if DEVICE == "cpu" else ["reference", "loop"]
    argv = ["--preset", "cpu-tiny", "--tokens", "48", "--impl", *impls, "--warmup", "0", "--iters", "1",
            "--device", "cpu", "--dtype", "fp32", "--out-dir", str(tmp_path), "--experts", experts]
    assert bench.main(argv) == 0
    stem = "moe_cpu" if experts == "swiglu" else "moe_gpt_oss_cpu"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["reduced_cpu_mode"] and result["device_type"] == "cpu"
    assert {(row["impl"], row["mode"], row["expert_kind"]) for row in result["rows"]} == {
        (impl, mode, experts) for impl in impls for mode in ("forward", "forward+backward")
    }
    assert all(row["ms"] > 0 and row["tflops"] > 0 for row in result["rows"])
    assert "Reduced CPU mode" in (tmp_path / f"{stem}.md").read_text()


def test_moe_benchmark_layers_compute_the_same_layer():
    """The benchmark's four implementations of the routed layer agree, gpt-oss's experts included."""
    from kmodel.kernels.moe import bench

    for kind in bench.EXPERT_KINDS:
        x, logits, bias, gate_up, down, options = bench._inputs(40, 32, 24, 6, torch.float32, "cpu", expert_kind=kind)
        assert ("gate_up_bias" in options) == (kind == "gpt-oss")
        expected = bench.LAYERS["reference"](x, logits, bias, gate_up, down, 2, options)
        for impl in ("grouped_mm", "loop") if bench._grouped_mm_op() else ("loop",):
            _close(bench.LAYERS[impl](x, logits, bias, gate_up, down, 2, options), expected, 1e-5, f"{kind} {impl}")


def _compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = python_command("-m", "kmodel.kernels.compile_check", *args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200, check=False)


def test_every_kernel_variant_compiles_for_hopper_without_spills():
    """What the interpreter cannot check: the GPU compiler accepts every kernel (first autotune config)."""
    pytest.importorskip("triton.backends.nvidia")
    result = _compile_check("--ops", "moe", "norm", "loss", "--first-config-only")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "every variant compiled without spills" in result.stdout


@pytest.mark.slow
def test_every_autotune_config_compiles_for_hopper_without_spills():
    """Every op's every config, attention's included: the one compile check."""
    pytest.importorskip("triton.backends.nvidia")
    result = _compile_check()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-sized bf16 shapes)")
@pytest.mark.parametrize("kind, experts", [("random", "swiglu"), ("empty_experts", "swiglu"),
                                           ("all_to_one", "swiglu"), ("random", "gpt-oss")])
def test_moe_experts_bf16_on_gpu(kind, experts):
    """bf16 against float64; gpt-oss: biases and clamped_swiglu with a limit (1.0) that bites often."""
    x, e, w, gate_up, down = _expert_inputs(1000, 16, 4, kind, seed=8, sizes=(512, 256))
    gen = torch.Generator().manual_seed(10)
    biases = [None, None]
    kwargs = {}
    if experts == "gpt-oss":
        biases = [torch.randn(16, 512, generator=gen, dtype=torch.float64) * 0.5,
                  torch.randn(16, 512, generator=gen, dtype=torch.float64) * 0.5]
        kwargs = dict(activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=1.0)
    inputs = [x, e, w, gate_up, down, *biases]
    grad_out = torch.randn(1000, 512, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    differentiable = _present(inputs, (0, 2, 3, 4, 5, 6))

    def call(module):
        return lambda x, e, w, gu, dn, gub, dnb: module.moe_experts(
            x, e, w, gu, dn, gate_up_bias=gub, down_bias=dnb, **kwargs
        )

    expected, expected_grads = _grads_of(call(reference), inputs, differentiable, grad_out)
    bf16 = [None if t is None else t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.cuda() for t in inputs]
    bf16[2] = bf16[2].float()  # routing weights stay fp32, as route returns them
    actual, actual_grads = _grads_of(call(triton_impl), bf16, differentiable, grad_out.cuda())
    low, low_grads = _grads_of(call(reference), bf16, differentiable, grad_out.cuda())
    assert actual.dtype == low.dtype == torch.bfloat16
    # Each tensor within twice the bf16 reference's error plus 2% of its own size (never a fixed tolerance).
    assert_low_precision_close("out", actual, low, expected, slack=2e-2)
    names = [EXPERT_GRAD_NAMES[(0, 2, 3, 4, 5, 6).index(i)] for i in differentiable]
    for name, got, lo, want in zip(names, actual_grads, low_grads, expected_grads):
        assert_low_precision_close(name, got, lo, want, slack=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_layer_has_no_host_sync_on_gpu():
    x, experts, weights, gate_up, down = [
        t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.cuda()
        for t in _expert_inputs(512, 8, 2, "random", seed=10, sizes=(256, 128))
    ]
    logits = torch.randn(512, 8, device="cuda", requires_grad=True)
    gate_up.requires_grad_()
    bias = torch.zeros(8, device="cuda")
    # Warm up (autotuning benchmarks and compiles with synchronisations of its own).
    for _ in range(2):
        routing = triton_impl.route(logits, bias, top_k=2)
        triton_impl.moe_experts(x, routing.experts, routing.weights, gate_up, down).float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = triton_impl.route(logits, bias, top_k=2)
        out = triton_impl.moe_experts(x, routing.experts, routing.weights, gate_up, down)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(gate_up.grad).all()
