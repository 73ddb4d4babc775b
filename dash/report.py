"""Search reports: report.json, report.md and a PNG of each layer's candidate probabilities over the search."""
from __future__ import annotations

import json
import os
from typing import Sequence


def write_report(output_dir: str, report: dict, history: Sequence[dict], candidate_names: Sequence[str]) -> None:
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# DASH hybrid: {report.get('model', '')}", "",
             f"budget: {report['budget']} ({report['budget_kind']}), full-attention layers: "
             f"{sum(c == 'full' for c in report['choice'])}/{len(report['choice'])}, "
             f"search tokens: {report.get('search_tokens')}", "",
             "| layer | operator | " + " | ".join(f"p({n})" for n in candidate_names) + " |",
             "| --- | --- |" + " --- |" * len(candidate_names)]
    for layer, (choice, probs) in enumerate(zip(report["choice"], report["probabilities"])):
        probs = probs if not isinstance(probs[0], list) else [sum(col) / len(probs) for col in zip(*probs)]
        lines.append(f"| {layer} | {choice} | " + " | ".join(f"{p:.3f}" for p in probs) + " |")
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if history:
        plot_probabilities(os.path.join(output_dir, "probabilities.png"), history, candidate_names)


def plot_probabilities(path: str, history: Sequence[dict], candidate_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    probs = np.array([h["probabilities"] for h in history], dtype=float)  # [steps, L, (Hkv,) C]
    if probs.ndim == 4:
        probs = probs.mean(2)
    steps, layers, _ = probs.shape
    cols = min(6, layers)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), sharex=True, sharey=True, squeeze=False)
    x = np.array([h["step"] for h in history])
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.axis("off")
            continue
        for c, name in enumerate(candidate_names):
            ax.plot(x, probs[:, layer, c], label=name, linewidth=1.2)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.supxlabel("search step", fontsize=8)
    fig.supylabel("candidate probability", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
