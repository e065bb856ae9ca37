"""The light device runtime: load a bundle, predict on images. numpy + Pillow + one engine.

Never imports torch, onnx, nncf or the compile-side packages; each engine is imported lazily
by its backend.

    from edgeskin.runtime import load
    predictor = load("model.edgeskin")
    result = predictor.predict("lesion.jpg", top_k=3)
    print(result.top)   # [("mel", 0.71), ("nv", 0.18), ("bkl", 0.05)]
"""

from .predictor import Prediction, Predictor, load, selftest, SelftestResult

__all__ = ["Prediction", "Predictor", "load", "selftest", "SelftestResult"]
