"""Evaluation reports: Markdown, JSON and PNG plots from the dict that ``training.evaluate`` computes.

Plot helpers are public so that the reproduction script (bench/reproduce_paper.py)
draws its figures the same way. Matplotlib runs with the non-interactive Agg
backend and is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import CascadeCurve

__all__ = [
    "ExampleImages",
    "to_jsonable",
    "markdown_table",
    "pct",
    "plot_exit_accuracy",
    "plot_cascade",
    "plot_first_correct_histogram",
    "plot_examples_grid",
    "render_markdown",
    "write_report",
]

# One colour per exit (and grey for "never"), as the coloured borders of paper Fig. 7.
EXIT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
NEVER_COLOUR = "#7f7f7f"
CRITERION_LABELS = {"ratio": "1-vs-2 ratio", "maxprob": "max probability", "entropy": "entropy"}


def _exit_colour(k: int) -> str:
    return EXIT_COLOURS[k % len(EXIT_COLOURS)]


class ExampleImages:
    """Fetch dataset images for display: the network input, un-normalised back to 0..1."""

    def __init__(self, dataset: Any, preprocessing: Mapping[str, Any]) -> None:
        self.dataset = dataset
        self.mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, index: int) -> np.ndarray:
        """Image ``index`` as (H, W) gray or (H, W, 3) RGB floats in [0, 1]."""
        x = np.asarray(self.dataset[int(index)][0], dtype=np.float32)  # (C, H, W), normalised
        x = np.clip(x * self.std + self.mean, 0.0, 1.0)
        return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))


# --------------------------------------------------------------------------- JSON / Markdown


def to_jsonable(value: Any) -> Any:
    """Recursively convert numpy values, curves and non-finite floats to JSON-safe plain types."""
    if isinstance(value, CascadeCurve):
        return value.to_dict()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan"/"inf" keep the information
    return value


def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage string ("-" for missing/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100.0 * float(value):.{digits}f}"


def _ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.4g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_exit_accuracy(exit_acc: Sequence[float], apriori_ms: Sequence[float], anytime_ms: Sequence[float],
                       path: str | Path, title: str = "Accuracy of every exit") -> Path:
    """Bars of per-exit accuracy, labelled with each exit's t_B / t_A."""
    plt = _pyplot()
    k = np.arange(1, len(exit_acc) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(k, 100 * np.asarray(exit_acc), color=[_exit_colour(i) for i in range(len(k))])
    for bar, tb, ta in zip(bars, apriori_ms, anytime_ms):
        ax.annotate(f"{bar.get_height():.1f}%\n{tb:.3g}/{ta:.3g} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(k, [f"exit {i}" for i in k])
    ax.set_ylabel("accuracy [%]")
    ax.set_ylim(0, 112)
    ax.set_title(title + "  (labels: t_B / t_A)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_cascade(curves: Mapping[str, CascadeCurve], fixed_depth: Sequence[Mapping[str, float]], path: str | Path,
                 fitted: Sequence[Mapping[str, Any]] = (), title: str = "Cascade vs fixed-depth exits") -> Path:
    """Accuracy vs mean measured cost per image while the threshold sweeps (paper Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"ratio": ("#d62728", "-"), "maxprob": ("#ff7f0e", "--"), "entropy": ("#9467bd", ":")}
    for name, curve in curves.items():
        colour, line = styles.get(name, ("black", "-"))
        ax.plot(curve.mean_cost_ms, 100 * curve.accuracy, line, color=colour, lw=1.6,
                label=f"cascade: {CRITERION_LABELS.get(name, name)}")
    fc = [p["cost_ms"] for p in fixed_depth]
    fa = [100 * p["accuracy"] for p in fixed_depth]
    ax.plot(fc, fa, "o-", color="#1f77b4", lw=1.2, label="fixed depth (exit k, t_B)")
    for p in fixed_depth:
        ax.annotate(str(int(p["exit"])), (p["cost_ms"], 100 * p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8, color="#1f77b4")
    pts = [f for f in fitted if "accuracy" in f]
    if pts:
        ax.plot([f["cost_ms"] for f in pts], [100 * f["accuracy"] for f in pts], "k*", ms=8,
                label="thresholds fitted on val")
    ax.set_xlabel("mean cost per image [ms]")
    ax.set_ylabel("accuracy [%]")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_first_correct_histogram(histogram: Mapping[str, int], path: str | Path,
                                 title: str = "First exit that classifies an image correctly") -> Path:
    """Bar chart of the first-correct-exit counts (exits 1..K and 'never')."""
    plt = _pyplot()
    names = list(histogram)
    counts = [histogram[n] for n in names]
    total = max(sum(counts), 1)
    colours = [NEVER_COLOUR if n == "never" else _exit_colour(int(n) - 1) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bars = ax.bar(range(len(names)), counts, color=colours)
    for bar, c in zip(bars, counts):
        ax.annotate(f"{100 * c / total:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n if n == "never" else f"exit {n}" for n in names])
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_examples_grid(examples: Mapping[str, Sequence[int]], images: Any, path: str | Path,
                       title: str = "Images first classified correctly at each exit") -> Path:
    """One row per exit (and 'never'), example images with a border in the exit's colour (paper Fig. 7)."""
    plt = _pyplot()
    rows = [(name, list(idx)) for name, idx in examples.items()]
    cols = max([len(idx) for _, idx in rows] + [1])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 0.8, 1.15 * len(rows) + 0.4), squeeze=False)
    for r, (name, idx) in enumerate(rows):
        colour = NEVER_COLOUR if name == "never" else _exit_colour(int(name) - 1)
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                img = images(idx[c])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel("never" if name == "never" else f"exit {name}", fontsize=9, color=colour)
                if not idx:
                    ax.axis("on")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- Markdown


def render_markdown(result: Mapping[str, Any], files: Mapping[str, str] | None = None) -> str:
    """The human-readable report of an evaluation result."""
    meta = result.get("meta", {})
    costs = result["costs"]
    acc = result["exit_accuracy"]
    files = files or {}
    out: list[str] = ["# Impatient DNN evaluation", ""]
    if meta:
        data = meta.get("data", {})
        out += [f"- checkpoint: `{meta.get('checkpoint')}` ({meta.get('backbone')}, head {meta.get('head')}, "
                f"trained with {((meta.get('trained_budget') or {}).get('scheme'))})",
                f"- data: {data.get('data')}, split **{data.get('split')}**, {result['num_images']} images"
                + (f" ({data['note']})" if data.get("note") else ""),
                f"- device: {meta.get('device')}; stage costs: {costs['source']} (device label `{costs['device']}`)"]
        if meta.get("command"):
            out.append(f"- command: `{meta['command']}`")
        if meta.get("elapsed_s") is not None:
            out.append(f"- elapsed: {meta['elapsed_s']:.1f} s")
        out.append("")

    out += ["## Exits", "",
            "t_B: a-priori cost (blocks 1..k, head k only); t_A: anytime cost (blocks and heads 1..k).", ""]
    out.append(markdown_table(
        ["exit", "accuracy %", "block ms", "head ms", "t_B ms", "t_A ms"],
        [[k + 1, pct(acc[k]), _ms(costs["block_ms"][k]), _ms(costs["head_ms"][k]), _ms(costs["apriori_ms"][k]),
          _ms(costs["anytime_ms"][k])] for k in range(len(acc))]))
    if "exit_accuracy" in files:
        out += ["", f"![exit accuracy]({files['exit_accuracy']})"]

    out += ["", "## Expected accuracy per weighting scheme (paper Table 1)", "",
            "E[acc] = sum_k w_k acc_k; t_B / t_A: expected time per image under the scheme's exit distribution.", ""]
    rows = [[r["scheme"], " ".join(f"{w:.3f}" for w in r["weights"]), pct(r["expected_accuracy"]), _ms(r["t_B_ms"]),
             _ms(r["t_A_ms"])] for r in result["schemes"]]
    tb = result.get("trained_budget")
    if tb:
        rows.append(["*trained weights*", " ".join(f"{w:.3f}" for w in tb["weights"]), pct(tb["expected_accuracy"]),
                     _ms(tb["t_B_ms"]), _ms(tb["t_A_ms"])])
    out.append(markdown_table(["scheme", "weights", "E[acc] %", "t_B ms", "t_A ms"], rows))
    ens = result.get("ensemble")
    if ens:
        out += ["", "## Exit ensemble (weights from the checkpoint, fitted on validation)", "",
                "Exit k answers with the weighted geometric mean of the probabilities of exits 1..k "
                "(impatient_ros.core.ensemble); costs as above (the combination itself is negligible).", ""]
        plain = {r["scheme"]: r["expected_accuracy"] for r in result["schemes"]}
        out.append(markdown_table(
            ["exit", "weights (exits 1..k)", "accuracy %", "plain accuracy %"],
            [[k + 1, " ".join(f"{w:.3f}" for w in ens["weights"][k]), pct(ens["exit_accuracy"][k]), pct(acc[k])]
             for k in range(len(ens["exit_accuracy"]))]))
        erows = [[r["scheme"], pct(r["expected_accuracy"]), pct(plain.get(r["scheme"]))] for r in ens["schemes"]]
        if ens.get("trained_budget_expected_accuracy") is not None and tb:
            erows.append(["*trained weights*", pct(ens["trained_budget_expected_accuracy"]), pct(tb["expected_accuracy"])])
        out += ["", markdown_table(["scheme", "E[acc] % (ensemble)", "E[acc] % (plain)"], erows)]

    if result.get("budgets"):
        out += ["", "## Time-budget distributions (Eq. 5 with the measured ready times)", "",
                "a-priori: exit k is ready at t_B(k); anytime: at t_A(k). E[acc] counts budgets before the first "
                "exit as wrong; E[acc | answered] leaves them out.", ""]
        rows = []
        for r in result["budgets"]:
            if "error" in r:
                rows.append([r["spec"], r["scenario"], r["error"], "", "", "", ""])
                continue
            rows.append([r["spec"], r["scenario"], " ".join(f"{w:.3f}" for w in r["weights"]),
                         f"{r['mass_before_first']:.3f}", pct(r["expected_accuracy"]),
                         pct(r.get("expected_accuracy_answered")), _ms(r.get("t_B_ms", r.get("t_A_ms")))])
        out.append(markdown_table(["distribution", "scenario", "weights", "no answer", "E[acc] %",
                                   "E[acc | answered] %", "E[time] ms"], rows))

    cascade = result["cascade"]
    criteria = list(cascade["comparison"])
    out += ["", "## Cascade vs fixed-depth exits (paper Fig. 6)", "",
            "Fixed depth k costs t_B(k); the cascade's accuracy at the same mean cost is read off its sweep "
            "(upper envelope; points in between are reached by mixing two thresholds).", ""]
    rows = []
    for i, p in enumerate(cascade["fixed_depth"]):
        rows.append([p["exit"], _ms(p["cost_ms"]), pct(p["accuracy"])]
                    + [pct(cascade["comparison"][c][i]["cascade_accuracy"]) for c in criteria]
                    + [_ms(cascade["comparison"][c][i]["cascade_cost_at_same_accuracy_ms"]) for c in criteria])
    out.append(markdown_table(["exit", "cost ms", "fixed depth %"]
                              + [f"cascade {CRITERION_LABELS[c]} %" for c in criteria]
                              + [f"{CRITERION_LABELS[c]}: ms for the same accuracy" for c in criteria], rows))
    if cascade.get("range_gain"):
        out += ["", "Over the whole cost range t_B(1)..t_B(K), cascade minus fixed depth at equal mean cost "
                "(fixed depth between two exits = a random mix of them), accuracy points:", ""]
        out.append(markdown_table(
            ["criterion", "mean gain", "largest gain", "at ms", "smallest gain"],
            [[CRITERION_LABELS[c], f"{100 * g['mean_gain']:+.2f}", f"{100 * g['max_gain']:+.2f}",
              _ms(g["max_gain_at_ms"]), f"{100 * g['min_gain']:+.2f}"] for c, g in cascade["range_gain"].items()]))
    if "cascade" in files:
        out += ["", f"![cascade]({files['cascade']})"]
    if result.get("fitted"):
        out += ["", "### Thresholds fitted on the validation split for a target mean cost", ""]
        rows = []
        for f in result["fitted"]:
            if "error" in f:
                rows.append([f["criterion"], _ms(f["target_ms"]), f["error"], "", "", "", ""])
            else:
                rows.append([f["criterion"], _ms(f["target_ms"]), f"{f['threshold']:.4g}", pct(f["val_accuracy"]),
                             _ms(f["val_cost_ms"]), pct(f["accuracy"]), _ms(f["cost_ms"])])
        out.append(markdown_table(["criterion", "target ms", "threshold", "val acc %", "val cost ms",
                                   "acc %", "cost ms"], rows))

    fc = result["first_correct"]
    hist = fc["histogram"]
    total = max(sum(hist.values()), 1)
    out += ["", "## First exit that classifies an image correctly (paper Fig. 7)", ""]
    out.append(markdown_table(["exit"] + list(hist), [["images"] + [str(v) for v in hist.values()],
                                                      ["share %"] + [pct(v / total, 1) for v in hist.values()]]))
    for key, label in (("first_correct", "first-correct histogram"), ("examples", "examples per exit")):
        if key in files:
            out += ["", f"![{label}]({files[key]})"]
    out.append("")
    return "\n".join(out)


def write_report(result: dict[str, Any], out: str | Path, *, images: Any = None, plots: bool = True) -> dict[str, str]:
    """Write report.json, report.md and (with ``plots``) the PNGs to ``out``; return the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        costs = result["costs"]
        plot_exit_accuracy(result["exit_accuracy"], costs["apriori_ms"], costs["anytime_ms"], out / "exit_accuracy.png")
        files["exit_accuracy"] = "exit_accuracy.png"
        plot_cascade(result["cascade"]["curves"], result["cascade"]["fixed_depth"], out / "cascade.png",
                     result.get("fitted", ()))
        files["cascade"] = "cascade.png"
        plot_first_correct_histogram(result["first_correct"]["histogram"], out / "first_correct.png")
        files["first_correct"] = "first_correct.png"
        if images is not None:
            plot_examples_grid(result["first_correct"]["examples"], images, out / "first_correct_examples.png")
            files["examples"] = "first_correct_examples.png"
    markdown = render_markdown(result, files)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    files["markdown"] = "report.md"
    files["json"] = "report.json"
    payload = {k: v for k, v in result.items() if k != "files"}
    payload["first_correct"] = {k: v for k, v in result["first_correct"].items() if k != "first_correct"}
    payload["files"] = files
    (out / "report.json").write_text(json.dumps(to_jsonable(payload), indent=1), encoding="utf-8")
    return {k: str(out / v) for k, v in files.items()}
