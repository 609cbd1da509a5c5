"""PNG curves of a run from its metrics.jsonl: loss, learning rate, throughput, expert load per MoE layer, and
with MuonClip the largest attention logit per layer."""

from __future__ import annotations

import math
from pathlib import Path

from kmodel.rundir import PLOTS_DIR
from kmodel.train.metrics import read_metrics


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total loss"), ("lm_loss", "LM loss")):
        ax.plot(*_series(train, key), label=label, linewidth=1)
    if evals:
        ax.plot(*_series(evals, "loss"), "o-", label="held-out LM loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*_series(train, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*_series(train, "tokens_per_s"), linewidth=1)
    ax.set(xlabel="step", ylabel="tokens / s", title="Throughput")
    steps, mfu = _series(train, "mfu")
    if mfu:
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:red", linewidth=1)
        ax2.set_ylabel("MFU (%)", color="tab:red")
    save(fig, "throughput.png")

    clipped = [r for r in train if r.get("attention_logits")]
    if clipped:  # MuonClip: each layer's largest per-head logit, against tau
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for layer in clipped[-1]["attention_logits"]:
            ax.plot([r["step"] for r in clipped], [max(r["attention_logits"][layer]) for r in clipped],
                    linewidth=1, label=layer)
        ax.set(xlabel="step", ylabel="max logit (over heads)", title="Attention logits (MuonClip)")
        ax.legend(fontsize="x-small", ncol=2)
        save(fig, "attention_logits.png")

    routed = [r for r in train if r.get("router")]
    if routed:
        layers = list(routed[-1]["router"])
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.6 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            load = np.array([r["router"][layer]["load"] for r in routed], dtype=float).T  # (experts, steps)
            share = load / np.maximum(load.mean(axis=0, keepdims=True), 1e-9)  # 1.0 = perfectly balanced
            image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(routed[0]["step"], routed[-1]["step"], load.shape[0] - 0.5, -0.5))
            ax.set(ylabel="expert", title=f"{layer}: load / mean load")
            fig.colorbar(image, ax=ax)
        axes[-1, 0].set_xlabel("step")
        save(fig, "expert_load.png")
    return written
