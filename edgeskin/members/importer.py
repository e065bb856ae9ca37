"""``edgeskin import``: members trained anywhere become members of an edgeskin ensemble folder.

Each source is read, its declared preprocessing resolved (preset <- the model's own input shape or
timm's pretrained_cfg <- the declaration), its classes mapped onto ours, and the member is run on
real images before anything is written: NaN or constant outputs, probabilities that do not sum to
1 after the declared output transform, a declared size that differs from the model's own, and
class lists that do not map are refused. Members are staged in a temporary folder and moved into
place only when every one of them passed.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data import Dataset, Split, write_split
from ..errors import CheckpointError, ConfigError
from ..fileio import sha256_file, write_json
from ..labels import LabelSet, get_label_set
from ..progress import NullReporter, Reporter
from .base import MEMBER_FORMAT, MEMBER_FORMAT_VERSION, build_class_map, display
from .declare import Declaration, preprocess_from

FORMATS = ("onnx", "keras", "timm", "torchvision")
_SUFFIX = {".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".hdf5": "keras"}
_STATE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")

#: a member whose swapped channel order is this much more accurate is probably declared wrong
SWAP_WARN_POINTS = 10.0
SUM_TOLERANCE = 1e-3
_DECLARED = ("size", "resize", "crop_fraction", "interpolation", "layout", "channel_order", "input_range",
             "normalization", "mean", "std", "outputs")


@dataclass
class Staged:
    name: str
    source: Path
    format: str
    files: list[Path]  # in the staging folder, weights first, manifest last
    config: dict[str, Any]
    member: Any
    keras_model: Any = None


@dataclass
class ImportResult:
    out: Path
    members: list[dict[str, Any]]
    ensemble: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


def detect_format(path: Path, decl: Declaration) -> str:
    if decl.format is not None:
        if decl.format not in FORMATS:
            raise ConfigError(f"unknown --format {decl.format!r}", f"choose one of: {', '.join(FORMATS)}")
        return decl.format
    if path.suffix.lower() in _SUFFIX:
        return _SUFFIX[path.suffix.lower()]
    if path.suffix.lower() in _STATE_SUFFIXES:
        if decl.arch is None:
            raise ConfigError(f"{path}: a state_dict needs its architecture",
                              "pass --arch timm:NAME or --arch torchvision:NAME (e.g. --arch timm:resnet50)")
        from .torchnet import split_arch

        return split_arch(decl.arch)[0]
    raise ConfigError(f"{path}: cannot tell the model format from the name",
                      "pass --format onnx|keras|timm|torchvision")


def _member_name(path: Path, decl: Declaration, n_sources: int) -> str:
    if decl.name and n_sources > 1:
        raise ConfigError("--name names one member, but several files were given", "import them one at a time")
    name = decl.name or path.name.split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"member name {name!r} is not a plain file name", "pass --name with letters, digits, _ . -")
    return name


def _check_size(declared: int | None, own: tuple[int | None, int | None], where: Path) -> int | None:
    h, w = own
    if h is not None and w is not None and h != w:
        raise CheckpointError(f"{where}: the model takes {h}x{w} images; edgeskin feeds square crops",
                              "export the model with a square input")
    if declared is not None and h is not None and declared != h:
        raise ConfigError(f"{where}: mismatched input size: declared {declared} but the model's own input is {h}x{w}",
                          f"declare --size {h} (or re-export the model at {declared})")
    return h


def _stage_onnx(src: Path, name: str, decl: Declaration, stage: Path, *, onnx_model: Any = None,
                own_layout: str | None = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    from .onnx import graph_io, layout_of, read_onnx, spatial_size

    model = onnx_model if onnx_model is not None else read_onnx(src)
    io = graph_io(model, src)
    layout = own_layout or layout_of(io["shape"])
    said = decl.resolved().get("layout") if decl.layout is not None else None
    if said is not None and layout is not None and said != layout:
        raise ConfigError(f"{src}: declared layout {said} but the model's input {io['name']!r} has shape {io['shape']}",
                          f"declare --layout {layout}")
    defaults: dict[str, Any] = {}
    if layout is not None:
        defaults["layout"] = layout
    lay = layout or decl.resolved().get("layout") or "NCHW"
    own = _check_size(decl.size, spatial_size(io["shape"], lay), src)
    if own is not None:
        defaults["size"] = own
    if io["elem_type"] not in (1, 10):  # FLOAT, FLOAT16
        raise CheckpointError(f"{src}: input {io['name']!r} is not a float tensor (ONNX type {io['elem_type']})",
                              "import a model that takes float images")
    import onnx

    dest = stage / f"{name}.onnx"
    external = onnx_model is None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(
        str(src), load_external_data=False).graph.initializer)
    if onnx_model is None and not external:
        shutil.copyfile(src, dest)  # the file as it is: its sha256 is the source's
    else:
        onnx.save_model(model, str(dest))  # weights beside the graph (external data) go into one file
    inp = {"name": io["name"], "shape": io["shape"], "dtype": "float16" if io["elem_type"] == 10 else "float32",
           "output": io["outputs"][0], "opset": io["opset"]}
    return dest, defaults, inp


def _stage(src: Path, fmt: str, name: str, decl: Declaration, stage: Path, labels: LabelSet) -> Staged:
    if not src.is_file():
        raise ConfigError(f"{src}: file not found", "check the path")
    if src.stat().st_size == 0:
        raise CheckpointError(f"{src}: the file is empty", "re-copy or re-export the model")
    if fmt in ("onnx", "keras") and decl.preset is None and decl.normalization is None:
        raise ConfigError(f"{src}: how the model expects its input is not declared",
                          "pass --preset keras-resnet50 | keras-tf | torchvision | timm | edgeskin, or declare "
                          "--normalization (and --channel-order, --input-range, --mean/--std) yourself")
    if fmt == "torchvision" and decl.preset is None:
        decl = replace(decl, preset="torchvision")  # torchvision's own recipe, unless declared otherwise
    config: dict[str, Any] = {"format": MEMBER_FORMAT, "format_version": MEMBER_FORMAT_VERSION, "name": name}
    keras_model = None
    model_obj = None
    conversion: dict[str, Any] | None = None
    if fmt == "onnx":
        weights, defaults, inp = _stage_onnx(src, name, decl, stage)
        runner, arch = "onnx", "onnx"
    elif fmt == "keras":
        from . import keras as kmod

        keras_model = kmod.load_keras(src)
        shape = kmod.input_shape(keras_model)
        if len(shape) != 4 or shape[-1] != 3:
            raise CheckpointError(f"{src}: the model's input shape is {shape}, not (N, H, W, 3)",
                                  "import a channels-last image classifier")
        own = _check_size(decl.size, (shape[1], shape[2]), src)
        size = own or decl.resolved().get("size")
        if size is None:
            raise ConfigError(f"{src}: the model takes any input size", "declare the size it was trained at: --size N")
        onnx_tmp = stage / f"{name}.onnx"
        kmod.export_onnx(keras_model, onnx_tmp, int(size))
        from .onnx import read_onnx

        weights, defaults, inp = _stage_onnx(src, name, decl, stage, onnx_model=read_onnx(onnx_tmp),
                                             own_layout="NHWC")
        runner, arch = "onnx", "onnx"
        conversion = {"to": "onnx", "by": f"keras {__import__('keras').__version__} model.export (torch backend)"}
    else:
        from . import torchnet

        arch = decl.arch or ""
        factory, _ = torchnet.split_arch(arch)
        state = torchnet.read_state(src)
        names, _ = decl.rename_and_classes()
        two_d = [k for k, v in state.items() if k.endswith(".weight") and len(v.shape) == 2]
        k = len(names) if names is not None else (int(state[two_d[-1]].shape[0]) if two_d else labels.num_classes)
        model_obj = torchnet.build(f"{factory}:{arch.split(':', 1)[-1]}", k)
        renames = torchnet.fit_state(model_obj, state, src)
        defaults = torchnet.timm_preprocess(model_obj) if factory == "timm" else {}
        if factory == "timm" and decl.size is not None and decl.size != defaults["size"]:
            defaults.pop("size")  # a timm CNN takes any size; the declared one is what it was trained at
        weights = stage / f"{name}{src.suffix.lower()}"
        shutil.copyfile(src, weights)
        inp = {"name": "input", "shape": [None, 3, None, None], "dtype": "float32"}
        runner, arch = "torch", f"{factory}:{arch.split(':', 1)[-1]}"
        config["head_renames"] = renames
        if factory == "timm":
            config["pretrained_cfg"] = {k: v for k, v in (getattr(model_obj, "pretrained_cfg", None) or {}).items()
                                        if isinstance(v, (str, int, float, list, tuple, bool, type(None)))}
    values = decl.resolved(defaults)
    pre = preprocess_from(values, where=str(src))
    config.update({
        "runner": runner, "arch": arch, "weights": weights.name, "sha256": sha256_file(weights),
        "source": {"format": fmt, "file": src.name, "sha256": sha256_file(src), **({"conversion": conversion}
                                                                                    if conversion else {})},
        "input": {**inp, "layout": pre.layout, "size": pre.size},
        "preprocess": pre.to_dict(),
        # where each number came from: the preset, the model itself (its input shape, timm's
        # pretrained_cfg), or what the user declared (options or --spec)
        "declaration": {"preset": decl.preset,
                        "from_model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()},
                        "declared": {k: (list(v) if isinstance(v, tuple) else v) for k in _DECLARED
                                     if (v := getattr(decl, k)) is not None},
                        "labels": list(decl.labels) if decl.labels else None, "extra": dict(decl.extra)},
        "outputs": values.get("outputs") or "logits",
        "labels": labels.to_dict(),
        "num_classes": labels.num_classes,
    })
    return Staged(name, src, fmt, [weights], config, model_obj, keras_model)


def _finish_member(st: Staged, decl: Declaration, labels: LabelSet, stage: Path, n_outputs: int) -> Any:
    """Map the classes (now that the output count is known) and build the member object."""
    names, rename = decl.rename_and_classes()
    if names is None:
        if n_outputs != labels.num_classes:
            raise ConfigError(f"{st.source}: the model has {n_outputs} outputs, we have {labels.num_classes} classes",
                              "pass the model's class names in output order with --labels (and --extra for classes "
                              "we do not have)")
        names = list(labels.codes)
    if len(names) != n_outputs:
        raise ConfigError(f"{st.source}: --labels lists {len(names)} classes but the model has {n_outputs} outputs",
                          "list every output of the model, in its order")
    cmap = build_class_map(names, labels, rename=rename, extra=decl.extra, where=str(st.source))
    st.config["class_map"] = cmap.to_dict()
    meta = stage / f"{st.name}.json"
    if st.config["runner"] == "onnx":
        from .onnx import OnnxMember

        return OnnxMember(st.config, meta)
    from .torchnet import TorchNetMember

    return TorchNetMember(st.config, meta, model=st.member)


def _check_subset(dataset: Dataset, split: Split | None, split_name: str, n: int) -> Dataset:
    subset = split.apply(dataset, split_name) if split is not None else dataset
    if len(subset) == 0:
        raise ConfigError(f"no images in the {split_name} split to check the members on",
                          "pass --data with images (and --split, --on)")
    idx = sorted(set(np.linspace(0, len(subset) - 1, min(n, len(subset))).round().astype(int).tolist()))
    return replace(subset, samples=[subset.samples[i] for i in idx])


def _acc(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p.argmax(1) == y)) if len(y) else float("nan")


def check_member(member: Any, raw_probs: np.ndarray, y: np.ndarray, where: str) -> dict[str, Any]:
    """Refuse NaN, constant outputs and probabilities that do not sum to 1; return the check record."""
    if not np.all(np.isfinite(raw_probs)):
        bad = int(np.sum(~np.all(np.isfinite(raw_probs), axis=1)))
        raise CheckpointError(f"{where}: the model gives NaN or infinite outputs on {bad} of {len(raw_probs)} "
                              "real images", "the model or its export is broken; check it in its own framework")
    sums = raw_probs.sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0))) if len(sums) else 0.0
    if worst > SUM_TOLERANCE:
        fix = ("declare --outputs logits (the model outputs logits)" if member.outputs == "probs"
               else "the model's outputs are not logits of one softmax; check the output you exported")
        raise CheckpointError(f"{where}: probabilities after the declared output transform ({member.outputs}) "
                              f"do not sum to 1 (off by up to {worst:.3g})", fix)
    spread = float(np.max(raw_probs.std(axis=0))) if len(raw_probs) > 1 else 1.0
    if spread < 1e-6:
        raise CheckpointError(f"{where}: the model gives the same output for every image ({len(raw_probs)} real "
                              "images checked)", "the model ignores its input: a wrong file, a broken export or "
                              "an untrained network")
    return {"images": int(len(raw_probs)), "finite": True, "max_sum_error": worst, "max_output_std": spread}


def import_members(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    decl: Declaration,
    *,
    dataset: Dataset,
    split: Split | None = None,
    split_name: str = "val",
    check_images: int = 64,
    labels: str = "ham10000",
    reporter: Reporter | None = None,
) -> ImportResult:
    """Import ``sources`` into the ensemble folder ``out`` (created, or added to: a folder of
    edgeskin checkpoints becomes a mixed ensemble). Nothing is written unless every member passes."""
    from .loader import load_members
    from .run import eval_inputs, member_probs

    reporter = reporter or NullReporter()
    out = Path(out)
    label_set = get_label_set(labels)
    if not sources:
        raise ConfigError("nothing to import", "pass one or more model files")
    existing: list[Any] = []
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a folder", "pass an ensemble folder for --out")
        if _has_members(out):
            existing = load_members(out)
            if list(existing[0].labels.codes) != list(label_set.codes):
                raise ConfigError(f"{out}: its members use classes {list(existing[0].labels.codes)}",
                                  f"import with --label-set {existing[0].labels.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    warnings: list[str] = []
    try:
        staged: list[Staged] = []
        names = {m.name for m in existing}
        for src in map(Path, sources):
            fmt = detect_format(src, decl)
            name = _member_name(src, decl, len(sources))
            if name in names or (out / f"{name}.json").exists():
                raise ConfigError(f"{out}: already has a member named {name!r}", "pass --name NEW_NAME")
            names.add(name)
            reporter.message(f"reading {display(src)} ({fmt})")
            staged.append(_stage(src, fmt, name, decl, stage, label_set))

        subset = _check_subset(dataset, split, split_name, check_images)
        pres = [_pre_of(st) for st in staged]
        _, inputs, y = eval_inputs(subset, pres + [m.preprocess for m in existing], label_set,
                                      what="check", reporter=reporter)
        records: list[dict[str, Any]] = []
        new_members = []
        for st, pre in zip(staged, pres):
            x = inputs[pre]
            where = display(st.source)
            raw = _raw_outputs(st, x, where)
            member = _finish_member(st, decl, label_set, stage, raw.shape[1])
            own = member.member_probs(x)
            check = check_member(member, own, y, where)
            probs = member.class_map.apply(own)
            check["accuracy"] = _acc(probs, y)
            check["split"] = split_name if split is not None else "all"
            other = "BGR" if pre.channel_order == "RGB" else "RGB"
            swapped_pre = replace(pre, channel_order=other)
            _, swapped_inputs, _ = eval_inputs(subset, [swapped_pre], label_set, what="check")
            swapped = _acc(member.probs(swapped_inputs[swapped_pre]), y)
            check["accuracy_channels_swapped"] = {other: swapped}
            if 100 * (swapped - check["accuracy"]) >= SWAP_WARN_POINTS:
                msg = (f"{where}: accuracy with the declared channel order {pre.channel_order} is "
                       f"{100 * check['accuracy']:.1f}% but {100 * swapped:.1f}% with {other} on the same "
                       f"{len(y)} images: the declared preprocessing is probably wrong (try --channel-order {other})")
                warnings.append(msg)
                check["warning"] = msg
            if st.keras_model is not None:
                from .keras import predict

                ref = predict(st.keras_model, x)
                diff = float(np.max(np.abs(ref - raw))) if len(x) else 0.0
                st.config["source"]["conversion"].update({"max_abs_diff_vs_keras_predict": diff,
                                                          "checked_images": int(len(x))})
                if diff > 1e-3:
                    raise CheckpointError(f"{where}: the ONNX conversion differs from Keras' own predict by {diff:.3g}",
                                          "export the model to ONNX yourself and import the .onnx")
            st.config["check"] = check
            st.config["imported"] = {"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                     "from": str(st.source)}
            records.append({"name": st.name, "format": st.format, "accuracy": check["accuracy"],
                            "images": check["images"], "check": check})
            new_members.append(member)
            reporter.message(f"{st.name}: {len(y)} images, accuracy {100 * check['accuracy']:.1f}%")
        everyone = existing + new_members
        ensemble = None
        if len(everyone) > 1:
            ps = member_probs(existing, inputs)
            ps.update({m.name: m.probs(inputs[m.preprocess]) for m in new_members})
            ens = np.mean([ps[m.name] for m in everyone], axis=0)
            ensemble = {"members": [m.name for m in everyone], "accuracy": _acc(ens, y), "images": int(len(y)),
                        "member_accuracy": {k: _acc(v, y) for k, v in ps.items()}}
        for st in staged:
            meta = stage / f"{st.name}.json"
            write_json(meta, st.config)
            st.files.append(meta)
            clash = [f.name for f in st.files if (out / f.name).exists()]
            if clash:
                raise ConfigError(f"{out}: already holds {', '.join(clash)}", "pass --name NEW_NAME")
        _commit(stage, out, staged, split, existing)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ImportResult(out, records, ensemble, warnings)


def _pre_of(st: Staged) -> Any:
    from ..preprocess import PreprocessConfig

    return PreprocessConfig.from_dict(st.config["preprocess"])


def _raw_outputs(st: Staged, x: np.ndarray, where: str) -> np.ndarray:
    """The model's raw outputs on the check images (to count its outputs before mapping)."""
    probe = dict(st.config)
    probe["class_map"] = {"member_classes": ["?"], "targets": [None]}
    meta = Path(st.files[0]).with_suffix(".json")
    if st.config["runner"] == "onnx":
        from .onnx import OnnxMember

        m: Any = OnnxMember({**probe, "class_map": {"member_classes": [], "targets": []}}, meta)
    else:
        from .torchnet import TorchNetMember

        m = TorchNetMember({**probe, "class_map": {"member_classes": [], "targets": []}}, meta, model=st.member)
    outs = [np.asarray(m.raw(np.ascontiguousarray(x[s : s + 16])), dtype=np.float64) for s in range(0, len(x), 16)]
    y = np.concatenate(outs)
    if y.ndim != 2 or y.shape[0] != len(x):
        raise CheckpointError(f"{where}: the model's output has shape {y.shape}, not (images, classes)",
                              "import a classifier whose first output is (N, classes)")
    return y


def _has_members(folder: Path) -> bool:
    from .loader import CHECKPOINT_FORMAT, _read_json

    for meta in folder.glob("*.json"):
        head = _read_json(meta)
        if isinstance(head, dict) and head.get("format") in (CHECKPOINT_FORMAT, MEMBER_FORMAT):
            return True
    return (folder / "config.json").is_file() and any(folder.glob("member*.pt"))


def _commit(stage: Path, out: Path, staged: list[Staged], split: Split | None, existing: list[Any]) -> None:
    if split is not None and not (out / "split.csv").exists():
        write_split(split, stage / "split.csv")  # evaluate and compile find it by default
    if not out.exists():
        os.replace(stage, out)  # a new ensemble appears whole
        return
    if (stage / "split.csv").exists():
        os.replace(stage / "split.csv", out / "split.csv")
    for st in staged:  # weights first, the manifest (which makes it a member) last
        for f in st.files:
            os.replace(f, out / f.name)
