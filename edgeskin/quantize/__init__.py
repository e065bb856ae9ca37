"""INT8 post-training quantization of ONNX models with NNCF (ONNX backend; no torch needed)."""

from .fallback import activation_pairs, float_fallback, remove_pairs
from .nncf_int8 import AUTO_ESTIMATORS, QuantizeOptions, quantize_onnx

__all__ = ["AUTO_ESTIMATORS", "QuantizeOptions", "quantize_onnx", "activation_pairs", "float_fallback", "remove_pairs"]
