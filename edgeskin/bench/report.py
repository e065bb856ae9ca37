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
    """A drop in points: positive is worse, everywhere in these reports."""
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{float(x) + 0.0:+.2f}".replace("-0.00", "+0.00")


def _mb(v: Any) -> str:
    return "-" if not v else f"{v / 1e6:.1f}"


def _ci(row: dict[str, Any], which: str, metric: str) -> str:
    c = (row.get(which) or {}).get(metric)
    if not c:
        return "-"
    return f"{c['point']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def _lat(row: dict[str, Any], key: str, *, p99: bool = True, n: bool = False) -> str:
    """``p50/p90[/p99]`` ms of ``latency_e2e`` or ``latency_batch1``; "proxy" for a host-proxy row
    (not a device's latency), "-" when not timed here, "n/a" for a p99 from too few samples."""
    if row.get("host_proxy"):
        return "proxy"
    st = row.get(key)
    if not st:
        return "-"
    parts = [f"{st['p50_ms']:.1f}", f"{st['p90_ms']:.1f}"]
    if p99:
        parts.append("n/a" if st.get("p99_ms") is None else f"{st['p99_ms']:.1f}")
    text = "/".join(parts)
    return f"{text} ({st['runs']})" if n else text


def _status(r: dict[str, Any], width: int | None = None) -> str:
    if r.get("status") != "ok":
        text = f"FAILED: {r.get('error', '')}"
        return text if width is None else text[:width]
    if r.get("forced"):
        return "FORCED"
    return "ok"


def _flips(r: dict[str, Any]) -> str:
    return f"{r.get('flips_vs_ensemble', '-')}/{r.get('flips_vs_student', '-')}"


COMPACT = ["row", "status", "MB", "top-1", "bal.acc", "mel sens", "flips e/s", "e2e p50/p90 ms"]


def compact_cells(r: dict[str, Any]) -> list[str]:
    if r.get("status") != "ok":
        return [r["row"], _status(r, 40)] + ["-"] * (len(COMPACT) - 2)
    return [r["row"], _status(r), _mb(r.get("size_bytes")), _pct(r["top1"]), _pct(r["balanced_accuracy"]),
            _pct(r.get("positive_sensitivity")), _flips(r), _lat(r, "latency_e2e", p99=False)]


def summary_columns() -> list[str]:
    return ["row", "status", "model MB", "top-1", "top-1 drop", "top-2", "top-3", "bal.acc", "bal. drop",
            "mel sens", "mel sens @spec", "malig. sens/spec", "flips (ens/stu)", "ECE",
            "model-only p50/p90/p99 ms (n)", "end-to-end p50/p90/p99 ms (n)", "img/s @8", "load s", "peak MB"]


def summary_cells(r: dict[str, Any]) -> list[str]:
    if r.get("status") != "ok":
        return [r["row"], _status(r)] + ["-"] * (len(summary_columns()) - 2)
    d = r.get("drops_vs_ensemble", {})
    mfs = r.get("mel_at_fixed_specificity") or {}
    mal = r.get("malignant_vs_benign") or {}
    thr = (r.get("throughput") or {}).get("8", {}).get("images_per_s")
    return [r["row"], _status(r), _mb(r.get("size_bytes")),
            _pct(r["top1"]), _pts(d.get("top1")),
            _pct(r["top2"]), _pct(r["top3"]), _pct(r["balanced_accuracy"]), _pts(d.get("balanced")),
            _pct(r.get("positive_sensitivity")), _pct(mfs.get("sensitivity")),
            f"{_pct(mal.get('sensitivity'))}/{_pct(mal.get('specificity'))}", _flips(r), f"{r['ece']:.3f}",
            _lat(r, "latency_batch1", n=True), _lat(r, "latency_e2e", n=True),
            "-" if thr is None or r.get("host_proxy") else f"{thr:.0f}",
            "-" if r.get("load_s") is None else f"{r['load_s']:.2f}",
            "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"]


def rich_table(report: BenchReport, *, wide: bool = False) -> Any:
    """The terminal table: compact by default (it reads in full at 100 columns), every column with
    ``wide``."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    cols = summary_columns() if wide else COMPACT
    cells = summary_cells if wide else compact_cells
    t = Table(title=f"edgeskin bench: {report.config['n_images']} images ({report.config['split']})",
              caption="flips vs ensemble/student; latency batch 1, end to end; "
                      + ("drops vs the ensemble in points, positive = worse" if wide else "--wide for more"),
              box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        t.add_column(c, justify="left" if c in ("row", "status") else "right", overflow="fold")
    for r in report.rows:
        t.add_row(*[escape(c) for c in cells(r)])
    return t


def markdown(report: BenchReport) -> str:
    rows = report.rows
    cfg = report.config
    img = cfg.get("e2e_images") or {}
    threads = cfg.get("threads") or "engine default"
    lines = [
        "# edgeskin bench report",
        "",
        f"{cfg['n_images']} images of the {cfg['split']} split. Drops are against the full-precision ensemble, in "
        "points; positive is worse, in every table.",
        "",
        f"- Latency: batch 1 in the bench's worker process on {cfg.get('cpu') or 'this host'} (threads: {threads}), "
        f"timed until at least {cfg.get('min_samples')} samples and {cfg.get('min_seconds')} s; n = samples; "
        "p99 only from at least 1000 samples (n/a otherwise). Model only: a preprocessed tensor through the "
        "engine. End to end: an encoded image file in memory, decoded, preprocessed, run and turned into "
        f"probabilities, as `predict` does on a device; {img.get('n')} real {img.get('format') or ''} images of "
        f"the bench split, {img.get('resolution')} px, {img.get('mean_kb') or 0:.0f} KB on average.",
        "- The ensemble and the FP32 student are timed exported to ONNX Runtime FP32, like the bundles."
        if not cfg.get("device_mode") else
        "- Device mode (reference predictions from a file): the ensemble and student rows carry no latency here; "
        "what the build machine measured is in report.json under `build_machine_latency`.",
        "- \"proxy\": a jetson bundle run by ONNX Runtime on this host (no TensorRT here). Its accuracy stands; "
        "its latency is not a Jetson's, so it is not shown or plotted.",
        f"- Melanoma sensitivity @spec: at the threshold on P(mel) giving {100 * cfg['specificity']:.0f}% "
        f"specificity, fitted per row on {cfg.get('thresholds_fitted_on', 'val')} and applied to this split. "
        "Malignant = P(mel)+P(bcc)+P(akiec) ≥ 0.5.",
        "- FORCED: a bundle written past its compile budget.",
        "",
        "| " + " | ".join(summary_columns()) + " |",
        "|" + "---|" * len(summary_columns()),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in summary_cells(r)) + " |" for r in rows]
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        codes = list(ok[0]["per_class_recall"])
        lines += ["", "## Per-class recall (%) and its drop vs the ensemble (points, positive = worse)", "",
                  "| row | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
        for r in ok:
            cells = [f"{_pct(r['per_class_recall'][c])} ({_pts(r['per_class_recall_drop_vs_ensemble'][c])})"
                     for c in codes]
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
        lines += ["", "## Uncertainty", "",
                  "Paired bootstrap (1000 resamples) of the drop in points (positive = worse), 95% interval; "
                  "McNemar's exact test on top-1 correctness (b: right before, wrong now; c: the reverse).", "",
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
              + ", ".join(f"{k} drop ≤ {b[k]}" for k in ("top1", "balanced", "mel_recall") if b.get(k) is not None)
              + (f", p90 end-to-end latency ≤ {b['max_latency_ms']} ms" if b.get("max_latency_ms") is not None else ""),
              ""]
    ungated = [r["row"] for r in rows if r.get("kind") == "bundle" and not r.get("gated", True)]
    if ungated:
        lines += [f"Not gated (shown for comparison): {', '.join(ungated)}.", ""]
    failed = [r for r in rows if r.get("status") == "failed"]
    lines += [f"- FAILED: {r['row']}: {r.get('error', '')}" for r in failed]
    lines += [f"- BREACH: {m}" for m in report.breaches] or (["- every bundle within budget" if any(
        b.get(k) is not None for k in ("top1", "balanced", "mel_recall", "max_latency_ms")) else "- no budget set"]
        if not failed else [])
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
    # host-proxy rows are not a device's latency: left out of the plot
    timed = [r for r in ok if not r.get("host_proxy") and (r.get("latency_e2e") or r.get("latency_batch1"))]
    if timed:
        fig, ax = plt.subplots(figsize=(9, 5))
        markers = "osD^v<>pPX*h"
        for i, r in enumerate(timed):
            x, yv = (r.get("latency_e2e") or r["latency_batch1"])["p50_ms"], 100 * r["balanced_accuracy"]
            ax.scatter([x], [yv], s=45, marker=markers[i % len(markers)], label=r["row"])
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end batch-1 latency p50 (ms, log scale)")
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
        ax.set_ylabel("recall drop vs the ensemble (points, positive = worse)")
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
