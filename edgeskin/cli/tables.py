"""Tables the commands print (rich)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{100 * float(x):.1f}"


def split_table(split: Any) -> Table:
    from ..labels import HAM10000_CODES

    counts = split.counts()
    t = Table(title="Split (images per class)")
    t.add_column("split")
    for c in HAM10000_CODES:
        t.add_column(c, justify="right")
    t.add_column("images", justify="right")
    t.add_column("lesions", justify="right")
    for name, row in counts.items():
        lesions = {split.lesion_of[i] for i in split.ids(name)}
        t.add_row(name, *[str(row[c]) for c in HAM10000_CODES], str(sum(row.values())), str(len(lesions)))
    return t


def metrics_tables(reports: dict[str, dict[str, Any]], title: str) -> list[Table]:
    first = next(iter(reports.values()))
    codes = first["class_order"]
    pos = first.get("positive_class", "mel")
    t = Table(title=title)
    for col in ("model", "top-1", "top-2", "top-3", "bal.acc", f"{pos} sens", f"{pos} spec", "ECE", "n"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, r in reports.items():
        t.add_row(name, pct(r["top1"]), pct(r["top2"]), pct(r["top3"]), pct(r["balanced_accuracy"]),
                  pct(r.get(f"{pos}_sensitivity")), pct(r.get(f"{pos}_specificity")),
                  f"{float(r['ece']):.3f}", str(r["n"]))
    rc = Table(title="Per-class recall (%)")
    rc.add_column("model")
    for c in codes:
        rc.add_column(c, justify="right")
    for name, r in reports.items():
        rc.add_row(name, *[pct(r["per_class"][c]["recall"]) for c in codes])
    last_name, last = list(reports.items())[-1]
    cm = Table(title=f"Confusion matrix, {last_name} (rows: true, columns: predicted)")
    cm.add_column("true \\ pred")
    for c in codes:
        cm.add_column(c, justify="right")
    for c, row in zip(codes, last["confusion_matrix"]):
        cm.add_row(c, *map(str, row))
    pc = Table(title=f"Per-class metrics, {last_name} (%)")
    for col in ("class", "recall", "precision", "F1", "support"):
        pc.add_column(col, justify="left" if col == "class" else "right")
    for c in codes:
        m = last["per_class"][c]
        pc.add_row(c, pct(m["recall"]), pct(m["precision"]), pct(m["f1"]), str(int(m["support"] or 0)))
    return [t, rc, pc, cm]



def distill_table(r: dict[str, Any]) -> Table:
    """Student vs teacher: accuracy, melanoma sensitivity, agreement and latency per engine."""
    pos = r["teacher"].get("positive_class", "mel")
    lat = {k: v for k, v in (r.get("latency") or {}).items() if "teacher" in v}
    t = Table(title=f"Student vs teacher on the {r['split']} split ({r['n']} images)")
    cols = ["model", "top-1", "top-2", "top-3", "bal.acc", f"{pos} sens", "agreement"]
    cols += [f"{engine} p50 ms" for engine in lat]
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for who in ("teacher", "student"):
        m = r[who]
        t.add_row(who, pct(m["top1"]), pct(m["top2"]), pct(m["top3"]), pct(m["balanced_accuracy"]),
                  pct(m.get(f"{pos}_sensitivity")), "" if who == "teacher" else pct(r["top1_agreement"]),
                  *[f"{v[who]['p50_ms']:.1f}" for v in lat.values()])
    d = r["drops_points"]
    ratios = ", ".join(f"{engine} {v['student_over_teacher']:.2f}" for engine, v in lat.items())
    t.caption = (f"drops (points): top-1 {d['top1']:.2f}, balanced {d['balanced']:.2f}"
                 + (f"; student latency / teacher latency (batch 1): {ratios}" if ratios else ""))
    return t

