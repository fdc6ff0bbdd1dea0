"""The PNG figures of a run's report, drawn from its prunetune.json record (and saved unit scores).

Every function takes plain data, writes one PNG and returns its path, or returns None when the run
has nothing to draw for it (a one-shot prune has no training curves, a prune without domains has
no domain weights). matplotlib runs on its Agg backend, so nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def kept_fractions(record: dict) -> tuple[np.ndarray, list[str]] | None:
    """[3, layers] kept share of query heads, kv heads and MLP channels, from the record's masks."""
    source = record.get("architecture", {}).get("source_layer_shapes")
    kept = record.get("kept")
    if not source or not kept:
        return None
    grid = np.zeros((3, len(source)))  # a layer absent from `kept` was removed whole
    for entry in kept["layers"]:
        shape = source[entry["layer"]]
        if shape.get("experts"):  # a mixture of experts: the share of its expert weights kept
            mlp = entry["num_experts"] * entry["expert_width"] / (shape["experts"] * shape["intermediate"])
        else:
            mlp = entry["num_channels"] / shape["intermediate"]
        grid[:, entry["layer"]] = (entry["num_heads"] / shape["num_heads"],
                                   entry["num_kv_heads"] / shape["num_kv_heads"], mlp)
    moe = any(shape.get("experts") for shape in source)
    return grid, ["query heads", "kv heads", "expert weights" if moe else "MLP channels"]


def plot_kept_units(record: dict, path: Path) -> Path | None:
    fractions = kept_fractions(record)
    if fractions is None:
        return None
    grid, labels = fractions
    layers = grid.shape[1]
    fig, ax = plt.subplots(figsize=(min(14, 3.5 + 0.32 * layers), 2.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    step = max(1, layers // 16)
    ax.set_xticks(range(0, layers, step))
    ax.set_xlabel("layer")
    if layers <= 32:  # small enough to print the kept counts in the cells
        counts = {e["layer"]: (e["num_heads"], e["num_kv_heads"],
                               f"{e['num_experts']}x{e['expert_width']}" if "experts" in e else e["num_channels"])
                  for e in record["kept"]["layers"]}
        for layer in range(layers):
            for row, count in enumerate(counts.get(layer, (0, 0, 0))):
                ax.text(layer, row, str(count), ha="center", va="center", fontsize=6,
                        color="black" if grid[row, layer] > 0.6 else "white")
    hidden = record["kept"].get("num_hidden")
    source_hidden = record.get("architecture", {}).get("source_hidden")
    title = "share of units kept per layer"
    if hidden and source_hidden and hidden != source_hidden:
        title += f" (hidden channels: {hidden} of {source_hidden})"
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    return _save(fig, path)


def routing_shares(routing: dict, kept_layers: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[layers, experts] share of each layer's routing picks per expert, and which experts were kept."""
    counts = np.array(routing["counts"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    kept = np.ones_like(shares, dtype=bool)
    for entry in kept_layers or []:
        if "experts" in entry and entry["layer"] < len(kept):
            kept[entry["layer"]] = False
            kept[entry["layer"], entry["experts"]] = True
    return shares, kept


def plot_routing(routing: dict, path: Path, kept_layers: list[dict] | None = None, title: str = "") -> Path | None:
    """Heat map of how often each expert of each layer was routed to; removed experts crossed out."""
    if not routing or not routing.get("counts"):
        return None
    shares, kept = routing_shares(routing, kept_layers)
    layers, experts = shares.shape
    fig, ax = plt.subplots(figsize=(min(14, 3.0 + 0.3 * experts), min(10, 1.6 + 0.28 * layers)))
    image = ax.imshow(shares, aspect="auto", cmap="magma", vmin=0.0, interpolation="nearest")
    ys, xs = np.nonzero(~kept)
    ax.scatter(xs, ys, marker="x", color="cyan", s=28, label="removed")
    zero_y, zero_x = np.nonzero(shares == 0)
    if len(zero_x):
        ax.scatter(zero_x, zero_y, marker="o", facecolors="none", edgecolors="lime", s=30, label="never routed")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or f"share of routing picks per expert ({routing['tokens']} tokens, top-{routing['top_k']})")
    if len(xs) or len(zero_x):  # below the map, where it hides no cell
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=7, frameon=False)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    return _save(fig, path)


def plot_unit_scores(groups: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, criterion: str) -> Path | None:
    """Histograms of log10 unit scores, kept and pruned stacked; `groups` maps a unit kind to
    (scores, kept-flags). Scores are divided by their layer's median so layers are comparable."""
    groups = {k: v for k, v in groups.items() if len(v[0])}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.2), squeeze=False)
    for ax, (kind, (scores, kept)) in zip(axes[0], groups.items()):
        positive = scores[scores > 0]
        floor = positive.min() if len(positive) else 1e-12
        logs = np.log10(np.maximum(scores, floor))
        bins = np.linspace(logs.min(), logs.max() + 1e-9, 40)
        ax.hist([logs[kept], logs[~kept]], bins=bins, stacked=True, label=["kept", "pruned"],
                color=["tab:blue", "tab:red"])
        ax.set_xlabel("log10(score / layer median)")
        ax.set_ylabel("units")
        ax.set_title(f"{kind}: {int(kept.sum())} kept, {int((~kept).sum())} pruned")
        ax.legend()
    fig.suptitle(f"unit scores ({criterion})")
    return _save(fig, path)


def _smooth(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def sparsity_curve(training: dict, ratio_achieved: float | None) -> tuple[list[int], list[float]] | None:
    """Share of the prunable parameters removed at each step: LoRAPrune's schedule when the run
    prunes while training, otherwise a constant (training after a one-shot prune)."""
    history = training.get("history", [])
    if not history:
        return None
    steps = [h["step"] for h in history]
    schedule = training.get("schedule")
    if schedule is None:
        return (steps, [ratio_achieved or 0.0] * len(steps)) if ratio_achieved is not None else None
    removed, current, updates = [], 0.0, iter(sorted(schedule, key=lambda e: e["step"]))
    pending = next(updates, None)
    for step in steps:
        while pending is not None and pending["step"] <= step:
            current = 1.0 - pending["kept"]
            pending = next(updates, None)
        removed.append(current)
    return steps, removed


def plot_training(training: dict, path: Path, ratio_achieved: float | None = None) -> Path | None:
    history = training.get("history", [])
    if not history:
        return None
    steps = [h["step"] for h in history]
    sparsity = sparsity_curve(training, ratio_achieved)
    panels = 3 if sparsity else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.0))
    loss = [h["loss"] for h in history]
    axes[0].plot(steps, loss, color="tab:gray", alpha=0.45, linewidth=0.8, label="per step")
    axes[0].plot(steps, _smooth(loss, max(2, len(loss) // 20)), color="tab:blue", label="moving average")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [h["lr"] for h in history], color="tab:green")
    axes[1].set_title("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if sparsity:
        axes[2].step(*sparsity, where="post", color="tab:red")
        axes[2].set_ylim(0, max(0.05, max(sparsity[1]) * 1.15))
        axes[2].set_title("share of prunable parameters removed")
    for ax in axes:
        ax.set_xlabel("step")
    return _save(fig, path)


def plot_domain_weights(history: list[dict], path: Path) -> Path | None:
    """Stacked domain weights over steps, for runs that log `domain_weights` (dynamic loading)."""
    points = [(h["step"], h["domain_weights"]) for h in history if h.get("domain_weights")]
    if not points:
        return None
    names = list(points[0][1])
    steps = [s for s, _ in points]
    weights = np.array([[w.get(n, 0.0) for n in names] for _, w in points]).T
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.stackplot(steps, weights, labels=names, step="post")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of each batch")
    ax.set_title("domain weights")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_mask_sizes(history: list[dict], path: Path) -> Path | None:
    """Sheared-LLaMA's masks over steps: each mask type's expected kept share against its warmed-up
    target (left), and the Lagrange multipliers (right), from the `masks` entries of the history."""
    points = [(h["step"], h["masks"]) for h in history if h.get("masks")]
    if not points:
        return None
    steps = [s for s, _ in points]
    kinds = [k[len("expected_"):] for k in points[0][1] if k.startswith("expected_") and k != "expected_parameters"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    for i, kind in enumerate(kinds):
        color = f"C{i}"
        left.plot(steps, [m[f"expected_{kind}"] / m[f"full_{kind}"] for _, m in points], color=color,
                  label=f"{kind} expected")
        left.plot(steps, [m[f"target_{kind}"] / m[f"full_{kind}"] for _, m in points], color=color, linestyle="--",
                  label=f"{kind} target")
        for lam in ("lambda_1", "lambda_2"):
            key = f"{lam}_{kind}"
            if key in points[0][1]:
                right.plot(steps, [m[key] for _, m in points], color=color,
                           linestyle="-" if lam == "lambda_1" else ":", label=key)
    left.set_xlabel("step")
    left.set_ylabel("kept share")
    left.set_title("expected kept units vs target")
    left.legend(fontsize=7)
    right.set_xlabel("step")
    right.set_title("Lagrange multipliers")
    right.set_yscale("symlog", linthresh=1.0)  # λ1 is small and changes sign; λ2 starts in the thousands
    right.legend(fontsize=7)
    return _save(fig, path)


def plot_comparison(runs: list[tuple[str, dict]], path: Path) -> Path:
    """One figure for `prunetune report A B ...`: perplexity of each run with its parameter count and
    its source model's perplexity (left), and the training-loss curves of the runs that trained (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    names, after, before, sizes = [], [], [], []
    for name, record in runs:
        results = record.get("results", {})
        if "perplexity_after" in results:
            names.append(name)
            after.append(results["perplexity_after"]["perplexity"])
            before.append(results.get("perplexity_before", {}).get("perplexity", np.nan))
            sizes.append(record.get("parameters", {}).get("after", {}).get("total"))
        history = record.get("training", {}).get("history", [])
        if history:
            loss = [h["loss"] for h in history]
            right.plot([h["step"] for h in history], _smooth(loss, max(2, len(loss) // 20)), label=name)
    if names:
        x = np.arange(len(names))
        bars = left.bar(x, after, color="tab:blue", label="after")
        left.scatter(x, before, marker="_", s=400, color="black", zorder=3, label="source model")
        left.bar_label(bars, [f"{s / 1e6:.1f}M" if s else "" for s in sizes], fontsize=8, padding=2)
        left.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        values = [v for v in after + before if np.isfinite(v) and v > 0]
        if values and max(values) / min(values) > 20:
            left.set_yscale("log")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no run has a perplexity", ha="center", va="center", transform=left.transAxes)
    left.set_ylabel("perplexity")
    left.set_title("perplexity after pruning (labels: parameters)")
    right.set_xlabel("step")
    right.set_title("training loss (moving average)")
    if right.lines:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no run trained", ha="center", va="center", transform=right.transAxes)
    return _save(fig, path)

