"""Bench reports: a rich table, ``report.json``, ``report.md`` and PNG plots (accuracy vs latency;
per-class recall drop). Plots need matplotlib (``edgeskin[bench]``); without it they are
skipped with a note."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes, write_json
from .runner import BenchReport


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{100 * float(x):.1f}"


def _pts(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{float(x) + 0.0:+.2f}".replace("-0.00", "+0.00")


def _ms(row: dict[str, Any], key: str = "p50_ms") -> str:
    v = (row.get("latency_batch1") or {}).get(key)
    return "-" if v is None else f"{v:.1f}"


def _mb(v: Any) -> str:
    return "-" if not v else f"{v / 1e6:.1f}"


def _ci(row: dict[str, Any], which: str, metric: str) -> str:
    c = (row.get(which) or {}).get(metric)
    if not c:
        return "-"
    return f"{c['point']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def summary_columns() -> list[str]:
    return ["row", "status", "model MB", "top-1", "Δtop-1", "top-2", "top-3", "bal.acc", "Δbal", "mel sens",
            "mel sens @spec", "malig. sens/spec", "flips (ens/stu)", "ECE", "p50 ms", "p90 ms", "p99 ms",
            "img/s @8", "load s", "peak MB"]


def summary_cells(r: dict[str, Any]) -> list[str]:
    if r.get("status") != "ok":
        return [r["row"], f"FAILED: {r.get('error', '')}"[:80]] + ["-"] * (len(summary_columns()) - 2)
    d = r.get("drops_vs_ensemble", {})
    mfs = r.get("mel_at_fixed_specificity") or {}
    mal = r.get("malignant_vs_benign") or {}
    thr = (r.get("throughput") or {}).get("8", {}).get("images_per_s")
    flips = f"{r.get('flips_vs_ensemble', '-')}/{r.get('flips_vs_student', '-')}"
    return [r["row"], "ok" + (" (host proxy)" if r.get("host_proxy") else ""), _mb(r.get("size_bytes")),
            _pct(r["top1"]), _pts(-d.get("top1", 0.0)),
            _pct(r["top2"]), _pct(r["top3"]), _pct(r["balanced_accuracy"]), _pts(-d.get("balanced", 0.0)),
            _pct(r.get("positive_sensitivity")), _pct(mfs.get("sensitivity")),
            f"{_pct(mal.get('sensitivity'))}/{_pct(mal.get('specificity'))}", flips, f"{r['ece']:.3f}",
            _ms(r), _ms(r, "p90_ms"), _ms(r, "p99_ms"), "-" if thr is None else f"{thr:.0f}",
            "-" if r.get("load_s") is None else f"{r['load_s']:.2f}",
            "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"]


def rich_table(report: BenchReport) -> Any:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"edgeskin bench: {report.config['n_images']} images ({report.config['split']}); "
                    "Δ = change vs the ensemble, points")
    for c in summary_columns():
        t.add_column(c, justify="left" if c in ("row", "status") else "right")
    for r in report.rows:
        t.add_row(*[escape(c) for c in summary_cells(r)])
    return t


def markdown(report: BenchReport) -> str:
    rows = report.rows
    cfg = report.config
    lines = [
        "# edgeskin bench report",
        "",
        f"{cfg['n_images']} images of the {cfg['split']} split. Δ: change vs the full-precision ensemble, in "
        "points. Latency: batch 1 after warm-up through edgeskin.runtime "
        f"({cfg['runs']} runs, threads {cfg['threads'] or 'engine default'}); throughput at batch 8. "
        f"Melanoma sensitivity @spec: at the threshold on P(mel) giving {100 * cfg['specificity']:.0f}% "
        "specificity for that row. Malignant = P(mel)+P(bcc)+P(akiec) ≥ 0.5.",
        "",
        "| " + " | ".join(summary_columns()) + " |",
        "|" + "---|" * len(summary_columns()),
    ]
    lines += ["| " + " | ".join(summary_cells(r)) + " |" for r in rows]
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        codes = list(ok[0]["per_class_recall"])
        lines += ["", "## Per-class recall (%) and its drop vs the ensemble (points)", "",
                  "| row | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
        for r in ok:
            cells = [f"{_pct(r['per_class_recall'][c])} ({_pts(-(r['per_class_recall_drop_vs_ensemble'][c] or 0))})"
                     for c in codes]
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
        lines += ["", "## Uncertainty", "",
                  "Paired bootstrap (1000 resamples) of the drop in points, 95% interval; McNemar's exact test on "
                  "top-1 correctness (b: right before, wrong now; c: the reverse).", "",
                  "| row | top-1 drop vs ensemble | balanced drop vs ensemble | McNemar vs ensemble (b/c, p) | "
                  "top-1 drop vs student | McNemar vs student (b/c, p) |", "|---|---|---|---|---|---|"]
        for r in ok:
            mn = r.get("mcnemar_vs_ensemble", {})
            ms = r.get("mcnemar_vs_student")
            lines.append(
                f"| {r['row']} | {_ci(r, 'ci_vs_ensemble', 'top1')} | {_ci(r, 'ci_vs_ensemble', 'balanced')} | "
                f"{mn.get('b', '-')}/{mn.get('c', '-')}, p={mn.get('p_value', float('nan')):.3f} | "
                f"{_ci(r, 'ci_vs_student', 'top1')} | "
                + (f"{ms['b']}/{ms['c']}, p={ms['p_value']:.3f}" if ms else "-") + " |")
    b = report.budget
    lines += ["", "## Budget", "",
              f"Against the {b.get('applied_against')}: "
              + ", ".join(f"{k} ≤ {b[k]}" for k in ("top1", "balanced", "mel_recall") if b.get(k) is not None)
              + (f", p90 latency ≤ {b['max_latency_ms']} ms" if b.get("max_latency_ms") is not None else ""), ""]
    ungated = [r["row"] for r in rows if r.get("kind") == "bundle" and not r.get("gated", True)]
    if ungated:
        lines += [f"Not gated (shown for comparison): {', '.join(ungated)}.", ""]
    lines += [f"- BREACH: {m}" for m in report.breaches] or ["- every bundle within budget" if any(
        b.get(k) is not None for k in ("top1", "balanced", "mel_recall", "max_latency_ms")) else "- no budget set"]
    lines.append("")
    return "\n".join(lines)


def plots(report: BenchReport, out_dir: Path) -> list[str]:
    """PNG plots; returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in report.rows if r.get("status") == "ok"]
    written = []
    timed = [r for r in ok if (r.get("latency_batch1") or {}).get("p50_ms")]
    if timed:
        fig, ax = plt.subplots(figsize=(9, 5))
        markers = "osD^v<>pPX*h"
        for i, r in enumerate(timed):
            x, yv = r["latency_batch1"]["p50_ms"], 100 * r["balanced_accuracy"]
            ax.scatter([x], [yv], s=45, marker=markers[i % len(markers)], label=r["row"])
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax.set_xscale("log")
        ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
        ax.set_ylabel("balanced accuracy (%)")
        ax.set_title("Accuracy vs latency")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "accuracy_vs_latency.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_latency.png")
    others = [r for r in ok if r["row"] != "ensemble"]
    if others:
        codes = list(others[0]["per_class_recall"])
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        width = 0.8 / len(others)
        for i, r in enumerate(others):
            vals = [r["per_class_recall_drop_vs_ensemble"][c] or 0.0 for c in codes]
            ax.bar([j + i * width for j in range(len(codes))], vals, width, label=r["row"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(codes))], codes)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("recall drop vs the ensemble (points)")
        ax.set_title("Per-class recall drop")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "per_class_recall_drop.png", dpi=120)
        plt.close(fig)
        written.append("per_class_recall_drop.png")
    return written


def load_report(path: str | Path) -> BenchReport:
    """A report back from its ``report.json`` (to re-render the Markdown and plots)."""
    import json

    d = json.loads(Path(path).read_text())
    return BenchReport(d["rows"], d["config"], d["budget"], d.get("breaches", []), d.get("reference", {}))


def write_reports(report: BenchReport, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(report, out)
    data = report.to_dict()
    data["plots"] = pngs
    write_json(out / "report.json", data)
    md = markdown(report) + ("".join(f"\n![{p}]({p})\n" for p in pngs) if pngs else
                             "\n(plots skipped: install matplotlib, `pip install 'edgeskin[bench]'`)\n")
    atomic_write_bytes(out / "report.md", md.encode())
    return {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "plots": pngs}


__all__ = ["rich_table", "markdown", "plots", "write_reports", "load_report"]
