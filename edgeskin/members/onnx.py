"""ONNX members: a graph from any framework (torch.onnx, tf2onnx, Keras' or timm's exporter),
run in ONNX Runtime, so a teacher made of them needs no torch. On the GPU where the
``onnxruntime-gpu`` build is installed (it replaces ``onnxruntime``; never a hard dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, require
from .base import ForeignMember


def read_onnx(path: Path) -> Any:
    """Load and check an ONNX file (external data included); a clear error for anything else."""
    onnx = require("onnx", extra="compress", purpose="importing an ONNX member")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker errors vary by version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})",
                              "re-export the model to ONNX, or pass the right file") from None
    return model


def graph_io(model: Any, path: Path) -> dict[str, Any]:
    """The single image input (name, shape with None for dynamic axes, dtype) and the outputs."""
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise CheckpointError(f"{path}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)})",
                              "import a classifier that takes one image batch")
    inp = inputs[0]
    tt = inp.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(shape) != 4:
        raise CheckpointError(f"{path}: input {inp.name!r} has shape {shape}, not a 4-D image batch",
                              "import a classifier that takes (N, C, H, W) or (N, H, W, C)")
    outputs = [o.name for o in model.graph.output]
    return {"name": inp.name, "shape": shape, "elem_type": int(tt.elem_type), "outputs": outputs,
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)}


def layout_of(shape: list[int | None]) -> str | None:
    """NCHW or NHWC from a 4-D input shape (None when it does not say)."""
    if shape[1] == 3 and shape[3] != 3:
        return "NCHW"
    if shape[3] == 3 and shape[1] != 3:
        return "NHWC"
    return None


def spatial_size(shape: list[int | None], layout: str) -> tuple[int | None, int | None]:
    return (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])


def providers_for(device: Any) -> list[str]:
    """CUDA first when the device is a GPU and this onnxruntime build has it, else the CPU."""
    import onnxruntime as ort

    kind = getattr(getattr(device, "device", device), "type", str(device or "cpu"))
    if str(kind).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxMember(ForeignMember):
    """A member whose weights are one ONNX file, run in ONNX Runtime."""

    def __init__(self, config: dict[str, Any], path: Path, *, threads: int | None = None,
                 data: bytes | None = None) -> None:
        super().__init__(config, path)
        self.threads = threads
        self._data = data
        self._sessions: dict[tuple[str, ...], Any] = {}
        self.input_name = str(config["input"]["name"])
        self.output_name = config["input"].get("output")
        self.dtype = np.float16 if config["input"].get("dtype") == "float16" else np.float32
        batch = (config["input"].get("shape") or [None])[0]
        #: a graph exported with a fixed batch (often 1: torch.onnx without dynamic axes) runs in chunks of it
        self.fixed_batch = int(batch) if isinstance(batch, int) and batch > 0 else None

    def _bytes(self) -> bytes:
        if self._data is None:
            self._data = self.weights_path.read_bytes()
        return self._data

    def session(self, device: Any = None) -> Any:
        ort = require("onnxruntime", extra="runtime", purpose="running an ONNX member")
        providers = tuple(providers_for(device))
        if providers not in self._sessions:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = int(self.threads)
                opts.inter_op_num_threads = 1
            try:
                self._sessions[providers] = ort.InferenceSession(self._bytes(), opts, providers=list(providers))
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{self.weights_path}: ONNX Runtime cannot load the member ({exc})",
                                      "re-import the member from a valid ONNX file") from None
        return self._sessions[providers]

    def raw(self, x: np.ndarray, *, device: Any = None) -> np.ndarray:
        b = self.fixed_batch
        if b is not None and len(x) != b:
            if len(x) % b:
                raise ConfigError(f"{self.weights_path}: the graph takes batches of exactly {b} images",
                                  "re-export it with a dynamic batch axis")
            return np.concatenate([self.raw(x[i : i + b], device=device) for i in range(0, len(x), b)])
        sess = self.session(device)
        try:
            out = sess.run([self.output_name] if self.output_name else None, {self.input_name: x.astype(self.dtype)})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ConfigError(f"{self.weights_path}: ONNX Runtime failed on a batch of shape {x.shape} ({exc})",
                              "check the declared input size and layout (--size, --layout)") from None
        y = np.asarray(out[0])
        if y.ndim != 2:
            y = y.reshape(len(x), -1)
        return y

    def release(self) -> None:
        self._sessions = {k: v for k, v in self._sessions.items() if k == ("CPUExecutionProvider",)}


def load_onnx_member(config: dict[str, Any], path: Path) -> OnnxMember:
    return OnnxMember(config, path)


def bundle_graph(path: Path, *, outputs: str, class_map: Any, opset: int, where: str,
                 output_name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The member's graph as a bundle takes it: input ``input``, output ``logits`` over our classes
    (for a member that outputs probabilities or maps classes, ``log`` of the mapped probabilities:
    the runtime's softmax gives them back), at most ``opset`` (converted down with onnx's version
    converter where it can; refused otherwise)."""
    onnx = require("onnx", extra="compress", purpose="compiling an ONNX member")
    from onnx import helper, numpy_helper, version_converter

    model = read_onnx(path)
    io = graph_io(model, path)
    record: dict[str, Any] = {"source_opset": io["opset"], "opset": io["opset"], "converter": None}
    if io["opset"] is not None and io["opset"] > opset:
        try:
            model = version_converter.convert_version(model, opset)
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"{where}: the member's graph is opset {io['opset']} and the target takes at most opset {opset}; "
                f"onnx's version converter cannot take it down ({first})",
                f"re-export the model at opset {opset} or lower, or pick a device whose runtime takes opset "
                f"{io['opset']}") from None
        record.update({"opset": opset, "converter": f"onnx {onnx.__version__} version_converter"})
    g = model.graph
    in_name, out_name = io["name"], output_name or io["outputs"][0]

    def rename(old: str, new: str) -> None:
        for node in g.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.name == old:
                v.name = new

    if in_name != "input":
        rename(in_name, "input")
    for v in list(g.input) + list(g.output):  # a bundle takes any batch (checked by the caller)
        dims = v.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
            record["batch_made_dynamic_from"] = record.get("batch_made_dynamic_from") or int(io["shape"][0] or 0)
    keep = [o for o in g.output if o.name == out_name]
    del g.output[:]
    g.output.extend(keep)
    cmap = class_map
    if outputs == "logits" and cmap.is_identity:
        if out_name != "logits":
            rename(out_name, "logits")
        record["output"] = "the model's logits"
        return model, record
    cur = out_name
    nodes = []
    if outputs == "logits":
        nodes.append(helper.make_node("Softmax", [cur], ["edgeskin_member_probs"], axis=1))
        cur = "edgeskin_member_probs"
    inits = []
    if not cmap.is_identity:
        inits.append(numpy_helper.from_array(cmap.matrix().astype(np.float32), "edgeskin_class_map"))
        nodes.append(helper.make_node("MatMul", [cur, "edgeskin_class_map"], ["edgeskin_mapped"]))
        cur = "edgeskin_mapped"
        if cmap.renormalise:
            if record["opset"] is not None and record["opset"] >= 13:
                inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "edgeskin_axis1"))
                nodes.append(helper.make_node("ReduceSum", [cur, "edgeskin_axis1"], ["edgeskin_sum"], keepdims=1))
            else:
                nodes.append(helper.make_node("ReduceSum", [cur], ["edgeskin_sum"], axes=[1], keepdims=1))
            nodes.append(helper.make_node("Div", [cur, "edgeskin_sum"], ["edgeskin_renorm"]))
            cur = "edgeskin_renorm"
    inits.append(numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "edgeskin_tiny"))
    nodes.append(helper.make_node("Max", [cur, "edgeskin_tiny"], ["edgeskin_clipped"]))
    nodes.append(helper.make_node("Log", ["edgeskin_clipped"], ["logits"]))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", len(cmap.codes)])])
    onnx.checker.check_model(model)
    record["output"] = ("log of the member's probabilities over our classes (outputs "
                        f"{outputs}{', classes mapped' if not cmap.is_identity else ''})")
    return model, record
