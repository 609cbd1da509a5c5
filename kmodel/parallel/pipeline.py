"""Pipeline parallelism: the decoder's layers over stages, run by torch.distributed.pipelining's schedules.

Layout (kmodel.parallel.mesh): world = PP x DP x CP, stages outermost. The model is cut into PP x V chunks of
consecutive decoder layers (V = parallel.pipeline_virtual_stages, 1 under 1F1B); chunk c runs on stage c % PP.
Which layers each chunk holds is kmodel.parallel.pipeline_split (the cost model, or parallel.pipeline_layers).
Chunk 0 also embeds the tokens; the last chunk holds the final norm, the LM head and the MTP depths and computes
the loss.

A stage's model is the one `Model`, built on the meta device with every module of the other stages dropped
before anything is allocated (`build_model(keep=...)`): parameter names stay global (`layers.7.mlp.gate.weight`),
so the seeded-by-name initialisation, checkpoints and restores are those of one process.

Per micro-batch a chunk passes on: the residual stream; the running sum of the MoE aux loss (so the last stage's
loss is the one-process loss and its backward reaches every stage's routers); the input embeddings when the
model has MTP (the depths read them on the last stage; their gradient flows back to the embedding on the first);
the document ids under document masking (every chunk's attention needs the boundaries).

PipelineTrainer is the DeepSpeed trainer with the pipeline in its step: the schedule runs the step's
micro-batches (train.grad_accum_steps of them, on every data-parallel pipeline), gradients accumulate in the
stage's modules, then ZeRO-1 reduces the stage's dense gradients over the stage's data-parallel ranks
(DeepSpeed's own pipeline path, `reduce_gradients(pipeline_parallel=True)`) and the expert optimizer its shards.
DeepSpeed's model-parallel group is the pipeline group, so its gradient norm (and its overflow check) sums over
every stage: the clip is the global one, and experts join it as without pipelining.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kmodel.checkpoint import read_weights
from kmodel.config import Config, ConfigError
from kmodel.hashing import sorted_weights_sha256
from kmodel.model.decoder import Model, ModelOutput, cu_seqlens_from_segments
from kmodel.parallel.engine import DeepSpeedTrainer
from kmodel.parallel.mesh import Mesh
from kmodel.parallel.pipeline_split import check_pipeline
from kmodel.train.flops import training_flops_per_token
from kmodel.train.memory import SavedActivations
from kmodel.train.optim import build_optimizer
from kmodel.train.trainer import LOSS_KEYS, Trainer




@dataclass(frozen=True)
class ChunkPlan:
    """Chunk `index` of `count` (pipeline order), running decoder layers `layers`."""

    index: int
    count: int
    layers: range

    @property
    def first(self) -> bool:  # embeds the tokens
        return self.index == 0

    @property
    def last(self) -> bool:  # final norm, LM head, MTP, the loss
        return self.index == self.count - 1


def stage_chunks(split: list[range], stages: int, stage: int) -> list[ChunkPlan]:
    """The chunks stage `stage` runs: c = stage, stage + PP, ... (one under 1F1B)."""
    return [ChunkPlan(c, len(split), split[c]) for c in range(stage, len(split), stages)]


class OtherStage(nn.Module):
    """Stands in for a decoder layer held by another pipeline stage (keeps the layer indices, so names stay global)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} lives on another pipeline stage")


def keep_chunks(model: Model, chunks: list[ChunkPlan]) -> None:
    """Drop from the (meta) model everything the chunks do not hold."""
    held = {i for chunk in chunks for i in chunk.layers}
    for i in range(len(model.layers)):
        if i not in held:
            model.layers[i] = OtherStage(i)
    if not any(chunk.first for chunk in chunks):
        model.embed_tokens = None
    if not any(chunk.last for chunk in chunks):
        model.norm = model.lm_head = model.mtp = None


@dataclass(frozen=True)
class Carried:
    """What travels between chunks besides the stream and the aux loss."""

    embeds: bool  # MTP on the last stage reads the input embeddings
    segments: bool  # document masking: every chunk needs the boundaries


class Chunk(nn.Module):
    """The forward of one model chunk. Its modules are the stage model's, registered here too, so the pipeline stage
    sees exactly this chunk's parameters; the model itself is kept unregistered, for its methods.

    first chunk   (input_ids[, segment_ids]) -> carried
    others        carried = (stream, aux[, embeds][, segment_ids]) -> carried
    The last chunk's stream is the last hidden state (hyper-connection streams merged), for `PipelineLoss`."""

    def __init__(self, model: Model, plan: ChunkPlan, carried: Carried):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the parameters are the modules below
        self.plan, self.carried = plan, carried
        self.layers = nn.ModuleList(model.layers[i] for i in plan.layers)
        if plan.first:
            self.embed_tokens = model.embed_tokens
        if plan.last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, carried = self.model, self.carried
        if self.plan.first:
            input_ids, *rest = inputs
            embeds, x = model.embed_streams(input_ids)
            aux = None
        else:
            x, aux, *rest = inputs
            embeds = rest.pop(0) if carried.embeds else None
        segments = rest[0] if carried.segments else None
        positions = torch.arange(x.shape[1], device=x.device)
        cu_seqlens = None if segments is None else cu_seqlens_from_segments(segments)
        x, aux = model.run_layers(x, self.plan.layers, positions, cu_seqlens=cu_seqlens, aux=aux)
        if self.plan.last:
            x = model.last_hidden(x)
        return (x, aux) + ((embeds,) if carried.embeds else ()) + ((segments,) if carried.segments else ())


class PipelineLoss:
    """The schedule's loss function on the last stage: the model's loss terms from the last chunk's output,
    kept per micro-batch for the step's record; what is backpropagated is loss / micro-batches (the one-process
    accumulation weight)."""

    def __init__(self, model: Model, carried: Carried, micro_batches: int):
        self.model, self.carried, self.micro_batches = model, carried, micro_batches
        self.terms: list[dict[str, torch.Tensor]] = []

    def __call__(self, output: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        hidden, aux, *rest = output
        embeds = rest.pop(0) if self.carried.embeds else None
        segments = rest[0] if self.carried.segments else None
        positions = torch.arange(labels.shape[1], device=labels.device)
        out = self.model.losses(hidden, embeds, aux, labels, positions, segments)
        self.terms.append({k: getattr(out, k).detach().float() for k in LOSS_KEYS if getattr(out, k) is not None})
        return out.loss / self.micro_batches


def example_io(cfg: Config, plan: ChunkPlan, carried: Carried, dtype: torch.dtype,
               rows: int | None = None) -> tuple[tuple, tuple]:
    """Meta tensors shaped like a chunk's inputs and outputs for one micro-batch (`PipelineStage`'s static
    metadata), so the stages know what they exchange without a trial forward, which would count router loads and
    run the experts' all-to-all on made-up tokens. Floating tensors are marked as carrying gradients. `rows`:
    another batch size than train.micro_batch_size (evaluation)."""
    m = cfg.model
    rows, seq = cfg.train.micro_batch_size if rows is None else rows, cfg.data.seq_len

    def floats(*shape):
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=True)

    tokens = torch.empty(rows, seq, dtype=torch.long, device="meta")
    stream = floats(rows, seq, m.hidden_size) if m.hc_mult == 1 else floats(rows, seq, m.hc_mult, m.hidden_size)
    aux = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
    extra = ((floats(rows, seq, m.hidden_size),) if carried.embeds else ()) + ((tokens,) if carried.segments else ())
    if plan.first:
        inputs = (tokens, tokens) if carried.segments else (tokens,)
    else:
        inputs = (stream, aux) + extra
    return inputs, (floats(rows, seq, m.hidden_size) if plan.last else stream, aux) + extra


def make_schedule(cfg: Config, model: Model, chunks: list[ChunkPlan], carried: Carried, loss: PipelineLoss,
                  device: torch.device, group) -> Any:
    """The torch.distributed.pipelining schedule (parallel.pipeline_schedule) of this rank's chunks of `model`,
    exchanging over the pipeline `group`; the loss weights are applied by `loss`, so the schedule does not scale."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    dtype = next(model.parameters()).dtype
    stages = [PipelineStage(Chunk(model, plan, carried), plan.index, plan.count, device,
                            *example_io(cfg, plan, carried, dtype), group=group) for plan in chunks]
    micro_batches = cfg.train.grad_accum_steps
    if cfg.parallel.pipeline_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss, scale_grads=False)
    return Schedule1F1B(stages[0], micro_batches, loss_fn=loss, scale_grads=False)


class PipelineEvaluation(nn.Module):
    """What held-out evaluation calls as `model(input_ids, labels)` on a pipeline stage (collective over the pipeline
    group): every chunk's forward in pipeline order, each rank running its own and passing what the next chunk reads
    to that chunk's rank (blocking send and receive: evaluation batches vary in rows, which the training schedule's
    fixed shapes do not allow); the last stage's LM loss is shared with every stage. Evaluation batches carry no
    document ids."""

    def __init__(self, cfg: Config, model: Model, chunks: list[ChunkPlan], group):
        super().__init__()
        self.model, self.cfg, self.group = model, cfg, group
        self.carried = Carried(embeds=cfg.model.num_nextn_predict_layers > 0, segments=False)
        self.chunks = {plan.index: Chunk(model, plan, self.carried) for plan in chunks}  # a plain dict: no new names

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        ranks = dist.get_process_group_ranks(self.group)  # the global rank of each stage of this pipeline
        count = next(iter(self.chunks.values())).plan.count
        dtype = next(self.model.parameters()).dtype
        lm_loss = torch.zeros((), dtype=torch.float64, device=input_ids.device)
        for index, chunk in sorted(self.chunks.items()):
            if chunk.plan.first:
                inputs = (input_ids,)
            else:
                shapes = example_io(self.cfg, chunk.plan, self.carried, dtype, rows=input_ids.shape[0])[0]
                inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=input_ids.device) for t in shapes)
                for tensor in inputs:
                    dist.recv(tensor, src=ranks[(index - 1) % len(ranks)], group=self.group)
            outputs = chunk(*inputs)
            if chunk.plan.last:
                hidden, aux, *rest = outputs
                positions = torch.arange(labels.shape[1], device=labels.device)
                embeds = rest[0] if self.carried.embeds else None
                lm_loss.copy_(self.model.losses(hidden, embeds, aux, labels, positions).lm_loss)
            else:
                for tensor in outputs:
                    dist.send(tensor.contiguous(), dst=ranks[(index + 1) % len(ranks)], group=self.group)
        dist.broadcast(lm_loss, src=ranks[(count - 1) % len(ranks)], group=self.group)
        return ModelOutput(logits=None, lm_loss=lm_loss)


class StageTopology:
    """DeepSpeed's `mpu` under pipeline parallelism. ZeRO partitions, broadcasts and reduces the stage's dense state
    over the `replica` group (its data-parallel ranks), and sums its gradient norm and overflow flag over the
    model-parallel group, which is the `pipeline` group here: with tensor-parallel rank 0 on every rank, each stage
    counts all its parameters once, so the norm is the global one over all stages."""

    def __init__(self, mesh: Mesh, rank: int, groups: dict[str, Any]):
        self.mesh, self.coords, self.groups = mesh, mesh.coords(rank), groups

    def get_data_parallel_group(self):
        return self.groups["replica"]

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.data

    def get_data_parallel_rank(self) -> int:
        return self.coords.data

    def get_model_parallel_group(self):
        return self.groups["pipeline"]

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.pipeline

    def get_model_parallel_rank(self) -> int:
        return self.coords.stage

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.mesh.pipeline

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.coords.stage


def check_engine_layout(cfg: Config) -> None:
    """What the pipeline engine does not do (yet), refused with the key and a fix; pipeline_split checks the split
    and the schedule's micro-batches."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    refused = []
    if p.zero_stage != 1:
        refused.append(f"parallel.zero_stage {p.zero_stage}: the pipeline engine runs ZeRO-1 (ZeRO-2 reduces inside "
                       "DeepSpeed's own backward, which the pipeline schedule replaces; ZeRO-3 gathers weights per "
                       "forward, which the stages do not call); set parallel.zero_stage=1")
    if p.context_parallel_size > 1:
        refused.append(f"parallel.context_parallel_size {p.context_parallel_size} with pipeline parallelism is not "
                       "done yet; set parallel.context_parallel_size=1")
    if p.offload_optimizer:
        refused.append("parallel.offload_optimizer with pipeline parallelism is untested; set it false")
    if m.tie_word_embeddings:
        refused.append("model.tie_word_embeddings: the LM head (last stage) would share the embedding (first stage) "
                       "across stages, which the pipeline engine does not do; untie it or use pipeline_parallel_size=1")
    if t.optimizer == "muon" or t.qk_clip_tau is not None:
        refused.append("train.optimizer muon / train.qk_clip_tau with pipeline parallelism are not done yet (their "
                       "owner exchange and logit maxima span one stage only); use AdamW without qk_clip_tau")
    if refused:
        raise ConfigError("pipeline_parallel_size " + str(p.pipeline_parallel_size) + ": " + "; ".join(refused))


class PipelineTrainer(DeepSpeedTrainer):
    """The DeepSpeed trainer on a pipeline stage (parallel.pipeline_parallel_size > 1); see the module docstring."""

    def __init__(self, cfg: Config, run_dir: str | Path, **kwargs):
        check_engine_layout(cfg)
        self.split = check_pipeline(cfg)
        stage = Mesh.from_config(cfg.parallel).coords(dist.get_rank()).stage
        self.chunks = stage_chunks(self.split, cfg.parallel.pipeline_parallel_size, stage)
        self.carried = Carried(embeds=cfg.model.num_nextn_predict_layers > 0, segments=cfg.data.document_masking)
        self.schedule = None
        super().__init__(cfg, run_dir, **kwargs)
        with torch.device("meta"):  # MFU counts the whole model's FLOPs per token, as the other engines do
            self.flops_per_token = training_flops_per_token(Model(cfg.model), cfg.data.seq_len)
        self.loss = PipelineLoss(self.model, self.carried, cfg.train.grad_accum_steps)
        self._optimizer_groups = self._one_process_layout()
        self._optimizer_params = [p for _, group in self._optimizer_groups for p in group]

    def _one_process_layout(self) -> list[tuple[dict[str, Any], list[torch.nn.Parameter]]]:
        """The one-process optimizer's groups (hyper-parameters, parameters in order), so checkpoints keep its
        indices: this stage's parameters in place, the other stages' as meta stand-ins marked as holding no
        ZeRO fragment here (DeepSpeed's `_hp_mapping` None), which the checkpoint code skips."""
        with torch.device("meta"):
            full = Model(self.cfg.model)
        names = {param: name for name, param in full.named_parameters()}
        held = dict(self.model.named_parameters())
        layout = []
        for group in build_optimizer(full, self.cfg.train).param_groups:
            params = []
            for param in group["params"]:
                if names[param] not in held:
                    param._hp_mapping = None
                params.append(held.get(names[param], param))
            layout.append(({k: v for k, v in group.items() if k != "params"}, params))
        return layout

    def keep_modules(self, model: Model) -> None:
        keep_chunks(model, self.chunks)

    @property
    def is_last_stage(self) -> bool:
        return self.chunks[-1].last

    def engine_config(self) -> dict[str, Any]:
        """The schedule accumulates the step's micro-batches itself: DeepSpeed sees one step of all their rows."""
        config = super().engine_config()
        rows = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps
        config.update(train_micro_batch_size_per_gpu=rows, gradient_accumulation_steps=1,
                      train_batch_size=rows * self.mesh.data)
        return config

    def topology(self) -> StageTopology:
        return StageTopology(self.mesh, self.rank, self.process_groups)

    def start_engine(self) -> None:
        super().start_engine()
        self.schedule = make_schedule(self.cfg, self.model, self.chunks, self.carried, self.loss, self.device,
                                      self.process_groups["pipeline"])

    # --- one step -------------------------------------------------------------------------------------------
    def accumulate(self) -> list[dict[str, float]]:
        """Run the step's micro-batches through the schedule, then reduce the gradients (ZeRO-1 over the stage's
        data-parallel ranks, the expert shards over their expert-data-parallel group). Returns each micro-batch's
        loss terms, averaged over the data-parallel pipelines (from the last stage, the same on every rank)."""
        batches = [self.next_micro_batch() for _ in range(self.cfg.train.grad_accum_steps)]
        args = ()
        if self.chunks[0].first:
            args = (torch.cat([b.input_ids for b in batches]),)
            if self.carried.segments:
                args += (torch.cat([b.segment_ids for b in batches]),)
        target = torch.cat([b.labels for b in batches]) if self.is_last_stage else None
        self.loss.terms.clear()
        meter = SavedActivations() if self._activations_peak is not None else contextlib.nullcontext()
        with meter:
            self.schedule.step(*args, target=target, return_outputs=False)
        self.engine.optimizer.reduce_gradients(pipeline_parallel=True)
        if self.experts is not None:
            self.experts.reduce_micro_batch(last=True)
        if self._activations_peak is not None:
            self._activations_peak = max(self._activations_peak, meter.peak_bytes)
            self._grads_peak = max(self._grads_peak, self._grads_bytes())
        return self._shared_terms(len(batches))

    def _shared_terms(self, micro_batches: int) -> list[dict[str, float]]:
        """Each micro-batch's loss terms, from the last stages, averaged over the data-parallel pipelines: one
        all-reduce over the world of a table the other stages fill with zeros (a row counts who reported a term)."""
        table = torch.zeros(micro_batches + 1, len(LOSS_KEYS), device=self.device)
        if self.is_last_stage:
            for i, terms in enumerate(self.loss.terms):
                for j, key in enumerate(LOSS_KEYS):
                    if key in terms:
                        table[i, j], table[-1, j] = terms[key], 1.0
        dist.all_reduce(table)
        reported = [j for j, key in enumerate(LOSS_KEYS) if table[-1, j] > 0]
        return [{LOSS_KEYS[j]: (table[i, j] / self.mesh.data).item() for j in reported} for i in range(micro_batches)]

    def _router_record(self) -> dict[str, Any]:
        """Every stage's MoE layers, in layer order (collective over the pipeline group)."""
        records = [None] * self.mesh.pipeline
        dist.all_gather_object(records, super()._router_record(), group=self.process_groups["pipeline"])
        return {name: stats for record in records for name, stats in record.items()}

    @property
    def eval_model(self) -> PipelineEvaluation:
        return PipelineEvaluation(self.cfg, self.model, self.chunks, self.process_groups["pipeline"])

    # --- checkpoints: a stage holds, reads and writes its own layers under their global names -------------------
    def load_weights(self, weights, source: str) -> None:
        """This stage's tensors of a (topology-free) checkpoint; a tensor it lacks is named as missing."""
        held = self.model.state_dict()
        super().load_weights({name: weights[name] for name in held if name in weights}, source)

    def start_ledger(self, resume: bool) -> None:
        """Rank 0 holds one stage, so the genesis hashes the whole initial model from its source, tensor by tensor:
        the seed (the verifier's own computation) or the checkpoint --init-from loaded."""
        from kmodel.ledger import initial_weights_sha256

        if self.rank != 0:
            return
        init_hash = None
        if self.cfg.provenance.ledger and not self.ledger_exists(resume):
            if self.init_source is None:
                init_hash = initial_weights_sha256(self.cfg)
            else:
                weights = read_weights(Path(self.init_source["checkpoint"]), lazy=True)
                init_hash = sorted_weights_sha256((name, weights[name].load()) for name in sorted(weights))
        Trainer.start_ledger(self, resume, init_hash)
