"""What the benchmark scripts share: where the shared data and reference model are, the best
reference member (by validation balanced accuracy), the committed calibration set, and a test
split evaluated through the runtime."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
REF = SHARED / "models" / "ham10000-r50x3-112"


#: the ResNet50 student distilled from REF by benchmarks/distill_reference.py (same split as REF)
STUDENT = HERE.parent / "runs" / "distill" / "resnet50"


def default_model() -> Path:
    """The reference model the target benchmarks compile: the distilled ResNet50 student if it
    exists, else the shared reference ensemble (whose best member is then picked)."""
    return Path(os.path.relpath(STUDENT)) if (STUDENT / "student.json").is_file() else REF


def data_arg(ap: argparse.ArgumentParser) -> None:
    """--data: $EDGESKIN_DATA, else the shared HAM10000 folder."""
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGESKIN_DATA", SHARED / "data" / "ham10000")))


def student_run_args(ap: argparse.ArgumentParser) -> None:
    """--run (a main-job output folder), --model (default RUN/student), --split (default
    RUN/split.csv) and --data: the INT8 studies of one student."""
    ap.add_argument("--run", type=Path, default=Path("runs/quick"))
    ap.add_argument("--model", type=Path, help="a student directory (default: RUN/student)")
    ap.add_argument("--split", type=Path, help="default: RUN/split.csv")
    data_arg(ap)


def model_args(ap: argparse.ArgumentParser) -> None:
    """--data, --model, --member, --split, --calib with the shared defaults."""
    data_arg(ap)
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--member", default=None)
    ap.add_argument("--split", type=Path, default=REF / "split.csv")
    ap.add_argument("--calib", type=Path, default=None)


def best_reference_member(model: Path, member: str | None = None) -> str | None:
    """``member``, else the reference layout's member with the best validation balanced accuracy."""
    if member is not None or not (model / "config.json").is_file():
        return member
    cfg = json.loads((model / "config.json").read_text())
    from edgeskin.metrics import best_member

    return best_member({Path(m["file"]).stem: float(m["best_val_balanced_accuracy"]) for m in cfg["members"]})


def training_halves(model: Path, split_path: Path, data: Path, *, member: str | None = None,
                    threads: int = 2) -> tuple[Any, Any, Any, Any]:
    """(prepared FP32 model, its training images, calibration half, measurement half): the INT8
    studies (int8_noise.py, int8_outliers.py) draw calibration images from one fixed half of the
    training split and measure on the other, so no image is both and the test split is not read."""
    import numpy as np

    from edgeskin.data import load_dataset, load_eval_set, read_split
    from edgeskin.targets.prepare import prepare

    ds = load_dataset(data)
    split = read_split(split_path)
    prep = prepare(model, member=member, dataset=ds, split=split, opset=17, threads=threads)
    _, xt, _ = load_eval_set(split.apply(ds, "train"), prep.preprocess, prep.labels, what="training")
    perm = np.random.default_rng(12345).permutation(len(xt))
    return prep, xt, perm[: len(perm) // 2], perm[len(perm) // 2 :]


def heldout_study(a: argparse.Namespace) -> tuple[Any, ...]:
    """What the held-out INT8 studies (qat_heldout.py, int8_ranges.py) start from, given the
    options of :func:`student_run_args` plus ``--member`` and ``--threads``: (model directory,
    prepared FP32 model, training images, calibration half, measurement half, the FP32 ONNX graph,
    the image sets measured (``train_heldout`` and ``val``) and a :class:`MarginProbe` of their FP32
    logits)."""
    import onnx
    import torch

    torch.set_num_threads(a.threads)
    model = a.model or a.run / "student"
    prep, xt, pool, held = training_halves(model, a.split or a.run / "split.csv", a.data, member=a.member,
                                           threads=a.threads)
    base = onnx.load(prep.onnx_path)
    sets = {"train_heldout": xt[held], "val": prep.val_inputs}
    probe = MarginProbe({k: ort_logits(base.SerializeToString(), x, threads=a.threads) for k, x in sets.items()})
    return model, prep, xt, pool, held, base, sets, probe


def ort_logits(model_bytes: bytes, x: Any, *, threads: int = 2) -> Any:
    """A graph's logits for ``x`` through edgeskin's ONNX Runtime backend, 64 images at a time."""
    import numpy as np

    from edgeskin.runtime.backends import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(model_bytes, threads=threads)
    return np.concatenate([b.run(x[i : i + 64]) for i in range(0, len(x), 64)])


def litert_logits(model_bytes: bytes, x: Any, *, threads: int = 2) -> Any:
    """A LiteRT model's outputs for ``x`` through edgeskin's LiteRT backend (batch 1 models: it runs
    the images one by one)."""
    import numpy as np

    from edgeskin.runtime.backends import LiteRTBackend

    b = LiteRTBackend(model_bytes, threads=threads)
    return np.concatenate([b.run(x[i : i + 64]) for i in range(0, len(x), 64)])


class MarginProbe:
    """FP32 logits of named image sets, against which INT8 logits of the same images are read as
    flipped top-1 decisions and as the change in the gap between the FP32 top two classes (the
    noise that flips near-ties): int8_noise.py and qat_heldout.py."""

    def __init__(self, ref: dict[str, Any]) -> None:
        import numpy as np

        self.ref = ref
        self.top2 = {k: np.argsort(-r, axis=1)[:, :2] for k, r in ref.items()}
        self.gap0 = {k: self.gap(k, r) for k, r in ref.items()}

    def gap(self, k: str, lg: Any) -> Any:
        """Logit of the FP32 top class minus that of the FP32 runner-up, in ``lg``."""
        import numpy as np

        i = np.arange(len(lg))
        return lg[i, self.top2[k][:, 0]] - lg[i, self.top2[k][:, 1]]

    def change(self, k: str, lg: Any) -> tuple[int, Any, float, float]:
        """(flipped decisions, the gap's change per image, its standard deviation, its robust
        standard deviation: 1.4826 x the median absolute deviation)."""
        import numpy as np

        d = self.gap(k, lg) - self.gap0[k]
        robust = float(1.4826 * np.median(np.abs(d - np.median(d))))
        return int(np.sum(lg.argmax(1) != self.ref[k].argmax(1))), d, float(np.std(d)), robust


def recipe_ptq_options(estimator: str) -> Any:
    """The quick recipe's post-training settings the INT8 studies hold fixed: first convolution and
    classifier in float, no bias correction; only the activation range estimator varies."""
    from edgeskin.quantize import QuantizeOptions

    return QuantizeOptions(first_conv_float=True, bias_correction="none", range_estimator=estimator)


def calibration_file(calib: Path | None) -> Path:
    """``calib``, else the committed 512-image training calibration set."""
    return calib or sorted((HERE.parent / "calibration").glob("train-512-seed0-*.json"))[0]


def test_predictions(bundles: dict[str, Path], ds: Any, split: Any, *, threads: int = 2) -> tuple[Any, ...]:
    """(predictors, test inputs, labels, probabilities per bundle) on the test split."""
    import numpy as np

    from edgeskin.data import decode_dataset, eval_tensors
    from edgeskin.runtime import load

    preds = {p: load(b, threads=threads) for p, b in bundles.items()}
    first = next(iter(preds.values()))
    pre = first.preprocess_config
    test, arrays = decode_dataset(split.apply(ds, "test"), pre)
    x = eval_tensors(arrays, pre)
    codes = first.labels
    y = np.array([codes.index(s.dx) for s in test.samples])
    probs = {p: np.concatenate([pr.probabilities(x[i : i + 32]) for i in range(0, len(x), 32)])
             for p, pr in preds.items()}
    return preds, x, y, probs


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal, as the result tables print it."""
    return f"{100 * v:.1f}"


def metric_cells(m: dict[str, Any]) -> str:
    """``top-1 | top-2 | top-3 | balanced acc. | mel recall | ECE`` cells of one result-table row."""
    return (f"{pct(m['top1'])} | {pct(m['top2'])} | {pct(m['top3'])} | {pct(m['balanced_accuracy'])} | "
            f"{pct(m['mel_sensitivity'])} | {m['ece']:.3f}")


def load_inputs(args: argparse.Namespace) -> tuple[Any, ...]:
    """What a target benchmark reads: (member, calibration file, calibration set, data set, split);
    also creates ``args.out``."""
    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split

    calib = calibration_file(args.calib)
    args.out.mkdir(parents=True, exist_ok=True)
    return (best_reference_member(args.model, args.member), calib, read_calibration_set(calib),
            load_dataset(args.data), read_split(args.split))


def run_or_render(name: str, main: Any, markdown: Any) -> None:
    """``SCRIPT --render`` re-renders results/NAME.md from the committed NAME.json; otherwise runs."""
    import sys

    if sys.argv[1:2] == ["--render"]:
        rec = json.loads((HERE / "results" / f"{name}.json").read_text())
        (HERE / "results" / f"{name}.md").write_text(markdown(rec))
    else:
        main()
