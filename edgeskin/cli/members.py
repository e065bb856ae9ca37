"""``edgeskin import``: members trained anywhere into an ensemble folder."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from .common import (
    app,
    err,
    escape_markup,
    floats,
    load_data,
    out,
    reporter,
)
from .tables import pct


@app.command("import")
def import_cmd(
    sources: List[Path] = typer.Argument(..., help="Model files: .onnx, .keras/.h5, or .pt/.pth/.safetensors with --arch."),
    output: Path = typer.Option(..., "--out", "-o", help="Ensemble folder to create, or to add to (a mixed ensemble)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="keras-resnet50 | keras-tf | torchvision | timm | edgeskin."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="A TOML file with the declaration (options below override it)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx | keras | timm | torchvision (default: from the file name)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="For a state_dict: timm:NAME or torchvision:NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Member name (default: the file's stem)."),
    size: Optional[int] = typer.Option(None, "--size", min=32, max=4096, help="Square input size the model takes."),
    resize: Optional[int] = typer.Option(None, "--resize", min=32, max=8192, help="Shorter side before the centre crop."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic | nearest."),
    layout: Optional[str] = typer.Option(None, "--layout", help="NCHW | NHWC (default: from the model)."),
    channel_order: Optional[str] = typer.Option(None, "--channel-order", help="RGB | BGR."),
    input_range: Optional[float] = typer.Option(None, "--input-range", min=1e-6, max=65535.0, help="Pixels before normalisation: 1 (0-1) or 255 (0-255)."),
    normalization: Optional[str] = typer.Option(None, "--normalization", help="meanstd | caffe | tf | none."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean (meanstd), e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std (meanstd)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="What the model outputs: logits | probs."),
    labels: Optional[str] = typer.Option(None, "--labels", help="The model's classes in output order, NAME or NAME=ourclass, comma-separated."),
    extra: Optional[List[str]] = typer.Option(None, "--extra", help="A class we do not have: NAME=drop or NAME=ourclass (merge). Repeatable."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Real images to check the members on. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file; the check uses --on of it."),
    on: str = typer.Option("val", "--on", help="Which split the check runs on."),
    check_images: int = typer.Option(64, "--check-images", min=1, help="How many images of the split the check runs."),
    label_set: str = typer.Option("ham10000", "--label-set", help="Our classes: ham10000 | binary."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the import report as JSON here."),
) -> None:
    """Import members trained anywhere (ONNX, Keras, timm, torchvision) into an ensemble folder.

    Each member is run on real images first; nothing is written unless every member passes.
    """
    from ..data import read_split
    from ..fileio import write_json
    from ..members.declare import Declaration, read_declaration
    from ..members.importer import import_members

    extras = {}
    for item in extra or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ConfigError(f"--extra {item!r} is not NAME=drop or NAME=CLASS", "e.g. --extra SCC=akiec --extra UNK=drop")
        extras[k.strip()] = v.strip()
    said = Declaration(
        preset=preset, size=size, resize=resize, interpolation=interpolation, layout=layout,
        channel_order=channel_order, input_range=input_range, normalization=normalization,
        mean=floats(mean, 3, "--mean") if mean else None, std=floats(std, 3, "--std") if std else None,
        outputs=outputs, labels=tuple(x.strip() for x in labels.split(",")) if labels else None, extra=extras,
        arch=arch, format=fmt, name=name)
    decl = said.over(read_declaration(spec)) if spec is not None else said
    ds = load_data(data, None, False)
    s = read_split(split_file) if split_file is not None else None
    res = import_members(sources, output, decl, dataset=ds, split=s, split_name=on, check_images=check_images,
                         labels=label_set, reporter=reporter())
    t = Table(title=f"imported into {res.out} (checked on {res.members[0]['images']} images of "
                    f"{on if s is not None else 'the data set'})")
    for col in ("member", "format", "top-1"):
        t.add_column(col, justify="left" if col != "top-1" else "right")
    for r in res.members:
        t.add_row(r["name"], r["format"], pct(r["accuracy"]))
    new = {r["name"] for r in res.members}
    for name, acc in (res.ensemble or {}).get("member_accuracy", {}).items():
        if name not in new:
            t.add_row(name, "(already there)", pct(acc))
    if res.ensemble is not None:
        t.add_row(f"ensemble ({len(res.ensemble['members'])} members)", "", pct(res.ensemble["accuracy"]))
    out.print(t)
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape_markup(w)}")
    if json_out is not None:
        write_json(json_out, {"out": str(res.out), "members": res.members, "ensemble": res.ensemble,
                              "warnings": res.warnings})

