"""The planner: will a recipe fit on a cluster, and how fast will it train? Arithmetic on the config (no tensors).

Everything here is arithmetic on the recipe, written out so it can be checked by hand (docs/parallel.md
derives each formula). Units: parameters and elements are counts, memory is bytes, time is seconds.

    counts = parameter_counts(cfg.model)                  # dense / routed-expert / active parameters
    plan = make_plan(cfg, Cluster(nodes=32, gpus_per_node=8, gpu=GPUS["h100-80gb"]))
    print(format_plan(plan))                               # raises PlanError when it does not fit

Assumptions (each one a field of `Assumptions`, printed with every plan; `Assumptions.for_config` reads them
from the recipe): bf16 weights and gradients with fp32 Adam master weights and moments (12 bytes per
parameter) under DeepSpeed's mixed precision; fp32 training under DeepSpeed keeps 4-byte weights and gradients
and, in ZeRO's partitions, its own fp32 master copy besides the 8 bytes of moments (12 bytes); one process
without DeepSpeed updates the weights in place (8 bytes of moments); under `train.optimizer: muon` its
matrices keep one 4-byte momentum instead of the 8 bytes of moments, and its Newton-Schulz FLOPs and owner
exchange join the step time. The memory categories are the ones the
trainer measures (kmodel.train.memory.CATEGORIES), so a CPU fp32 rehearsal checks the plan. Routing is balanced (every expert
gets k/E of the tokens). Attention is a fused kernel that stores no score matrix; sliding layers see at
most `sliding_window` keys, which is counted in the attention FLOPs and in the inference KV cache. Multi-head
latent attention (MLA) is counted as training runs it: its latent is expanded to per-head keys and values.
Communication uses ring collectives on NVLink inside a node and InfiniBand across nodes.
Context parallelism divides each sequence's tokens over its ranks and adds the halo / gather exchanges of
kmodel.parallel.context_parallel; pipeline parallelism plans every stage (its pieces of the model from
kmodel.parallel.pipeline_split, its activations times the micro-batches in flight) and adds the bubble and the
stage-to-stage sends. Layouts the engine refuses are planned and marked (`Plan.engine_refusal`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from kmodel.config import Config, ModelConfig
from kmodel.parallel.context_parallel import ContextLayout, gather_bytes, halo_bytes
from kmodel.train.flops import (
    PEAK_BF16_FLOPS,
    attention_flops_per_token,
    attention_head_dims,
    flops_per_token,
    layer_attention_flops_per_token,
)
from kmodel.train.memory import CATEGORIES

GiB = 1024**3
IMBALANCE = 1.5  # load of the busiest expert over the mean, for the plan's routing-sensitivity line


class PlanError(ValueError):
    """A plan that cannot run; the message says what does not fit and what would."""


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    peak_tflops: float  # dense bf16 tensor-core peak
    nvlink_gbps: float  # GB/s one direction per GPU inside a node
    network_gbps: float  # GB/s per GPU across nodes (one NIC per GPU)


GPUS = {  # peaks from kmodel.train.flops, the table training MFU uses
    "h100-80gb": GPU("h100-80gb", 80 * GiB, PEAK_BF16_FLOPS["H100"] / 1e12, 450.0, 50.0),  # SXM5, NVLink 4, 8x 400 Gb/s NDR
    "h200-141gb": GPU("h200-141gb", 141 * GiB, PEAK_BF16_FLOPS["H200"] / 1e12, 450.0, 50.0),
    "a100-80gb": GPU("a100-80gb", 80 * GiB, PEAK_BF16_FLOPS["A100"] / 1e12, 300.0, 25.0),  # SXM4, NVLink 3, 8x 200 Gb/s HDR
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int = 8
    gpu: GPU = GPUS["h100-80gb"]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Assumptions:
    kernel_efficiency: float = 0.45  # achieved share of peak FLOP/s in matmuls and attention
    zero_overlap: float = 0.5  # share of ZeRO communication hidden behind compute
    memory_headroom: float = 0.90  # usable share of GPU memory (context, allocator fragmentation)
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12  # fp32 master + Adam m and v
    pcie_gbps: float = 25.0  # GB/s host <-> GPU per GPU (PCIe 5 x16, shared by the node's GPUs)
    cpu_adam_params_per_s: float = 4e8  # DeepSpeed's CPU Adam per GPU's share of the host's cores

    @classmethod
    def for_dtype(cls, dtype: str, *, master_copy: bool = False, **overrides) -> "Assumptions":
        """Bytes per parameter for train.dtype: bf16 always has fp32 masters (12 optimizer bytes); fp32 has a
        separate master copy only under DeepSpeed (`master_copy`: ZeRO's fp32 partitions), else 8."""
        if dtype == "fp32":
            return cls(param_bytes=4, grad_bytes=4, optimizer_bytes=12 if master_copy else 8, **overrides)
        return cls(**overrides)

    @classmethod
    def for_config(cls, cfg: Config, **overrides) -> "Assumptions":
        """The recipe's real dtypes: train.dtype, where 'auto' is fp32 on a CPU run and bf16 otherwise."""
        t = cfg.train
        dtype = t.dtype if t.dtype != "auto" else ("fp32" if t.device == "cpu" else "bf16")
        return cls.for_dtype(dtype, master_copy=cfg.parallel.backend == "deepspeed", **overrides)


# --- parameters -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int  # input embedding (a lookup: no matmul FLOPs unless tied to the head)
    dense: int  # every parameter that is not a routed expert, embedding included
    expert: int  # all routed experts of all MoE layers (and the MTP block's)
    active_expert: int  # routed-expert parameters one token uses: k/E of `expert`
    matmul_active: int  # parameters one token multiplies with (FLOPs = 2 x this per token, forward)

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def active(self) -> int:
        return self.dense + self.active_expert


def _norms_per_layer(cfg: ModelConfig) -> int:
    return {"pre": 2, "post": 2, "sandwich": 4}[cfg.norm_placement]


def _attention_params(cfg: ModelConfig) -> int:
    if cfg.attention_kind == "mla":
        return _latent_attention_params(cfg)
    if cfg.attention_kind == "differential":
        return _differential_attention_params(cfg)
    if cfg.attention_kind == "differential_latent":
        return _differential_latent_attention_params(cfg)
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    params = h * q + 2 * h * kv + q * h + (2 * d if cfg.qk_norm else 0)
    if cfg.attention_bias:
        params += q + 2 * kv + h  # q/k/v/o projection biases
    if cfg.attention_sinks:
        params += cfg.num_attention_heads  # one learned sink logit per head
    return params


def _latent_attention_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention (kmodel/model/mla.py): the query, full-rank (h -> heads x qk) or low-rank
    (h -> q_lora_rank, its RMSNorm, -> heads x qk); kv_a (h -> kv_lora_rank + rope), the latent's RMSNorm;
    kv_b (kv_lora_rank -> heads x (nope + v)); o (heads x v -> h). qk = nope + rope per head."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
    query = h * n * qk if rq is None else h * rq + rq + rq * n * qk
    kv = h * (rkv + cfg.qk_rope_head_dim) + rkv + rkv * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return query + kv + n * cfg.v_head_dim * h


def _differential_attention_params(cfg: ModelConfig) -> int:
    """Grouped differential attention (kmodel/model/diff_attention.py): q (h -> heads x d), k and v (h -> kv
    heads x d), o (signal heads x 2d -> h), four lambda vectors of d, the per-head RMSNorm over 2d."""
    h, d = cfg.hidden_size, cfg.head_dim
    signal = cfg.num_attention_heads - cfg.num_noise_heads
    return h * cfg.num_attention_heads * d + 2 * h * cfg.num_key_value_heads * d + signal * 2 * d * h + 4 * d + 2 * d


def _differential_latent_attention_params(cfg: ModelConfig) -> int:
    """Differential latent attention (kmodel/model/diff_latent_attention.py): MLA's query (heads x qk) and latent,
    kv_b (kv_lora_rank -> key heads x (nope + v)), lambda_proj (h -> signal heads), the RMSNorm over 2v, the
    optional gate (h -> signal heads x 2v) and o (signal heads x 2v -> h)."""
    h, n, v = cfg.hidden_size, cfg.num_attention_heads, cfg.v_head_dim
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
    signal_out = (n - cfg.num_noise_heads) * 2 * v
    query = h * n * qk if rq is None else h * rq + rq + rq * n * qk
    kv = h * (rkv + cfg.qk_rope_head_dim) + rkv + rkv * cfg.num_key_value_heads * (cfg.qk_nope_head_dim + v)
    gate = h * signal_out if cfg.attention_output_gate else 0
    return query + kv + h * (n - cfg.num_noise_heads) + 2 * v + gate + signal_out * h


def _hyper_connection_params(cfg: ModelConfig) -> int:
    """One mHC per sublayer (kmodel/model/hyper_connections.py): fn (2n + n^2, n h), bias (2n + n^2), scale (3)."""
    n = cfg.hc_mult
    if n == 1:
        return 0
    maps = 2 * n + n * n
    return 2 * (maps * n * cfg.hidden_size + maps + 3)


def layer_params(cfg: ModelConfig, sparse: bool) -> tuple[int, int, int]:
    """(dense, routed expert, active routed expert) parameters of one decoder layer."""
    h = cfg.hidden_size
    dense = _attention_params(cfg) + _norms_per_layer(cfg) * h + _hyper_connection_params(cfg)
    if not sparse:
        polynorm = 4 if cfg.mlp_activation == "polynorm" else 0  # its 3 weights and bias
        return dense + 3 * h * cfg.intermediate_size + polynorm, 0, 0
    im = cfg.moe_intermediate_size
    polynorm = 4 if cfg.mlp_activation == "polynorm" else 0  # one PolyNorm per expert and in the shared MLP
    dense += cfg.num_experts * h + 3 * h * im * cfg.num_shared_experts  # router + shared experts
    dense += polynorm if cfg.num_shared_experts else 0
    dense += cfg.num_experts if cfg.router_bias else 0
    dense += h if cfg.post_mlp_norm else 0  # RMSNorm on the MoE output (A.X K1)
    per_expert = 3 * h * im + (2 * im + h if cfg.expert_bias else 0) + polynorm
    return dense, cfg.num_experts * per_expert, cfg.num_experts_per_tok * per_expert


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    """Exact parameter counts of `kmodel.model.Model(cfg)`."""
    h, v = cfg.hidden_size, cfg.vocab_size
    layers = [t == "sparse" for t in cfg.mlp_layer_types]
    layers += [cfg.mtp_mlp_type == "sparse"] * cfg.num_nextn_predict_layers  # one block per MTP depth
    dense = expert = active_expert = 0
    for sparse in layers:
        d, e, a = layer_params(cfg, sparse)
        dense, expert, active_expert = dense + d, expert + e, active_expert + a
    embedding = v * h
    head = 0 if cfg.tie_word_embeddings else v * h
    dense += embedding + head + h  # + final norm
    dense += cfg.num_nextn_predict_layers * (2 * h * h + 3 * h)  # per MTP depth: eh_proj, enorm, hnorm, its norm
    matmul = dense - embedding + active_expert
    if cfg.tie_word_embeddings:
        matmul += embedding  # the shared matrix is used as the head
    matmul += cfg.num_nextn_predict_layers * v * h  # the head runs again for each MTP depth's prediction
    # Norm weights and the router are elementwise or tiny; counting them as matmul changes nothing visible.
    return ParameterCounts(embedding, dense, expert, active_expert, matmul)


def seq_len_of(cfg: Config) -> int:
    """Training sequence length: data.seq_len, or max_position_embeddings for recipes without data."""
    return cfg.data.seq_len if cfg.data is not None else cfg.model.max_position_embeddings


# --- compute ----------------------------------------------------------------------------------------


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token without recomputation, by the trainer's formula (kmodel.train.flops) applied to
    the config's parameter counts."""
    return flops_per_token(parameter_counts(cfg).matmul_active, cfg, seq_len)


# --- Muon (train.optimizer: muon) ---------------------------------------------------------------------

MUON_SAVED_BYTES = 4  # Muon keeps one fp32 momentum per matrix element where AdamW keeps two fp32 moments
NS_FLOPS_PER_ELEMENT = 6  # one quintic Newton-Schulz step on an m x n matrix (m <= n): 4 m^2 n + 2 m^3 <= 6 m (m n)


def adamw_params_under_muon(cfg: ModelConfig) -> int:
    """Parameters `train.optimizer: muon` leaves on AdamW (kmodel.train.optim.uses_muon): the embedding, the LM
    head and the routers, exactly; norms and biases are counted with the matrices (well under 0.1%)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    moe_layers = cfg.mlp_layer_types.count("sparse") + (
        cfg.num_nextn_predict_layers if cfg.mtp_mlp_type == "sparse" else 0
    )
    return v * h * (1 if cfg.tie_word_embeddings else 2) + moe_layers * cfg.num_experts * h


def optimizer_bytes(cfg: Config, assume: Assumptions) -> tuple[float, float]:
    """Optimizer bytes per parameter for the data-parallel (non-expert-shard) parameters and for routed-expert
    shards: `assume.optimizer_bytes` under AdamW; under Muon its matrices keep MUON_SAVED_BYTES less (the
    data-parallel share by the whole model's count, also for a pipeline stage's part of it)."""
    if cfg.train.optimizer != "muon":
        return assume.optimizer_bytes, assume.optimizer_bytes
    counts = parameter_counts(cfg.model)
    dense = counts.total if cfg.parallel.expert_parallel_size == 1 else counts.dense
    muon_share = 1 - adamw_params_under_muon(cfg.model) / dense
    return assume.optimizer_bytes - MUON_SAVED_BYTES * muon_share, assume.optimizer_bytes - MUON_SAVED_BYTES


def newton_schulz_flops_per_gpu(cfg: Config, world: int) -> float:
    """Muon's Newton-Schulz FLOPs per optimizer step on one GPU: every matrix once per step, spread over the
    ranks by its owner (ZeRO 1-3 and the expert shards; ZeRO-0 repeats every matrix on every rank). An upper
    bound: the shorter side of an expert matrix is min(hidden, moe_intermediate), of any other the hidden size."""
    if cfg.train.optimizer != "muon":
        return 0.0
    m, counts = cfg.model, parameter_counts(cfg.model)
    dense = counts.dense - adamw_params_under_muon(m)
    expert_side = min(m.hidden_size, m.moe_intermediate_size or m.hidden_size)
    total = NS_FLOPS_PER_ELEMENT * cfg.train.muon_ns_steps * (dense * m.hidden_size + counts.expert * expert_side)
    return total / (world if cfg.parallel.zero_stage >= 1 else cfg.parallel.pipeline_parallel_size)


def muon_exchange_bytes(cfg: Config, world: int) -> float:
    """Bytes one rank sends per step in Muon's owner exchange (kmodel.parallel.muon_zero): its fp32 pieces of
    the directions to the owners and the owners' update pieces back, for the dense matrices over a pipeline
    stage's ranks and the expert shards over the expert-data-parallel group. None at ZeRO-0 (whole matrices on
    every rank)."""
    if cfg.train.optimizer != "muon" or cfg.parallel.zero_stage == 0:
        return 0.0
    m, counts, ep = cfg.model, parameter_counts(cfg.model), cfg.parallel.expert_parallel_size
    dense = counts.dense - adamw_params_under_muon(m) + (counts.expert if ep == 1 else 0)
    expert = counts.expert / ep if ep > 1 else 0.0
    stage = world // cfg.parallel.pipeline_parallel_size
    return 2 * 4 * (ring_bytes(dense / world, stage) + ring_bytes(expert / (world // ep), stage // ep))


# --- memory -----------------------------------------------------------------------------------------


def _sublayer_ends_elements(cfg: ModelConfig) -> int:
    """Elements per token an attention or MLP sublayer keeps at its two ends, by norm placement: the input its
    first projections read (h); the input norm's own input (pre, sandwich: h more; the norm's output is what the
    projections read); the output norm's input, i.e. the sublayer's output (post, sandwich: h more; the norm's
    output only feeds the residual add, which keeps nothing). pre and post: 2h; sandwich: 3h."""
    placement = cfg.norm_placement
    return cfg.hidden_size * (1 + (placement in ("pre", "sandwich")) + (placement in ("post", "sandwich")))


def _attention_activation_elements(cfg: ModelConfig) -> int:
    """Elements one attention block keeps per token: its ends (`_sublayer_ends_elements`), then
    GQA: q, k, v as the attention kernel reads them (after QK-norm and RoPE), q and k once more before their
    QK-norm (the norm keeps its input; v has no norm, so it is kept once), and the attention output;
    MLA: the query latent and its norm (low-rank query only), kv_a's output (the latent and the shared RoPE key,
    kept as one tensor), the normed latent, the per-head q and k (nope + rope), kv_b's output (the per-head
    no-RoPE key and value: the value is a view of it, so all of it stays) and the attention output."""
    ends, n = _sublayer_ends_elements(cfg), cfg.num_attention_heads
    if cfg.attention_kind == "mla":
        qk, v = attention_head_dims(cfg)
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        query_latent = 0 if rq is None else 2 * rq
        latent = (rkv + cfg.qk_rope_head_dim) + rkv
        heads = 2 * n * qk + n * (cfg.qk_nope_head_dim + v) + n * v
        return ends + query_latent + latent + heads
    if cfg.attention_kind == "differential_latent":
        qk, nkv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.num_key_value_heads
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        query_latent = 0 if rq is None else 2 * rq
        latent = (rkv + cfg.qk_rope_head_dim) + rkv
        signal_out = (n - cfg.num_noise_heads) * 2 * cfg.v_head_dim
        # q before and after RoPE, kv_b's output, the keys, the two maps' outputs and their difference, lambda
        heads = 2 * n * qk + nkv * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nkv * qk + 3 * signal_out
        heads += n - cfg.num_noise_heads
        gate = 2 * signal_out if cfg.attention_output_gate else 0  # the gate's logits and the normed output
        return ends + query_latent + latent + heads + gate + signal_out
    d, nkv = cfg.head_dim, cfg.num_key_value_heads
    qk = (n + nkv) * d
    return ends + qk * (2 if cfg.qk_norm else 1) + nkv * d + n * d


def activation_elements_per_token(cfg: ModelConfig, sparse: bool) -> dict[str, float]:
    """Elements one decoder layer keeps for backward per token, by part (see docs/parallel.md)."""
    h = cfg.hidden_size
    attention = _attention_activation_elements(cfg)
    ends = _sublayer_ends_elements(cfg)
    hc = {"hyper_connections": _hyper_connection_activation_elements(cfg)} if cfg.hc_mult > 1 else {}
    # A plain-torch SwiGLU MLP keeps gate out, up out, silu(gate) and their product: 4 x intermediate.
    if not sparse:
        return {"attention": attention, "mlp": ends + 4 * cfg.intermediate_size, **hc}
    k, im = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = k * (2 * h + 3 * im)  # permuted copy in, gate/up out, product, expert out
    shared = 4 * im * cfg.num_shared_experts
    router = 2 * cfg.num_experts * 2  # fp32 logits and scores, counted in 2-byte units
    output_norm = h if cfg.post_mlp_norm else 0  # A.X K1: its input, routed + shared output summed
    return {"attention": attention, "mlp": ends + routed + shared + router + output_norm, **hc}


def _hyper_connection_activation_elements(cfg: ModelConfig) -> int:
    """Per sublayer (two per layer): the n streams (read by the maps and by H_res x), their normalised copy, the
    map logits, every Sinkhorn step's two fp32 n x n matrices (2-byte units) and the next streams' sum."""
    n, h = cfg.hc_mult, cfg.hidden_size
    sinkhorn = cfg.hc_sinkhorn_iters * 2 * n * n * 2
    return 2 * (3 * n * h + 2 * n + n * n + sinkhorn)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    params: float
    grads: float
    optimizer: float
    activations: float
    cpu_offloaded: float  # bytes moved to host memory by the offload options
    offloaded_optimizer: float = 0.0  # of which optimizer state (updated on the CPU every step)

    @property
    def total(self) -> float:
        return sum(self.by_category().values())

    def by_category(self) -> dict[str, float]:
        """Bytes per GPU under the trainer's category names (kmodel.train.memory.CATEGORIES)."""
        return {name: getattr(self, name) for name in CATEGORIES}


@dataclass(frozen=True)
class Piece:
    """A part of the model one pipeline chunk holds whole: the embedding, a decoder layer, an MTP depth or the head
    (final norm and LM head). Per token; the pieces of a model add up to its parameter counts and FLOPs."""

    name: str
    flops_per_token: float  # training FLOPs, forward + backward without recomputation
    dense: int  # parameters every data-parallel replica holds
    expert: int  # routed-expert parameters (sharded under expert parallelism)
    layer_elements: float  # elements a layer keeps for backward; only its input under activation checkpointing
    kept_elements: float  # elements kept either way (the heads' norm inputs and outputs)
    logits: int  # fp32 logits an unfused loss keeps (the head: every prediction's)
    attention_of: int | None = None  # the decoder layer whose attention it runs (an MTP depth: the last layer's)


def model_pieces(cfg: Config) -> list[Piece]:
    """The model in pipeline order: embedding, decoder layers, MTP depths, head."""
    m, seq = cfg.model, seq_len_of(cfg)
    h, v, depths = m.hidden_size, m.vocab_size, m.num_nextn_predict_layers

    def layer(name: str, sparse: bool, attention_of: int, extra_params: int = 0, head: int = 0, kept: int = 0) -> Piece:
        dense, expert, active = layer_params(m, sparse)
        matmul = dense + active + extra_params + head
        flops = 3 * (2 * matmul + layer_attention_flops_per_token(m, seq, attention_of))
        elements = sum(activation_elements_per_token(m, sparse).values())
        return Piece(name, flops, dense + extra_params, expert, elements, kept, 0, attention_of)

    pieces = [Piece("embedding", 0.0, v * h, 0, 0, 0, 0)]  # a lookup: no matmul FLOPs
    pieces += [layer(f"layers.{i}", t == "sparse", i) for i, t in enumerate(m.mlp_layer_types)]
    # each MTP depth: a copy of a decoder layer with the last layer's attention, eh_proj and its three norms
    # (2h^2 + 3h), the shared head once more, and its norms' inputs and outputs and concatenation kept (5h)
    mtp_sparse, last = m.mtp_mlp_type == "sparse", m.num_hidden_layers - 1
    pieces += [layer(f"mtp.{k}", mtp_sparse, last, 2 * h * h + 3 * h, v * h, 5 * h) for k in range(depths)]
    head = (0 if m.tie_word_embeddings else v * h) + h  # the tied head is the embedding's matrix
    pieces.append(Piece("head", 3 * 2 * (v * h + h), head, 0, 0, 2 * h, v * (1 + depths)))
    return pieces


def tokens_per_rank(cfg: Config) -> int:
    """Tokens of one micro-batch on one GPU: a context-parallel rank holds 1/CP of each sequence."""
    return cfg.train.micro_batch_size * seq_len_of(cfg) // cfg.parallel.context_parallel_size


def pieces_activation_bytes(cfg: Config, pieces: list[Piece], *, element_bytes: int, fused_loss: bool,
                            in_flight: float = 1) -> float:
    """Activation memory at the peak of backward on a GPU that holds `pieces` and keeps `in_flight` micro-batches'
    activations (a pipeline stage: kmodel.parallel.pipeline_split.micro_batches_in_flight)."""
    layers = [p.layer_elements for p in pieces if p.layer_elements]
    if cfg.train.activation_checkpointing:
        # each layer keeps its input; one layer at a time is recomputed with all its activations
        per_micro_batch, once = len(layers) * cfg.model.hidden_size, max(layers, default=0)
    else:
        per_micro_batch, once = sum(layers), 0
    per_micro_batch += sum(p.kept_elements for p in pieces)
    # an unfused loss (the reference) keeps the fp32 logits of each head (main + MTP); its backward
    # recomputes the softmax from them
    logits = 0 if fused_loss else 4 * sum(p.logits for p in pieces)
    return tokens_per_rank(cfg) * (in_flight * (per_micro_batch * element_bytes + logits) + once * element_bytes)


def activation_bytes(cfg: Config, *, element_bytes: int, fused_loss: bool) -> float:
    """Activation memory of one micro-batch on one GPU holding the whole model, at the peak of backward."""
    return pieces_activation_bytes(cfg, model_pieces(cfg), element_bytes=element_bytes, fused_loss=fused_loss)


EXPERT_GRAD_BYTES = 4  # the expert optimizer keeps its reduce-scattered gradient pieces in fp32 (ZeRO-2)


def memory_per_gpu(cfg: Config, world: int, assume: Assumptions, *, fused_loss: bool) -> Memory:
    """Memory of one GPU holding the whole model (no pipeline) with `world` data- and context-parallel ranks."""
    return pieces_memory(cfg, world, assume, model_pieces(cfg), fused_loss=fused_loss)


def pieces_memory(cfg: Config, replicas: int, assume: Assumptions, pieces: list[Piece], *, fused_loss: bool,
                  in_flight: float = 1) -> Memory:
    """Memory of one GPU holding `pieces`, replicated over `replicas` ranks (a pipeline stage's data x context
    parallel ranks), with `in_flight` micro-batches of activations.

    ZeRO stage s shards optimizer states (s>=1), gradients (s>=2) and weights (s=3) over the replicas: all of them
    for dense parameters, replicas/EP ranks for each expert shard. Under expert parallelism (EP > 1) a rank holds
    E/EP experts; their fp32 masters and moments are sharded over the expert-data-parallel group (replicas/EP
    ranks) from ZeRO-1 on, their reduced gradients from ZeRO-2 on (in fp32), and their weights are never sharded
    further (ZeRO-3 with EP is refused)."""
    p = cfg.parallel
    ep = p.expert_parallel_size
    dense, expert = sum(x.dense for x in pieces), sum(x.expert for x in pieces)
    if ep == 1:  # the experts are ordinary data-parallel parameters
        dense, expert = dense + expert, 0.0
    else:
        expert = expert / ep  # the shard this rank is responsible for
    edp = replicas // ep

    def dense_part(stage_from: int) -> float:
        return dense / replicas if p.zero_stage >= stage_from else dense

    def expert_part(stage_from: int) -> float:
        return expert / edp if p.zero_stage >= stage_from else expert

    params = (dense_part(3) + expert) * assume.param_bytes
    expert_grad_bytes = EXPERT_GRAD_BYTES if p.zero_stage >= 2 else assume.grad_bytes
    grads = dense_part(2) * assume.grad_bytes + expert_part(2) * expert_grad_bytes
    dense_optimizer_bytes, expert_optimizer_bytes = optimizer_bytes(cfg, assume)
    optimizer = dense_part(1) * dense_optimizer_bytes + expert_part(1) * expert_optimizer_bytes
    offloaded_optimizer = 0.0
    if p.offload_optimizer:  # DeepSpeed's part: the expert optimizer keeps its state on the GPU
        offloaded_optimizer = dense_part(1) * assume.optimizer_bytes
        optimizer -= offloaded_optimizer
    offloaded = offloaded_optimizer
    if p.offload_params:
        offloaded += params
        params = 0.0
    acts = pieces_activation_bytes(cfg, pieces, element_bytes=assume.param_bytes, fused_loss=fused_loss,
                                   in_flight=in_flight)
    return Memory(params, grads, optimizer, acts, offloaded, offloaded_optimizer)


# --- communication and time -------------------------------------------------------------------------


def ring_bytes(payload: float, group: int) -> float:
    """Bytes each rank sends in a ring reduce-scatter or all-gather of `payload` bytes over `group` ranks."""
    return payload * (group - 1) / group if group > 1 else 0.0


def zero_bytes_per_step(params: float, group: int, stage: int, accum: int, element_bytes: int) -> float:
    """Bytes each rank sends per optimizer step to keep `params` parameters data-parallel.

    stage 0/1: one all-reduce of the gradients (reduce-scatter + all-gather) per step;
    stage 2: a reduce-scatter of the gradients every micro-batch, an all-gather of the weights per step;
    stage 3: weights all-gathered in forward and again in backward, gradients reduce-scattered, every micro-batch.
    """
    one = ring_bytes(params * element_bytes, group)
    if stage <= 1:
        return 2 * one
    if stage == 2:
        return accum * one + one
    return 3 * accum * one


def all_to_all_bytes_per_step(cfg: Config, element_bytes: int, moe_layers: int | None = None) -> float:
    """Bytes each rank sends in EP all-to-alls per step: per MoE layer (all of them, or a pipeline stage's
    `moe_layers`) and micro-batch, dispatch and combine in forward and again in backward (x 1.5 with activation
    recomputation), k copies of each of the rank's tokens (1/CP of each sequence under context parallelism)."""
    m, p = cfg.model, cfg.parallel
    ep = p.expert_parallel_size
    if ep == 1:
        return 0.0
    if moe_layers is None:
        moe_layers = m.mlp_layer_types.count("sparse") + (
            m.num_nextn_predict_layers if m.mtp_mlp_type == "sparse" else 0
        )
    per_exchange = tokens_per_rank(cfg) * m.num_experts_per_tok * m.hidden_size * element_bytes * (ep - 1) / ep
    exchanges = 4 * (1.5 if cfg.train.activation_checkpointing else 1)
    return per_exchange * exchanges * moe_layers * cfg.train.grad_accum_steps


def context_bytes_per_step(cfg: Config, element_bytes: int, attention_layers: list[int] | None = None) -> dict[str, float]:
    """Bytes the busiest rank of a context-parallel group receives per step in the attention layers
    `attention_layers` (decoder layer indices, an MTP depth repeating the last; default all), by layer kind: each
    sliding layer's halo (`context_parallel.halo_bytes`: the window's rows of the neighbouring chunk, or a gather
    when the window outreaches a chunk), each global layer's all-gather (`context_parallel.gather_bytes`), of the
    rows a token contributes to keys and values (`kv_cache_values_per_position`: keys and values under GQA, the
    latent and RoPE key under MLA). Per micro-batch in forward and again in backward (the gradients go back the
    same way), once more when activation checkpointing recomputes the forward."""
    m, cp = cfg.model, cfg.parallel.context_parallel_size
    if cp == 1:
        return {"sliding": 0.0, "global": 0.0}
    if attention_layers is None:
        attention_layers = [*range(m.num_hidden_layers), *[m.num_hidden_layers - 1] * m.num_nextn_predict_layers]
    row_bytes = cfg.train.micro_batch_size * m.kv_cache_values_per_position * element_bytes
    windows = Counter(m.window_of(i) for i in attention_layers)
    busiest = (0.0, 0.0)
    for rank in range(cp):
        layout = ContextLayout(seq_len_of(cfg), cp, rank)
        sliding = sum(n * halo_bytes(layout, w, row_bytes) for w, n in windows.items() if w is not None)
        whole = windows[None] * gather_bytes(layout, row_bytes)
        busiest = max(busiest, (sliding, whole), key=sum)
    exchanges = 2 * (1.5 if cfg.train.activation_checkpointing else 1) * cfg.train.grad_accum_steps
    return {"sliding": busiest[0] * exchanges, "global": busiest[1] * exchanges}


def pipeline_bytes_per_step(cfg: Config, element_bytes: int) -> float:
    """Bytes a GPU of a middle pipeline stage sends per step: each micro-batch's hidden states (all residual
    streams, and the input embeddings the last stage's MTP reads: kmodel.parallel.pipeline) to the next stage in
    forward and their gradient to the previous one in backward, once per chunk it holds. None without a pipeline."""
    p, m = cfg.parallel, cfg.model
    if p.pipeline_parallel_size == 1:
        return 0.0
    streams = m.hc_mult + (1 if m.num_nextn_predict_layers else 0)
    hidden = tokens_per_rank(cfg) * m.hidden_size * streams * element_bytes
    return 2 * p.pipeline_virtual_stages * cfg.train.grad_accum_steps * hidden


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as planned: its chunks' layers, the memory of each of its GPUs, the micro-batches
    of activations it keeps in flight and its busy time per step (compute, all-to-all, context and pipeline
    exchanges of all micro-batches)."""

    layers: tuple[range, ...]
    memory: Memory
    in_flight: float
    busy_s: float


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    assumptions: Assumptions
    counts: ParameterCounts
    memory: Memory
    usable_bytes: float
    zero_dense_bytes: float
    zero_expert_bytes: float
    all_to_all_bytes: float
    global_batch: int
    tokens_per_step: int
    compute_s: float
    comm_s: float
    step_s: float
    imbalanced_step_s: float  # step time when the busiest expert gets IMBALANCE x the mean load
    mfu: float
    tokens_per_day: float
    token_budget: float
    kv_cache_bytes_per_seq: float
    newton_schulz_flops: float = 0.0  # Muon, per GPU per step (in compute_s)
    muon_exchange_bytes: float = 0.0  # Muon's owner exchange, per GPU per step (in comm_s)
    context_bytes: dict[str, float] = field(default_factory=dict)  # CP halo ("sliding") / gather ("global") per step
    pipeline_bytes: float = 0.0  # point-to-point sends per GPU per step (in comm_s)
    bubble_fraction: float = 0.0  # pipeline idle time over busy time
    bubble_s: float = 0.0  # pipeline idle time per step (in step_s)
    stages: tuple[Stage, ...] = ()  # one per pipeline stage; `memory` is the largest stage's
    engine_refusal: str | None = None  # why the engine does not run this layout yet (planned all the same)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    @property
    def days(self) -> float:
        return self.token_budget / self.tokens_per_day


def kv_cache_bytes(cfg: ModelConfig, context: int, element_bytes: int = 2) -> float:
    """Inference KV cache of one sequence of `context` tokens: sliding layers keep `sliding_window` keys;
    MLA layers keep the compressed latent and the shared RoPE key, not full keys and values."""
    per_position = cfg.kv_cache_values_per_position * element_bytes
    kept = [
        min(context, cfg.sliding_window) if t == "sliding_attention" else context for t in cfg.layer_types
    ]
    return per_position * sum(kept)


def _bandwidth(group: int, contiguous: bool, cluster: Cluster) -> float:
    """Bytes/s per GPU for a collective over `group` ranks: NVLink if the group stays inside one node.
    Expert-parallel, context-parallel groups and a pipeline stage's ranks are consecutive ranks; data-parallel
    groups without a pipeline stride across all of them."""
    inside = group <= cluster.gpus_per_node if contiguous else cluster.world_size <= cluster.gpus_per_node
    return (cluster.gpu.nvlink_gbps if inside else cluster.gpu.network_gbps) * 1e9


def offload_seconds(memory: Memory, assume: Assumptions) -> float:
    """Time an optimizer offload adds to a step, not overlapped: the rank's gradient partition down and its
    updated weights up over PCIe, and the CPU Adam update of its optimizer partition."""
    if not memory.offloaded_optimizer:
        return 0.0
    params = memory.offloaded_optimizer / assume.optimizer_bytes
    return params * (assume.grad_bytes + assume.param_bytes) / (assume.pcie_gbps * 1e9) + params / assume.cpu_adam_params_per_s


def make_plan(cfg: Config, cluster: Cluster, assume: Assumptions | None = None, token_budget: float | None = None) -> Plan:
    """The per-GPU memory, communication and time of running `cfg` on `cluster` (does not raise on misfit;
    `check_fits` does). Under pipeline parallelism every stage is planned: the largest stage's memory decides
    the fit, the busiest stage paces the pipeline."""
    # imported here: pipeline_split builds on this module's pieces and memory model
    from kmodel.parallel import pipeline_split

    p, t, m = cfg.parallel, cfg.train, cfg.model
    world = cluster.world_size
    _check_layout(cfg, world)
    if assume is None:
        assume = Assumptions.for_config(cfg)
    counts = parameter_counts(m)
    fused_loss = uses_fused_loss(cfg)
    ep, pp, cp, v = p.expert_parallel_size, p.pipeline_parallel_size, p.context_parallel_size, p.pipeline_virtual_stages
    stage_size, micro_batches = world // pp, t.grad_accum_steps
    try:
        split = pipeline_split.check_pipeline(cfg)
    except pipeline_split.PipelineSplitError as error:
        raise PlanError(str(error)) from None
    seq = seq_len_of(cfg)
    tokens_per_step = t.micro_batch_size * micro_batches * (world // (pp * cp)) * seq
    rate = cluster.gpu.peak_tflops * 1e12 * assume.kernel_efficiency
    pipeline_bytes = pipeline_bytes_per_step(cfg, assume.param_bytes)
    pipeline_s = pipeline_bytes / _bandwidth(world, False, cluster)  # some stage boundary crosses nodes if any can
    stages, extra_s, parts = [], [], []
    for index, pieces in enumerate(pipeline_split.stage_pieces(cfg, split, pp)):
        in_flight = pipeline_split.micro_batches_in_flight(pp, v, index, micro_batches)
        memory = pieces_memory(cfg, stage_size, assume, pieces, fused_loss=fused_loss, in_flight=in_flight)
        part = _stage_costs(cfg, cluster, assume, pieces, stage_size)
        chunks = tuple(split[c] for c in range(index, len(split), pp))
        stages.append(Stage(chunks, memory, in_flight, part["busy_s"] + pipeline_s))
        extra_s.append(part["reduce_s"] + offload_seconds(memory, assume))
        parts.append(part)
    pace = max(range(pp), key=lambda i: stages[i].busy_s)  # the busiest stage sets the pipeline's rhythm
    bubble = pipeline_split.bubble_fraction(pp, v, micro_batches)
    bubble_s = bubble * stages[pace].busy_s
    muon_bytes = muon_exchange_bytes(cfg, world)
    muon_s = muon_bytes / _bandwidth(stage_size, True, cluster) * (1 - assume.zero_overlap)
    ns_flops = newton_schulz_flops_per_gpu(cfg, world)
    compute_s = parts[pace]["compute"] + ns_flops / rate
    comm_s = stages[pace].busy_s - parts[pace]["compute"] + max(extra_s) + muon_s
    step_s = compute_s + comm_s + bubble_s
    # Routing imbalance: under EP every rank waits for the one whose experts got the most tokens; with the
    # busiest expert at IMBALANCE x the mean load, that rank's routed-expert compute and all-to-all traffic grow
    # by as much. Without EP each rank runs all experts on its own tokens: the same work however they route.
    routed_share = 2 * counts.active_expert / (2 * counts.matmul_active + attention_flops_per_token(m, seq))
    imbalanced_step_s = step_s + (IMBALANCE - 1) * (compute_s * routed_share + parts[pace]["a2a_s"]) * (ep > 1)
    flops = model_flops_per_token(m, seq)
    mfu = tokens_per_step * flops / world / step_s / (cluster.gpu.peak_tflops * 1e12)
    tokens_per_day = tokens_per_step / step_s * 86400
    budget = token_budget if token_budget is not None else float(t.max_steps * tokens_per_step)
    largest = max(stages, key=lambda x: x.memory.total)

    def most(key: str) -> float:
        return max(part[key] for part in parts)

    return Plan(
        cluster=cluster,
        assumptions=assume,
        counts=counts,
        memory=largest.memory,
        usable_bytes=cluster.gpu.memory_bytes * assume.memory_headroom,
        zero_dense_bytes=most("zero_dense"),
        zero_expert_bytes=most("zero_expert"),
        all_to_all_bytes=most("a2a"),
        global_batch=t.micro_batch_size * micro_batches * (world // (pp * cp)),
        tokens_per_step=tokens_per_step,
        compute_s=compute_s,
        comm_s=comm_s,
        step_s=step_s,
        imbalanced_step_s=imbalanced_step_s,
        mfu=mfu,
        tokens_per_day=tokens_per_day,
        token_budget=budget,
        kv_cache_bytes_per_seq=kv_cache_bytes(m, m.max_position_embeddings),
        newton_schulz_flops=ns_flops,
        muon_exchange_bytes=muon_bytes,
        context_bytes={"sliding": most("sliding"), "global": most("global")},
        pipeline_bytes=pipeline_bytes,
        bubble_fraction=bubble,
        bubble_s=bubble_s,
        stages=tuple(stages),
        engine_refusal=_engine_refusal(cfg),
    )


def _stage_costs(cfg: Config, cluster: Cluster, assume: Assumptions, pieces: list[Piece], stage_size: int) -> dict:
    """Per step, for a GPU holding `pieces` in a stage of `stage_size` ranks: compute seconds, all-to-all and CP
    bytes (and seconds, on the critical path: `busy_s` = compute + exchanges), ZeRO bytes and the exposed part of
    their seconds (`reduce_s`: each stage reduces its own weights over its replicas, partly behind compute)."""
    p, t = cfg.parallel, cfg.train
    ep, cp, micro_batches, element_bytes = p.expert_parallel_size, p.context_parallel_size, t.grad_accum_steps, assume.param_bytes
    recompute = 4 / 3 if t.activation_checkpointing else 1  # recompute = one more forward
    rate = cluster.gpu.peak_tflops * 1e12 * assume.kernel_efficiency
    compute = micro_batches * tokens_per_rank(cfg) * sum(x.flops_per_token for x in pieces) * recompute / rate
    a2a = all_to_all_bytes_per_step(cfg, element_bytes, sum(1 for x in pieces if x.expert))
    context = context_bytes_per_step(cfg, element_bytes, [x.attention_of for x in pieces if x.attention_of is not None])
    dense, expert = sum(x.dense for x in pieces), sum(x.expert for x in pieces)
    zero_dense = zero_bytes_per_step(dense, stage_size, p.zero_stage, micro_batches, assume.grad_bytes)
    zero_expert = zero_bytes_per_step(expert / ep, stage_size // ep, p.zero_stage, micro_batches, assume.grad_bytes)
    a2a_s = a2a / _bandwidth(ep, True, cluster)
    busy_s = compute + a2a_s + sum(context.values()) / _bandwidth(cp, True, cluster)
    reduce_s = (zero_dense + zero_expert) / _bandwidth(stage_size, True, cluster) * (1 - assume.zero_overlap)
    return {"compute": compute, "a2a": a2a, "a2a_s": a2a_s, "zero_dense": zero_dense, "zero_expert": zero_expert,
            "busy_s": busy_s, "reduce_s": reduce_s, **context}


def uses_fused_loss(cfg: Config) -> bool:
    """kernels.loss 'auto' is the Triton loss on CUDA and the reference (which keeps the logits) on a CPU run."""
    return cfg.kernels.loss == "triton" or (cfg.kernels.loss == "auto" and cfg.train.device != "cpu")


def _check_layout(cfg: Config, world: int) -> None:
    p = cfg.parallel
    ep, cp, pp = p.expert_parallel_size, p.context_parallel_size, p.pipeline_parallel_size
    if world % (cp * pp):
        raise PlanError(f"parallel.context_parallel_size ({cp}) x pipeline_parallel_size ({pp}) does not divide the "
                        f"{world} GPUs")
    if (world // pp) % ep:
        raise PlanError(f"parallel.expert_parallel_size ({ep}) does not divide the {world // pp} GPUs of a pipeline "
                        f"stage ({world} / pipeline_parallel_size {pp})")
    if cfg.model.num_experts and cfg.model.num_experts % ep:
        raise PlanError(f"parallel.expert_parallel_size ({ep}) does not divide model.num_experts ({cfg.model.num_experts})")
    if cp > 1 and seq_len_of(cfg) % (2 * cp):
        raise PlanError(f"parallel.context_parallel_size ({cp}) cuts each sequence into {2 * cp} zigzag chunks, which "
                        f"must divide the sequence length ({seq_len_of(cfg)})")


def _engine_refusal(cfg: Config) -> str | None:
    """Why the engine refuses the layout (the DeepSpeed trainer's engine.check_engine, context parallelism's
    limits included; the pipeline: pipeline.check_engine_layout), or None."""
    from kmodel.parallel.engine import check_engine

    try:
        if cfg.parallel.backend == "deepspeed":
            check_engine(cfg)
        if cfg.parallel.pipeline_parallel_size > 1:
            from kmodel.parallel.pipeline import (
                check_engine_layout,  # the engine (DeepSpeed): only for a pipeline
            )

            check_engine_layout(cfg)
    except ValueError as error:
        return str(error)
    return None


def with_parallel(cfg: Config, world: int, **changes) -> Config:
    """A copy of `cfg` for `world` GPUs with some `parallel:` / `train:` keys changed (for what-if plans)."""
    parallel_keys = type(cfg.parallel).model_fields
    parallel = cfg.parallel.model_copy(
        update={"world_size": world, **{k: v for k, v in changes.items() if k in parallel_keys}}
    )
    train = cfg.train.model_copy(update={k: v for k, v in changes.items() if k not in parallel_keys})
    return cfg.model_copy(update={"parallel": parallel, "train": train})


def _ep_choices(num_experts: int, world: int) -> list[int]:
    """Expert-parallel sizes that divide both the experts and the GPUs."""
    return [ep for ep in range(2, world + 1) if num_experts and num_experts % ep == 0 and world % ep == 0]


def _ep_change(ep: int, zero_stage: int) -> tuple[str, dict]:
    """Label and parallel change for expert parallelism of size ep, which runs with ZeRO-1 or -2 only."""
    stage = min(max(zero_stage, 1), 2)
    label = f"parallel.expert_parallel_size={ep}" + ("" if stage == zero_stage else f" with parallel.zero_stage={stage}")
    return label, {"expert_parallel_size": ep, "zero_stage": stage}


def suggestions(cfg: Config, cluster: Cluster, assume: Assumptions | None) -> list[str]:
    """Changes that make a misfitting plan fit, each verified by planning it."""
    world, p, m = cluster.world_size, cfg.parallel, cfg.model
    tries: list[tuple[str, dict, Cluster]] = []
    if p.zero_stage < 3 and p.expert_parallel_size == 1:
        tries.append(("parallel.zero_stage=3", {"zero_stage": 3}, cluster))
    elif p.zero_stage < 2:
        tries.append(("parallel.zero_stage=2", {"zero_stage": 2}, cluster))
    for ep in _ep_choices(m.num_experts, world):
        if ep > p.expert_parallel_size:
            tries.append((*_ep_change(ep, p.zero_stage), cluster))
    if not cfg.train.activation_checkpointing:
        tries.append(("train.activation_checkpointing=true", {"activation_checkpointing": True}, cluster))
    if cfg.train.micro_batch_size > 1:
        tries.append(("train.micro_batch_size=1", {"micro_batch_size": 1}, cluster))
    if not p.offload_optimizer and p.zero_stage >= 1:
        tries.append(("parallel.offload_optimizer=true", {"offload_optimizer": True}, cluster))
    accum = cfg.train.grad_accum_steps
    for key in ("context_parallel_size", "pipeline_parallel_size"):  # twice as many, the same global batch
        size = 2 * getattr(p, key)
        tries.append((f"parallel.{key}={size} with train.grad_accum_steps={2 * accum}",
                      {key: size, "grad_accum_steps": 2 * accum, "pipeline_layers": None}, cluster))
    if p.pipeline_parallel_size > 1 and p.pipeline_layers is None:
        tries.append(_memory_bounded_split(cfg, cluster, assume))
    found = []
    for label, change, target in tries:
        try:
            plan = make_plan(with_parallel(cfg, target.world_size, **change), target, assume)
            if plan.fits and plan.engine_refusal is None:
                found.append(label)
        except PlanError:
            continue
    nodes = cluster.nodes
    while nodes < 4096 and not found:  # more nodes, with the fastest layout that fits there
        nodes *= 2
        try:
            fitting = search(cfg, replace(cluster, nodes=nodes), assume)
        except PlanError:
            continue
        if fitting:
            changes = [o for o in fitting[0].overrides if not o.startswith("parallel.world_size=")]
            found.append(f"--nodes {nodes} with " + " ".join(f"--set {o}" for o in changes))
    return found


def _memory_bounded_split(cfg: Config, cluster: Cluster, assume: Assumptions | None) -> tuple[str, dict, Cluster]:
    """The pipeline split that keeps every stage within the usable memory where one does (the cost model's
    default balances time first), as a recipe change."""
    # imported here: pipeline_split builds on this module's pieces and memory model
    from kmodel.parallel.pipeline_split import split_layers

    assume = assume or Assumptions.for_config(cfg)
    p = cfg.parallel
    layout = with_parallel(cfg, cluster.world_size)
    bounded = split_layers(layout, p.pipeline_parallel_size, p.pipeline_virtual_stages,
                           memory_limit=cluster.gpu.memory_bytes * assume.memory_headroom)
    counts = [len(r) for r in bounded]
    return f"parallel.pipeline_layers=[{','.join(map(str, counts))}]", {"pipeline_layers": counts}, cluster


def check_fits(plan: Plan, cfg: Config) -> None:
    """Raise PlanError naming how far the plan overflows, by category, and the changes that would fit."""
    if plan.fits:
        return
    mem, gib = plan.memory, GiB
    parts = mem.by_category()
    largest = max(parts, key=parts.get)
    fixes = suggestions(cfg, plan.cluster, plan.assumptions)
    hint = ("; these changes would fit: " + ", ".join(fixes)) if fixes else "; no single change fits: add nodes and raise EP together"
    breakdown = ", ".join(f"{k} {v / gib:.1f}" for k, v in parts.items())
    raise PlanError(
        f"{cfg.name} does not fit on {plan.cluster.nodes} node(s) x {plan.cluster.gpus_per_node} {plan.cluster.gpu.name}: "
        f"{mem.total / gib:.1f} GiB per GPU needed ({breakdown}), {plan.usable_bytes / gib:.1f} GiB usable: "
        f"over by {(mem.total - plan.usable_bytes) / gib:.1f} GiB; the largest category is {largest} "
        f"({parts[largest] / gib:.1f} GiB){hint}"
    )


def plan_json(plan: Plan, cfg: Config) -> dict:
    """The plan as `kmodel plan --json` prints it: bytes and seconds per GPU, categories as the trainer's
    `{"kind": "memory"}` records name them."""
    p, mem, a = cfg.parallel, plan.memory, plan.assumptions
    world, pp = plan.cluster.world_size, p.pipeline_parallel_size
    return {
        "recipe": cfg.name,
        "cluster": {"nodes": plan.cluster.nodes, "gpus_per_node": plan.cluster.gpus_per_node,
                    "gpu": plan.cluster.gpu.name, "world_size": world},
        "parallel": {"zero_stage": p.zero_stage, "expert_parallel_size": p.expert_parallel_size,
                     "expert_data_parallel_size": world // pp // p.expert_parallel_size,
                     "data_parallel_size": world // (pp * p.context_parallel_size),
                     "context_parallel_size": p.context_parallel_size, "pipeline_parallel_size": pp,
                     "pipeline_schedule": p.pipeline_schedule, "pipeline_virtual_stages": p.pipeline_virtual_stages,
                     "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
                     "activation_checkpointing": cfg.train.activation_checkpointing,
                     "offload_optimizer": p.offload_optimizer, "offload_params": p.offload_params},
        "memory_bytes": {**mem.by_category(), "total": mem.total, "usable": plan.usable_bytes,
                         "cpu_offloaded": mem.cpu_offloaded},
        "fits": plan.fits,
        "engine_refusal": plan.engine_refusal,
        "pipeline": {"bubble_fraction": plan.bubble_fraction,
                     "stages": [{"layers": [[r.start, r.stop] for r in stage.layers],
                                 "micro_batches_in_flight": stage.in_flight, "busy_s": stage.busy_s,
                                 "memory_bytes": {**stage.memory.by_category(), "total": stage.memory.total}}
                                for stage in plan.stages]},
        "communication_bytes": {"zero_dense": plan.zero_dense_bytes, "zero_expert": plan.zero_expert_bytes,
                                "expert_all_to_all": plan.all_to_all_bytes,
                                "muon_exchange": plan.muon_exchange_bytes,
                                "context_halo": plan.context_bytes["sliding"],
                                "context_gather": plan.context_bytes["global"],
                                "pipeline_p2p": plan.pipeline_bytes},
        "time_s": {"compute": plan.compute_s, "exposed_communication": plan.comm_s, "pipeline_bubble": plan.bubble_s,
                   "step": plan.step_s, f"step_busiest_expert_{IMBALANCE}x": plan.imbalanced_step_s},
        "newton_schulz_flops": plan.newton_schulz_flops,
        "mfu": plan.mfu,
        "tokens_per_step": plan.tokens_per_step,
        "tokens_per_day": plan.tokens_per_day,
        "days": plan.days,
        "assumptions": {"param_bytes": a.param_bytes, "grad_bytes": a.grad_bytes, "optimizer_bytes": a.optimizer_bytes,
                        "kernel_efficiency": a.kernel_efficiency, "zero_overlap": a.zero_overlap,
                        "memory_headroom": a.memory_headroom},
    }


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _kv_cache_layers(m: ModelConfig, context: int) -> str:
    """What the layers keep in the inference KV cache of a `context`-token sequence, in words (as kv_cache_bytes)."""
    sliding = m.layer_types.count("sliding_attention")
    full = len(m.layer_types) - sliding
    if not sliding:
        return f"no sliding-window layers: every layer keeps all {context} positions"
    kept = f"sliding layers ({sliding}) keep {min(context, m.sliding_window)} positions"
    return kept + (f", full layers ({full}) all {context}" if full else "")


def _largest_stage(plan: Plan) -> int:
    return max(range(len(plan.stages)), key=lambda i: plan.stages[i].memory.total)


def _pipeline_lines(plan: Plan, cfg: Config) -> list[str]:
    """The pipeline's schedule, bubble and stages (none without a pipeline)."""
    p, m = cfg.parallel, cfg.train.grad_accum_steps
    if p.pipeline_parallel_size == 1:
        return []
    lines = [f"pipeline: {p.pipeline_parallel_size} stages x {p.pipeline_virtual_stages} chunk(s), {p.pipeline_schedule}, "
             f"{m} micro-batches; bubble (p - 1) / (v m) = {plan.bubble_fraction * 100:.1f}% "
             f"({'parallel.pipeline_layers' if p.pipeline_layers else 'cost-model split'})"]
    for index, stage in enumerate(plan.stages):
        layers = ", ".join(f"{r.start}-{r.stop - 1}" for r in stage.layers)
        ends = ("embedding + " if index == 0 else "") + f"layers {layers}" + (
            " + head/MTP" if index == len(plan.stages) - 1 else "")
        lines.append(f"  stage {index}: {ends}; {stage.memory.total / GiB:.2f} GiB, {stage.in_flight:g} micro-batches "
                     f"in flight, busy {stage.busy_s:.3f} s")
    return lines


def format_plan(plan: Plan, cfg: Config) -> str:
    c, mem, a, g = plan.counts, plan.memory, plan.assumptions, GiB
    p = cfg.parallel
    world, pp, cp = plan.cluster.world_size, p.pipeline_parallel_size, p.context_parallel_size
    lines = [
        f"plan: {cfg.name} on {plan.cluster.nodes} node(s) x {plan.cluster.gpus_per_node} {plan.cluster.gpu.name} "
        f"= {world} GPUs; ZeRO-{p.zero_stage}, EP {p.expert_parallel_size}, "
        f"data-parallel {world // (pp * cp)}, context-parallel {cp}, pipeline {pp}, "
        f"expert-data-parallel {world // pp // p.expert_parallel_size}",
        f"parameters: total {_count(c.total)} (dense {_count(c.dense)}, routed experts {_count(c.expert)}), "
        f"active per token {_count(c.active)}",
        f"global batch {plan.global_batch} sequences = {plan.tokens_per_step:,} tokens per step",
        *_pipeline_lines(plan, cfg),
        "memory per GPU" + (f" (the largest stage, {_largest_stage(plan)}):" if pp > 1 else ":"),
        f"  parameters        {mem.params / g:9.2f} GiB",
        f"  gradients         {mem.grads / g:9.2f} GiB",
        f"  optimizer states  {mem.optimizer / g:9.2f} GiB",
        f"  activations       {mem.activations / g:9.2f} GiB"
        f"  (micro-batch {cfg.train.micro_batch_size} x {seq_len_of(cfg)}"
        + (f" / CP {cp} = {tokens_per_rank(cfg)} tokens" if cp > 1 else "")
        + (f", {plan.stages[_largest_stage(plan)].in_flight:g} in flight" if pp > 1 else "")
        + f", checkpointing {'on' if cfg.train.activation_checkpointing else 'off'})",
        f"  total             {mem.total / g:9.2f} GiB of {plan.usable_bytes / g:.2f} usable"
        + (f"; {mem.cpu_offloaded / g:.2f} GiB offloaded to CPU" if mem.cpu_offloaded else ""),
        f"  inference KV cache per {cfg.model.max_position_embeddings}-token sequence: "
        f"{plan.kv_cache_bytes_per_seq / g:.3f} GiB "
        f"({_kv_cache_layers(cfg.model, cfg.model.max_position_embeddings)})",
        "communication per GPU per step:",
        f"  ZeRO dense        {plan.zero_dense_bytes / g:9.2f} GiB",
        f"  ZeRO experts      {plan.zero_expert_bytes / g:9.2f} GiB",
        f"  EP all-to-all     {plan.all_to_all_bytes / g:9.2f} GiB",
        *([f"  CP halo (sliding) {plan.context_bytes['sliding'] / g:9.2f} GiB",
           f"  CP gather (global){plan.context_bytes['global'] / g:9.2f} GiB"] if cp > 1 else []),
        *([f"  pipeline p2p      {plan.pipeline_bytes / g:9.2f} GiB"] if pp > 1 else []),
        f"time: compute {plan.compute_s:.3f} s + exposed communication {plan.comm_s:.3f} s"
        + (f" + pipeline bubble {plan.bubble_s:.3f} s" if pp > 1 else "")
        + f" = step {plan.step_s:.3f} s; MFU {plan.mfu * 100:.1f}%",
        f"  routing imbalance: {plan.imbalanced_step_s:.3f} s per step when the busiest expert gets {IMBALANCE}x "
        f"the mean load (+{(plan.imbalanced_step_s / plan.step_s - 1) * 100:.0f}%)",
        f"throughput: {plan.tokens_per_day / 1e9:.2f} B tokens/day; {plan.token_budget / 1e12:.3f} T tokens in "
        f"{plan.days:.1f} days",
        *([f"engine: planned, but not run yet: {plan.engine_refusal}"] if plan.engine_refusal else []),
        f"assumptions: peak {plan.cluster.gpu.peak_tflops:.0f} TFLOP/s bf16, kernel efficiency {a.kernel_efficiency:.2f}, "
        f"NVLink {plan.cluster.gpu.nvlink_gbps:.0f} GB/s, network {plan.cluster.gpu.network_gbps:.0f} GB/s per GPU, "
        f"{a.zero_overlap:.0%} of ZeRO traffic overlapped, all-to-all not overlapped, balanced routing, "
        f"{a.param_bytes}/{a.grad_bytes}/{a.optimizer_bytes} bytes per parameter for weights/grads/optimizer, "
        f"{a.memory_headroom:.0%} of GPU memory usable",
    ]
    return "\n".join(lines)


# --- search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]  # the --set assignments that select this layout
    cfg: Config  # the recipe with them applied
    plan: Plan


def _powers_of_two_dividing(n: int) -> list[int]:
    return [d for d in (2**i for i in range(n.bit_length())) if n % d == 0]


def _schedules(stages: int, layers: int) -> list[tuple[str, int]]:
    """(schedule, chunks per stage) to try: 1F1B, and the interleaved schedule with 2 chunks where layers allow."""
    if stages == 1:
        return [("1f1b", 1)]
    return [("1f1b", 1)] + ([("interleaved_1f1b", 2)] if 2 * stages <= layers else [])


MIN_CONTEXT_TOKENS = 1024  # the search's shortest per-rank slice of a sequence under context parallelism


def _layouts(cfg: Config, world: int) -> list[tuple[dict, tuple[str, ...]]]:
    """The (pipeline, context, expert) layouts of `world` GPUs the search tries, with their --set overrides;
    each still to be combined with a ZeRO stage, micro-batch, checkpointing and offload."""
    m, p = cfg.model, cfg.parallel
    seq = seq_len_of(cfg)
    pinned = p.pipeline_layers is not None
    layouts = []
    for pp in (d for d in _powers_of_two_dividing(world) if d <= m.num_hidden_layers):
        for cp in (c for c in _powers_of_two_dividing(world // pp) if c == 1 or seq % (2 * c) == 0 and seq // c >= MIN_CONTEXT_TOKENS):
            for schedule, virtual in _schedules(pp, m.num_hidden_layers):
                change = {"pipeline_parallel_size": pp, "context_parallel_size": cp, "pipeline_schedule": schedule,
                          "pipeline_virtual_stages": virtual}
                sets = (f"parallel.pipeline_parallel_size={pp}", f"parallel.context_parallel_size={cp}",
                        f"parallel.pipeline_schedule={schedule}", f"parallel.pipeline_virtual_stages={virtual}")
                if pinned and (pp, virtual) != (p.pipeline_parallel_size, p.pipeline_virtual_stages):
                    change["pipeline_layers"] = None  # the recipe's split is for its own stages: the cost model's here
                    sets += ("parallel.pipeline_layers=null",)
                layouts.append((change, sets))
    return layouts


def search(cfg: Config, cluster: Cluster, assume: Assumptions | None = None) -> list[Candidate]:
    """Every layout of the same global batch on `cluster` that fits, fastest first: pipeline stages (powers of two
    up to the layers; 1F1B, and interleaved with 2 chunks per stage), context-parallel size (powers of two whose
    2 CP chunks divide the sequence, each rank keeping at least MIN_CONTEXT_TOKENS of it), EP size (dividing
    experts and a stage's GPUs; 1 = plain data parallelism), ZeRO stage (3 only without EP or a pipeline, 2 only
    without a pipeline: it would reduce-scatter every micro-batch), micro-batch (a power of two dividing the
    per-replica batch; accumulation makes up the rest, at least one micro-batch per stage), activation
    checkpointing and optimizer offload (each tried only where the layout does not fit without it: they only
    add time)."""
    world, t = cluster.world_size, cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * cfg.parallel.data_parallel_size
    found, splits = [], False
    for change, layout_sets in _layouts(cfg, world):
        pp, cp, virtual = change["pipeline_parallel_size"], change["context_parallel_size"], change["pipeline_virtual_stages"]
        replicas = world // (pp * cp)
        if global_batch % replicas or _engine_refusal(with_parallel(cfg, world, **change, zero_stage=1,
                                                                        offload_optimizer=False)):
            continue
        splits = True
        per_replica = global_batch // replicas
        for ep in [1, *_ep_choices(cfg.model.num_experts, world // pp)]:
            for stage in (1, 2, 3) if ep == 1 and pp == 1 else (1, 2) if pp == 1 else (1,):
                for micro in _powers_of_two_dividing(per_replica):
                    accum = per_replica // micro
                    if pp > 1 and (accum < pp or accum % pp and virtual > 1):
                        continue
                    base = {**change, "expert_parallel_size": ep, "zero_stage": stage, "micro_batch_size": micro,
                            "grad_accum_steps": accum}
                    for checkpointing, offload, layout, plan in _fitting(cfg, world, cluster, assume, base):
                        sets = (f"parallel.world_size={world}", f"parallel.expert_parallel_size={ep}",
                                f"parallel.zero_stage={stage}", f"train.micro_batch_size={micro}",
                                f"train.grad_accum_steps={accum}",
                                f"train.activation_checkpointing={str(checkpointing).lower()}",
                                f"parallel.offload_optimizer={str(offload).lower()}", *layout_sets)
                        found.append(Candidate(sets, layout, plan))
    if not splits:
        raise PlanError(f"the global batch of {global_batch} sequences does not split over the data-parallel ranks of "
                        f"any layout of {world} GPUs; change train.grad_accum_steps or the cluster")
    return sorted(found, key=lambda c: (c.plan.step_s, c.plan.memory.total))


def _fitting(cfg: Config, world: int, cluster: Cluster, assume: Assumptions | None, base: dict
             ) -> list[tuple[bool, bool, Config, Plan]]:
    """The (activation checkpointing, optimizer offload) settings under which the layout `base` fits, with the
    layout and its plan, leaving out those a fitting cheaper setting dominates: neither first, then each alone,
    then both. Offload needs ZeRO >= 1 and AdamW (DeepSpeed's CPU Adam); layouts the engine refuses are left out."""
    can_offload = base["zero_stage"] >= 1 and cfg.train.optimizer != "muon"

    def planned(checkpointing: bool, offload: bool) -> list[tuple[bool, bool, Config, Plan]]:
        layout = with_parallel(cfg, world, **base, activation_checkpointing=checkpointing, offload_optimizer=offload)
        try:
            plan = make_plan(layout, cluster, assume)
        except PlanError:
            return []
        return [(checkpointing, offload, layout, plan)] if plan.fits and plan.engine_refusal is None else []

    for tries in ([(False, False)], [(True, False)] + [(False, True)] * can_offload, [(True, True)] * can_offload):
        fitting = [entry for setting in tries for entry in planned(*setting)]
        if fitting:
            return fitting
    return []


def format_search(found: list[Candidate], cfg: Config, cluster: Cluster, limit: int = 10) -> str:
    if not found:
        return (f"search: no layout of {cfg.name} fits on {cluster.nodes} node(s) x {cluster.gpus_per_node} "
                f"{cluster.gpu.name}; add nodes")
    lines = [f"search: {len(found)} layouts of {cfg.name} fit on {cluster.world_size} GPUs; the fastest {min(limit, len(found))}:",
             f"{'step s':>8} {f'@{IMBALANCE}x':>8} {'MFU':>6} {'GiB/GPU':>8}  --set overrides"]
    for c in found[:limit]:
        lines.append(f"{c.plan.step_s:8.2f} {c.plan.imbalanced_step_s:8.2f} {c.plan.mfu * 100:5.1f}% "
                     f"{c.plan.memory.total / GiB:8.1f}  " + " ".join(f"--set {o}" for o in c.overrides))
    return "\n".join(lines)
