"""docs/results/heldout.md from benchmarks/results/heldout.json alone: the rows' table, the one-shot
selection, the changes tried, and the targets, each against its measured value (heldout.py --report)."""

from __future__ import annotations

import statistics
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)
from _cells import stat
from heldout_plan import (
    AT_LORAPRUNE_SHAPE, BASELINES, DEFAULT, DEPTH_ROWS, DOMAINS, HELD_OUT, RATIOS, ROWS, SAME_MODEL_AS, SELECTION,
    SHEAR_STEPS, SOURCE_HEADS, SWEEP, SWEEP_PAIRS, SWEEP_RATIOS, best_candidate, plan,
)


def rows_of(results: dict) -> dict:
    rows: dict = {}
    for key, cell in results["cells"].items():
        if "row" in cell and "variant" not in cell:
            rows.setdefault((cell["ratio"], cell["row"]), []).append(cell)
    return rows


def ppl(group: list[dict], domain: str) -> list[float]:
    return [c["perplexity"][domain]["perplexity"] for c in group]


def _row_detail(row: str, cell: dict) -> str:
    if row == "one-shot":
        return f" ({cell['candidate']})"
    if row == "sheared":
        shape = cell["layer_shape"]
        return f" (every layer {shape['num_heads']} / {shape['num_kv_heads']} heads, {shape['intermediate']} channels)"
    if row in DEPTH_ROWS:
        shape = cell["layer_shape"]
        return (f" ({len(cell['layers_removed'])} layers removed; each left keeps {shape['num_heads']} / "
                f"{shape['num_kv_heads']} heads, {shape['intermediate']} channels)")
    return ""


def same_models(results: dict) -> list[str]:
    """A note for rows at one ratio that scored the same to the digit at every seed they share: one
    model reached by several routes, and why."""
    rows, notes = rows_of(results), []

    def same(first: list[dict], second: list[dict]) -> int:
        pairs = [(x, y) for x in first for y in second if x["seed"] == y["seed"]]
        alike = all(abs(x["perplexity"][d]["perplexity"] - y["perplexity"][d]["perplexity"]) < 1e-6
                    for x, y in pairs for d in DOMAINS)
        return len(pairs) if alike else 0

    for ratio in RATIOS:
        names = [row for row in ROWS if (ratio, row) in rows]
        classes: list[list[str]] = []
        for row in names:
            home = next((c for c in classes if same(rows[(ratio, c[0])], rows[(ratio, row)])), None)
            if home is None:
                classes.append([row])
            else:
                home.append(row)
        for members in (c for c in classes if len(c) > 1):
            seeds = min(same(rows[(ratio, members[0])], rows[(ratio, m)]) for m in members[1:])
            why = []
            width = rows.get((ratio, "width"), [{}])[0].get("layer_shape", {})
            if "width" in members and "torch-pruning" in members and width.get("num_heads") == SOURCE_HEADS:
                why.append("the cost split kept every head, so `width` is first-order Taylor on the MLP channels "
                           "of every layer, which is what the Torch-Pruning peer runs: they chose the same "
                           "channels, a check of prunetune's Taylor against Torch-Pruning's")
            if "mix" in members and not rows[(ratio, "mix")][0].get("layers_removed"):
                why.append("the mix removed no layer, so it is the width row")
            named = [f"`{m}`" for m in members]
            notes.append(f"At {ratio:.0%}, " + ", ".join(named[:-1]) + f" and {named[-1]} are one model: at every "
                         f"seed they share ({seeds}) they score the same to the digit" +
                         (f" ({'; '.join(why)})" if why else "") + ".")
            stopped = [m for m in members if (ratio, m) in SAME_MODEL_AS]
            if stopped:
                peer = SAME_MODEL_AS[(ratio, stopped[0])]
                notes[-1] += (f" The plan runs no more seeds of {' and '.join(f'`{m}`' for m in stopped)} at this "
                              f"ratio: they would repeat `{peer}`'s.")
    return notes


def results_table(results: dict) -> str:
    dense = results["cells"].get("dense")
    out = []
    if dense:
        out.append("Unpruned SmolLM2-135M: " + ", ".join(f"{d} {dense['perplexity'][d]['perplexity']:.2f}"
                                                         for d in DOMAINS) + f" ({dense['parameters']:,} parameters).")
    rows = []
    order = list(ROWS)
    for (ratio, row), group in sorted(rows_of(results).items(), key=lambda g: (-(g[0][0] or 0), order.index(g[0][1]))):
        rows.append([f"{ratio:.0%}" if ratio else "0% (unpruned)", f"`{row}`" + _row_detail(row, group[0]),
                     len(group), *(stat(ppl(group, d)) for d in DOMAINS), f"{group[0]['parameters']:,}",
                     f"{group[0]['size_vs_default']:.3f}" if "size_vs_default" in group[0] else "",
                     f"{statistics.mean(c['seconds_per_step'] for c in group):.2f}",
                     f"{max(c['peak_memory_bytes'] for c in group) / 2**20:,.0f}",
                     f"{statistics.mean(c['wall_seconds'] for c in group) / 60:.1f}"])
    out.append(_report.table(["ratio", "row", "seeds", "pydoc (trained on)", "stdlib-code", "handbook", "parameters",
                              "size / default's", "s/step", "peak tensor MiB", "minutes per run"], rows))
    out.append("Rows:\n\n" + "\n".join(f"- `{name}`: {text}" for name, (text, _) in ROWS.items()))
    out += same_models(results)
    if not_run(results, "row"):
        out.append(not_run(results, "row", ", ratio/row/seed"))
    return "\n\n".join(out)


def not_run(results: dict, kind: str, form: str = "") -> str:
    """The plan's cells of one kind (row, sweep) that have no result yet, as a sentence ("" if none);
    `form` says how to read their keys."""
    missing = [key for key, cell_kind, *_ in plan() if cell_kind == kind and key not in results["cells"]]
    if not missing:
        return ""
    cells = f"{len(missing)} cell" + ("s" if len(missing) > 1 else "")
    return f"Not run yet ({cells} of the plan{form}): " + ", ".join(f"`{key}`" for key in missing) + "."


def sweep_cells(results: dict, ratio: float, name: str) -> list[dict]:
    """A change's cells at a ratio, one per seed run."""
    return [c for key, c in results["cells"].items() if key.startswith(f"sweep/{ratio}/{name}/")]


def sweep_table(results: dict) -> str:
    """Each variant's one seed beside the default's seeds and the baselines', at the sweep's ratios."""
    rows_by, rows = rows_of(results), []
    for ratio in SWEEP_RATIOS:
        if not any(key.startswith(f"sweep/{ratio}/") for key in results["cells"]):
            continue
        changed = [row for name, (_, row, _) in SWEEP.items() if sweep_cells(results, ratio, name)]
        for row in dict.fromkeys((DEFAULT, *BASELINES, *changed)):  # the rows the changes start from
            group = rows_by.get((ratio, row), [])
            if group:
                rows.append([f"{ratio:.0%}", f"`{row}`", len(group), *(stat(ppl(group, d)) for d in DOMAINS),
                             f"{group[0]['parameters']:,}", ""])
        for name, (why, row, extra) in SWEEP.items():
            group = sweep_cells(results, ratio, name)
            if group:
                where = " (recovery)" if row in BASELINES else ""
                shape = ", at LoRAPrune's shape" if name in AT_LORAPRUNE_SHAPE else ""
                split = (f" ({SHEAR_STEPS[name]} + {group[0]['steps'] - SHEAR_STEPS[name]} steps{shape})"
                         if name in SHEAR_STEPS else "")
                rows.append([f"{ratio:.0%}", f"`{row}`{where} {extra}{split}".replace("  ", " "), len(group),
                             *(stat(ppl(group, d)) for d in DOMAINS), f"{group[0]['parameters']:,}", why])
    return _report.table(["ratio", "run", "seeds", "pydoc (trained on)", "stdlib-code", "handbook", "parameters",
                          "why try it"], rows) if rows else ""


def selection_table(results: dict) -> str:
    rows = []
    for ratio in RATIOS:
        best = best_candidate(results, ratio)
        for key, c in sorted(results["cells"].items()):
            if key.startswith(f"select/{ratio}/") and c["candidate"] in SELECTION:
                rows.append([f"{ratio:.0%}", c["candidate"] + (" (chosen)" if c["candidate"] == best else ""),
                             f"{c['perplexity']['pydoc']['perplexity']:.2f}", f"{c['parameters']:,}"])
    return _report.table(["ratio", "criterion / layers / allocation / split", "pydoc held-out, masks only",
                          "parameters"], rows)


def ahead_by_two_sd(target: str, ours: list[dict], theirs: list[dict]) -> list[str]:
    """A target row: `ours` below `theirs` on every domain by more than two standard deviations (the
    larger of the two groups')."""
    parts, met = [], True
    for d in DOMAINS:
        a, b = ppl(ours, d), ppl(theirs, d)
        spread = max(statistics.stdev(a), statistics.stdev(b))
        margin = (statistics.mean(b) - statistics.mean(a)) / spread if spread else float("inf")
        met &= margin > 2
        parts.append(f"{d} {stat(a)} against {stat(b)} ({margin:+.1f} SD)")
    return [target, f"{'; '.join(parts)} ({len(ours)} and {len(theirs)} seeds)", "met" if met else "missed"]


def matches_or_beats(target: str, sheared: list[dict], ours: list[dict]) -> list[str]:
    """A target row: `sheared`'s mean at or below `ours`' on every held-out domain."""
    parts = [f"{d} {stat(ppl(sheared, d))} against {stat(ppl(ours, d))}" for d in HELD_OUT]
    met = all(statistics.mean(ppl(sheared, d)) <= statistics.mean(ppl(ours, d)) for d in HELD_OUT)
    return [target, f"{'; '.join(parts)} ({len(sheared)} and {len(ours)} seeds)", "met" if met else "missed"]


def targets_table(results: dict) -> str:
    rows_by = rows_of(results)
    dense = results["cells"].get("dense")
    rows = []
    for ratio in RATIOS:
        ours = rows_by.get((ratio, DEFAULT), [])
        for baseline in BASELINES:
            theirs = rows_by.get((ratio, baseline), [])
            if len(ours) >= 2 and len(theirs) >= 2:
                rows.append(ahead_by_two_sd(f"at {ratio:.0%}, the default below `{baseline}` by more than 2 SD on "
                                            "every domain", ours, theirs))
        if ratio in SWEEP_PAIRS:
            change, baseline_change = SWEEP_PAIRS[ratio]
            ours_changed, theirs_changed = sweep_cells(results, ratio, change), sweep_cells(results, ratio,
                                                                                          baseline_change)
            if len(ours_changed) >= 2 and len(theirs_changed) >= 2:
                rows.append(ahead_by_two_sd(f"at {ratio:.0%} with `{SWEEP[change][2]}` for both (not the default), "
                                            f"LoRAPrune below `{SWEEP[baseline_change][1]}` by more than 2 SD on every "
                                            "domain", ours_changed, theirs_changed))
        sheared = rows_by.get((ratio, "sheared"), [])
        if sheared and ours:
            rows.append(matches_or_beats(f"at {ratio:.0%}, `sheared` (shear + train, the same total steps) matches "
                                         "or beats the default on every held-out domain", sheared, ours))
        for name in AT_LORAPRUNE_SHAPE:  # the target's own terms: at LoRAPrune's shape
            changed = sweep_cells(results, ratio, name)
            if changed and ours:
                extra = f" with `{SWEEP[name][2]}`" if SWEEP[name][2] else ""
                rows.append(matches_or_beats(
                    f"at {ratio:.0%}, `sheared` at the default's very shape{extra}, {SHEAR_STEPS[name]} + "
                    f"{changed[0]['steps'] - SHEAR_STEPS[name]} steps (a change, not the row), matches or beats the "
                    "default on every held-out domain", changed, ours))
        if ratio == 0.2 and ours and dense:
            gaps = {d: statistics.mean(ppl(ours, d)) / dense["perplexity"][d]["perplexity"] - 1 for d in DOMAINS}
            rows.append(["at 20%, within 10% of the dense model's perplexity on every domain",
                         "; ".join(f"{d} {g:+.0%}" for d, g in gaps.items()),
                         "met" if max(gaps.values()) <= 0.10 else "missed"])
    return _report.table(["target", "measured", ""], rows) if rows else ""


def command(results: dict) -> str:
    s = results["settings"]
    return (f"python benchmarks/heldout.py --model {s['model']} --steps {s['steps']} --batch-size {s['batch_size']} "
            f"--seq-len {s['seq_len']} --lr {s['lr']} --data {s['data']} --eval-seq-len {s['eval_seq_len']} "
            f"--eval-windows {s['eval_windows']} --select-windows {s['select_windows']}")


def write_report(results: dict, source: Path, out_dir: Path) -> None:
    cells = [c for c in results["cells"].values() if "machine" in c]
    provenance = _report.provenance(command(results), [c["machine"] for c in cells], [c["date"] for c in cells],
                                    [c.get("torch") for c in cells])
    s = results["settings"]
    sections = [_report.section(
        "Perplexity on three domains at equal size and equal tokens", provenance,
        f"Trained and calibrated on `{s['data']}` (training split) only: {s['steps']} steps of {s['batch_size']} x "
        f"{s['seq_len']} tokens for every row. Perplexity over at most {s['eval_windows']} non-overlapping "
        f"{s['eval_seq_len']}-token windows of each domain, the same windows for every row. Mean ± sample standard "
        "deviation over the seeds; s/step and minutes are means, the peak tensor memory the largest over seeds "
        "(training only, not a baseline's prune step; a baseline's recovery includes its teacher, a second copy "
        "of the unpruned model of 513 MiB that the LoRAPrune rows do not hold). The cells ran two at a "
        "time, one thread "
        "each, beside other work: compare times between rows, not with other pages.", results_table(results))]
    if selection_table(results).count("\n") > 1:
        sections.append(_report.section(
            "Choosing prunetune's best one-shot configuration", provenance,
            f"Each candidate cut to the default's size at that ratio, masks only (no recovery), scored on the "
            f"first {s['select_windows']} windows of pydoc's held-out split: the training domain, so the choice "
            "never sees the two domains the rows are judged on.", selection_table(results)))
    if any(key.startswith("sweep/") for key in results["cells"]):
        sections.append(_report.section(
            "What was tried to meet the targets", provenance,
            "A row with one change at a time, the same steps, tokens and evaluation as the rows above; a "
            "baseline's change is to its recovery, the sheared row's to both its runs (`shear` and `train`). "
            "One seed each, three planned for rank 32 on both rows at both ratios (what a new default rank "
            "needs) and for Sheared-LLaMA at LoRAPrune's shape at 50%, with a LoRA and with every weight (a "
            "target rests on them). A sheared change with a step split gives `shear` that many steps and `train` "
            "the rest; \"LoRAPrune's shape\" is a per-layer target, the config.json of a LoRAPrune result at "
            "that ratio.",
            "\n\n".join(filter(None, [sweep_table(results), not_run(results, "sweep")]))))
    if targets_table(results):
        sections.append(_report.section("The default against the targets", provenance, targets_table(results)))
    _report.write_page("heldout", [_report.relative(source)], sections, out_dir)
