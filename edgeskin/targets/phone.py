"""What an app developer needs to feed a phone bundle as edgeskin does, and MediaPipe's
``ImageClassifier`` run exactly as an app runs it (for the checks and the benchmark).

:func:`preprocessing_advice` is light (stdlib only): ``edgeskin bundle show`` prints it.
:func:`mediapipe_scores` needs the ``phone`` extra (mediapipe).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

DOC = "docs/phone.md"


def centre_roi(width: int, height: int, *, size: int, resize: int) -> tuple[float, float, float, float]:
    """edgeskin's crop as a normalised region of interest (left, top, right, bottom) of a
    ``width`` x ``height`` image: resizing the shorter side to ``resize`` and cutting the centre
    ``size`` x ``size`` keeps the centre square whose side is ``size / resize`` of the shorter side."""
    side = min(width, height) * size / resize
    w, h = side / width, side / height
    return ((1 - w) / 2, (1 - h) / 2, (1 + w) / 2, (1 + h) / 2)


def preprocessing_advice(manifest: Any) -> str | None:
    """For a phone (tflite) bundle's manifest: how an app feeds the model as edgeskin does (the
    input it takes, the centre crop or region of interest, the output it gives), with the cost of
    skipping the crop when the bundle measured it. None for other targets."""
    if getattr(manifest, "target", None) != "tflite":
        return None
    spec, out = manifest.input, manifest.output
    conv = (manifest.provenance or {}).get("conversion", {})
    input_type = conv.get("input_type", "normalized")  # bundles made before the option: normalised input
    frac = spec.size / spec.resize
    lines = []
    if input_type == "uint8":
        lines.append(f"Input: {spec.layout} uint8 RGB {spec.size}x{spec.size}, pixels 0-255; the model normalises "
                     "them itself (MediaPipe ImageClassifier and LiteRT apps feed it as it is).")
    else:
        q = f", then quantize with scale {spec.scale:g} and zero point {spec.zero_point}" if spec.scale else ""
        lines.append(f"Input: {spec.layout} {spec.dtype} {spec.size}x{spec.size}, normalised per channel "
                     f"(mean {list(spec.mean)}, std {list(spec.std)} on pixels 0-{spec.input_range:g}){q}; a custom pipeline's form, "
                     "MediaPipe cannot feed it.")
    lines.append("Output: " + ("float32 probabilities (softmax is inside the model)." if out.get("kind") == "probs"
                               else "logits: apply softmax to get probabilities."))
    lines.append(f"Crop like edgeskin: take the centre square whose side is {frac:.3f} of the image's shorter side "
                 f"and resize it to {spec.size}x{spec.size} (in MediaPipe: a centre region of interest; or crop "
                 f"before classifying). Resizing the whole image squeezes it out of shape.")
    check = (manifest.extra or {}).get("app_preprocessing")
    if check and check.get("n"):
        lines.append(f"Measured on {check['n']} validation images: the whole-image resize agrees with the centre crop "
                     f"on {100 * check['top1_agreement']:.1f} % of top-1 classes and loses "
                     f"{check['balanced_accuracy_drop_points']:.1f} points of balanced accuracy.")
    lines.append(f"Kotlin and Swift snippets: {DOC}.")
    return "\n".join(lines)


def mediapipe_scores(model_path: str | os.PathLike, images: Sequence[Any], *,
                     rois: Sequence[tuple[float, float, float, float] | None] | None = None) -> Any:
    """Class scores (N, classes; in the model's label order) from MediaPipe Tasks'
    ``ImageClassifier`` created from ``model_path`` alone, as an app creates it: its metadata
    says how to feed the model and name the classes. ``images``: HWC uint8 RGB arrays; ``rois``:
    an optional normalised (left, top, right, bottom) region of interest per image."""
    import numpy as np

    from ..errors import require

    mp = require("mediapipe", extra="phone", purpose="classifying with MediaPipe's ImageClassifier")
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.components.containers.rect import RectF
    from mediapipe.tasks.python.core.base_options import BaseOptions

    opts = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=os.fspath(model_path)),
                                         max_results=-1)
    rows = []
    with vision.ImageClassifier.create_from_options(opts) as clf:
        for i, img in enumerate(images):
            roi = rois[i] if rois is not None else None
            ipo = (vision.ImageProcessingOptions(region_of_interest=RectF(left=roi[0], top=roi[1], right=roi[2],
                                                                           bottom=roi[3])) if roi else None)
            res = clf.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)), ipo)
            cats = res.classifications[0].categories
            row = np.zeros(len(cats), np.float64)
            for c in cats:
                row[c.index] = c.score
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 0))


__all__ = ["centre_roi", "mediapipe_scores", "preprocessing_advice"]
