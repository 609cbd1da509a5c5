"""Benchmark: saving a checkpoint of about 2 GB from 4 CPU ranks (gloo), five ways.

    single        the first path: rank 0 writes every tensor into one model.safetensors / optimizer.safetensors,
                  then reads the files back to hash them; the other ranks wait at a barrier
    gather        the previous engine path: every tensor produced on every rank (DeepSpeed's full gather), each
                  rank keeps the whole tensors it owns (balanced by bytes) and writes them; rank 0 commits
    gather-async  as gather, from a snapshot, on a background thread
    owned         each rank writes the 1/W element range of every tensor that it already holds (its ZeRO
                  partition: nothing gathered), straight from it; rank 0 commits
    owned-async   as owned, from a snapshot copy, on a background thread: the step loop waits for the copy only

The tensors are fp32 "weights" and twice as many fp32 "moments", like AdamW. In the gather paths every rank
produces every full tensor inside the timed save, as the gather did; in the owned paths each rank's partitions
exist before the save (they are the training state) and the save copies them. stall = time the step loop is held
by the save; write = time until the checkpoint is committed (for async, measured on the writer thread). After
the owned saves, rank 0 also times the ledger's record of the checkpoint: from the digests taken while writing
(`checkpoint_hashes`) and, as before, by reading every tensor back (`content_hashes`). Best of --repeats, with the
machine load stated. Writes a markdown table and JSON under bench/results/.

    python -P bench/checkpoint_save.py [--gigabytes 2] [--ranks 4] [--repeats 2] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kmodel.checkpoint.index import PieceSpec
from kmodel.safe_path import python_command, safe_env

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {
    "single": "first: rank 0 writes all, then re-reads to hash",
    "gather": "previous: full gather on every rank, whole tensors spread by bytes, synchronous",
    "gather-async": "previous: full gather, whole tensors spread by bytes, asynchronous",
    "owned": "now: each rank writes the partitions it holds, synchronous",
    "owned-async": "now: each rank writes the partitions it holds, asynchronous",
}
TENSOR_MB = 32


def specs(gigabytes: float) -> tuple[list, list]:
    """fp32 weights (1/3 of the bytes) and two moments per weight (2/3), in TENSOR_MB tensors."""
    count = max(1, int(gigabytes * 1024 / 3 / TENSOR_MB))
    rows = TENSOR_MB * 2**20 // 4 // 1024
    weights = [(f"layers.{i:03d}.weight", torch.float32, (rows, 1024)) for i in range(count)]
    moments = [(f"state.{i}.{key}", torch.float32, (rows, 1024)) for i in range(count) for key in ("exp_avg", "exp_avg_sq")]
    return weights, moments


def produce(stream_specs):
    for i, (_, dtype, shape) in enumerate(stream_specs):
        yield torch.full(shape, float(i % 7), dtype=dtype)


def owned_slices(stream_specs, rank: int, world: int) -> list:
    """(piece, values) of the element range [total * r / W, total * (r + 1) / W) of every tensor: rank r's
    partition, as ZeRO cuts a flat buffer."""
    from kmodel.checkpoint.index import PieceSpec

    owned = []
    for i, (name, dtype, shape) in enumerate(stream_specs):
        total = math.prod(shape)
        begin, end = total * rank // world, total * (rank + 1) // world
        owned.append((PieceSpec(name, dtype, shape, begin, end), torch.full((end - begin,), float(i % 7), dtype=dtype)))
    return owned


def rank_main(mode: str, root: Path, gigabytes: float, step: int) -> None:
    import torch.distributed as dist

    from kmodel.checkpoint import save_checkpoint, sharded
    from kmodel.checkpoint.files import TensorStream
    from kmodel.checkpoint.writer import CheckpointWriter, snapshot
    from kmodel.config import load_config
    from kmodel.hashing import sha256_file
    from kmodel.ledger import checkpoint_hashes, content_hashes

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("recipes/tiny-ko-moe.yaml")
    weights, moments = specs(gigabytes)
    final = root / f"step_{step:07d}"
    # state.pt as an AdamW run's: one optimizer entry (its step count) per weight, the moments in tensor files
    state = {"step": step, "optimizer": {"state": {i: {"step": torch.tensor(float(step))} for i in range(len(weights))},
                                         "param_groups": [{"params": list(range(len(weights)))}]}}
    held = {kind: owned_slices(s, rank, world) for kind, s in (("model", weights), ("optimizer", moments))
            if mode.startswith("owned")}  # the training state each rank holds before the save
    record = {}
    dist.barrier()
    started = time.perf_counter()
    if mode == "single":
        if rank == 0:
            save_checkpoint(final, TensorStream(weights, produce(weights)), cfg, state=state,
                            optimizer_moments=TensorStream(moments, produce(moments)), run_id="bench")
            for file in sorted(final.glob("*.safetensors")):
                sha256_file(file)  # the first path hashed its files by reading them back
        else:  # the gather: every rank produces every tensor
            for stream in (weights, moments):
                for _ in produce(stream):
                    pass
        dist.barrier()
        stall = write = time.perf_counter() - started
    else:
        writer = CheckpointWriter(asynchronous=mode.endswith("async"))
        if rank == 0:
            sharded.prepare(final, run_id="bench")
        dist.barrier()
        streams = {}
        for kind, stream_specs in (("model", weights), ("optimizer", moments)):
            if mode.startswith("owned"):  # as the engine: a copy of the partitions for a background write only
                copy = snapshot if writer.asynchronous else torch.Tensor.detach
                streams[kind] = sharded.ShardStream([p for p, _ in held[kind]], [copy(v) for _, v in held[kind]])
                continue
            owners, pieces, values = sharded.balanced_owners(stream_specs, world), [], []
            for (name, dtype, shape), value in zip(stream_specs, produce(stream_specs)):  # the gather
                if owners[name] == rank:
                    pieces.append(PieceSpec(name, dtype, shape, 0, math.prod(shape)))
                    values.append(value.clone())
            streams[kind] = sharded.ShardStream(pieces, values)

        def job() -> int:
            written = sum(r.bytes for r in sharded.write_rank(sharded.tmp_dir(final), rank, world, streams).values())
            if rank == 0:
                sharded.commit_sharded(sharded.tmp_dir(final), final, world, cfg, state=state, run_id="bench")
            return written

        writer.submit(step, started, job)
        stall = time.perf_counter() - started
        writer.wait()
        write_time = writer.finished()[0]["write_s"]
        timings = torch.tensor([stall, write_time])
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)  # the slowest rank sets both
        stall, write = timings.tolist()
        dist.barrier()
        if rank == 0 and mode.startswith("owned"):
            for name, hashes in (("ledger_record_s", checkpoint_hashes), ("ledger_reread_s", content_hashes)):
                begun = time.perf_counter()
                hashes(final)
                record[name] = time.perf_counter() - begun
    if rank == 0:
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        print(json.dumps({"mode": mode, "stall_s": stall, "write_s": write, "bytes": size, **record}))
    dist.destroy_process_group()


def run(mode: str, root: Path, ranks: int, gigabytes: float, step: int) -> dict:
    cmd = python_command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                         str(Path(__file__).resolve()), "--rank-main", mode, "--dir", str(root),
                         "--gigabytes", str(gigabytes), "--step", str(step))
    done = subprocess.run(cmd, capture_output=True, text=True, env=safe_env({**os.environ, "OMP_NUM_THREADS": "1"}),
                          timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/ckpt-bench")
    parser.add_argument("--rank-main", help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.rank_main:
        return rank_main(args.rank_main, root, args.gigabytes, args.step)

    load_before = os.getloadavg()
    best: dict[str, dict] = {}
    step = 0
    for _ in range(args.repeats):
        for mode in NAMES:
            step += 1
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            result = run(mode, root, args.ranks, args.gigabytes, step)
            print(f"{mode:12s} stall {result['stall_s']:7.2f} s  write {result['write_s']:7.2f} s  "
                  f"{result['bytes'] / 2**30:.2f} GiB", flush=True)
            if mode not in best or result["stall_s"] + result["write_s"] < best[mode]["stall_s"] + best[mode]["write_s"]:
                best[mode] = result
    shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    record = best["owned-async"]
    lines = [
        f"# Checkpoint save: {best['single']['bytes'] / 2**30:.2f} GiB, {args.ranks} CPU ranks (gloo)",
        "",
        f"Machine: {machine}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (shared, loaded). "
        f"Best of {args.repeats}. Storage: {args.dir}. `python -P bench/checkpoint_save.py`",
        "",
        "stall: the step loop held by the save (for the gather paths including every rank producing every full "
        "tensor, as DeepSpeed's gather did; for the asynchronous owned path the copy of the partitions each rank "
        "holds); "
        "write: from handing the tensors to the writer until the checkpoint is committed (for the asynchronous "
        "paths, on the writer thread while the loop goes on).",
        "",
        "| path | stall (s) | write until committed (s) | write GB/s |",
        "|---|---:|---:|---:|",
    ]
    for mode, name in NAMES.items():
        r = best[mode]
        lines.append(f"| {name} | {r['stall_s']:.2f} | {r['write_s']:.2f} | {r['bytes'] / 1e9 / r['write_s']:.2f} |")
    lines += ["", f"The ledger's record of the committed checkpoint on rank 0: {record['ledger_record_s']:.3f} s from the "
              f"digests taken while writing, {record['ledger_reread_s']:.2f} s when every tensor is read back and "
              "hashed (as before)."]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_save_cpu.md").write_text(table, encoding="utf-8")
    (RESULTS / "checkpoint_save_cpu.json").write_text(json.dumps(
        {"machine": machine, "load_before": load_before, "load_after": load_after, "ranks": args.ranks,
         "repeats": args.repeats, "results": best}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
