"""Standard TFLite model metadata: labels and input normalisation inside the ``.tflite`` file,
where a phone app that reads LiteRT/TFLite metadata (Task Library, MediaPipe, Android Studio's
model binding) finds them without edgeskin's manifest.

The layout is tflite-support's: a ``ModelMetadata`` flatbuffer (file identifier ``M001``)
stored as a model buffer referenced by a ``TFLITE_METADATA`` entry of ``Model.metadata``, and the
label file appended to the model as a zip archive. Normalisation is in 0-255 pixel units
(``(pixel - mean) / std``). flatbuffers + numpy + stdlib; the model's own schema comes from
ai-edge-litert, the metadata schema is tflite-support's generated code (vendored).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, require

METADATA_NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class TfliteMetadata:
    name: str
    description: str
    version: str
    min_parser_version: str
    input_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_min: tuple[float, ...]
    input_max: tuple[float, ...]
    output_name: str
    label_file: str | None
    labels: tuple[str, ...]


def _schema() -> Any:
    from ._vendor import tflite_metadata_schema

    return tflite_metadata_schema


def _model_schema() -> Any:
    require("ai_edge_litert", extra="tflite", purpose="editing a .tflite model")
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def build_metadata(*, labels: Sequence[str], mean: Sequence[float], std: Sequence[float], size: int,
                   name: str, description: str, version: str, input_is_float: bool,
                   input_name: str = "image", output_name: str = "probability") -> bytes:
    """The ``ModelMetadata`` flatbuffer of an image classifier (tflite-support's image-classifier
    layout: RGB image input with NormalizationOptions and Stats, output with axis labels)."""
    import flatbuffers

    md = _schema()
    inp = md.TensorMetadataT()
    inp.name = input_name
    inp.description = f"RGB image, {size}x{size}, normalised as (pixel - mean) / std per channel (0-255 units)"
    inp.content = md.ContentT()
    inp.content.contentPropertiesType = md.ContentProperties.ImageProperties
    props = md.ImagePropertiesT()
    props.colorSpace = md.ColorSpaceType.RGB
    props.defaultSize = md.ImageSizeT()
    props.defaultSize.width = props.defaultSize.height = int(size)
    inp.content.contentProperties = props
    norm = md.NormalizationOptionsT()
    norm.mean, norm.std = [float(v) for v in mean], [float(v) for v in std]
    unit = md.ProcessUnitT()
    unit.optionsType = md.ProcessUnitOptions.NormalizationOptions
    unit.options = norm
    inp.processUnits = [unit]
    stats = md.StatsT()
    if input_is_float:
        stats.min = [float((0.0 - m) / s) for m, s in zip(mean, std)]
        stats.max = [float((255.0 - m) / s) for m, s in zip(mean, std)]
    else:
        stats.min, stats.max = [0.0], [255.0]
    inp.stats = stats

    out = md.TensorMetadataT()
    out.name = output_name
    out.description = "Class scores, in the order of the label file"
    out.content = md.ContentT()
    out.content.contentPropertiesType = md.ContentProperties.FeatureProperties
    out.content.contentProperties = md.FeaturePropertiesT()
    lab = md.AssociatedFileT()
    lab.name = LABELS_FILE
    lab.description = "Class codes, one per line, in output order"
    lab.type = md.AssociatedFileType.TENSOR_AXIS_LABELS
    out.associatedFiles = [lab]
    out_stats = md.StatsT()
    out_stats.min, out_stats.max = [0.0], [1.0]
    out.stats = out_stats

    sub = md.SubGraphMetadataT()
    sub.inputTensorMetadata = [inp]
    sub.outputTensorMetadata = [out]
    model = md.ModelMetadataT()
    model.name = name
    model.description = description
    model.version = version
    model.subgraphMetadata = [sub]
    model.author = "edgeskin"
    model.minParserVersion = "1.0.0"  # tensor-level normalisation + axis labels need nothing newer
    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), file_identifier=b"M001")
    return bytes(b.Output())


def add_metadata(model: bytes, metadata: bytes, labels: Sequence[str]) -> bytes:
    """Return ``model`` with ``metadata`` as its ``TFLITE_METADATA`` buffer (replacing one that is
    there) and the label file appended as a zip archive."""
    schema = _model_schema()
    raw = _strip_zip(model)
    m = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    for b_ in m.buffers or []:
        # some writers keep constants after the flatbuffer (offset/size); repacking would drop that
        # tail, so bring those buffers inline first
        if (b_.offset or 0) > 1:
            b_.data = np.frombuffer(raw[b_.offset : b_.offset + b_.size], dtype=np.uint8)
            b_.offset, b_.size = 0, 0
    buf = schema.BufferT()
    buf.data = np.frombuffer(metadata, dtype=np.uint8)
    m.buffers = list(m.buffers or []) + [buf]
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(m.buffers) - 1
    m.metadata = [e for e in (m.metadata or []) if _s(e.name) != METADATA_NAME] + [entry]
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    out = io.BytesIO(bytes(b.Output()))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as z:
        z.writestr(LABELS_FILE, "\n".join(labels) + "\n")
    return out.getvalue()


def _strip_zip(model: bytes) -> bytes:
    """The flatbuffer part of a model that may already carry appended files."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as z:
            first = min((i.header_offset for i in z.infolist()), default=len(model))
            return model[:first]
    except zipfile.BadZipFile:
        return model


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v or "")


def read_metadata(model: bytes) -> TfliteMetadata:
    """Read the metadata the way a metadata-aware app does: the ``TFLITE_METADATA`` buffer, the
    input's NormalizationOptions, and the output's axis-label file from the appended zip."""
    schema = _model_schema()
    md = _schema()
    m = schema.Model.GetRootAs(bytearray(model), 0)
    buffer_index = None
    for i in range(m.MetadataLength()):
        if _s(m.Metadata(i).Name()) == METADATA_NAME:
            buffer_index = m.Metadata(i).Buffer()
    if buffer_index is None:
        raise ConfigError("the model carries no TFLITE_METADATA", "re-compile it with edgeskin")
    raw = m.Buffers(buffer_index).DataAsNumpy().tobytes()
    if not md.ModelMetadata.ModelMetadataBufferHasIdentifier(raw, 0):
        raise ConfigError("the TFLITE_METADATA buffer is not a ModelMetadata flatbuffer", "re-compile it")
    meta = md.ModelMetadataT.InitFromPackedBuf(bytearray(raw), 0)
    sub = meta.subgraphMetadata[0]
    inp, out = sub.inputTensorMetadata[0], sub.outputTensorMetadata[0]
    norm = next(u.options for u in (inp.processUnits or [])
                if u.optionsType == md.ProcessUnitOptions.NormalizationOptions)
    label_file = next((_s(f.name) for f in (out.associatedFiles or [])
                       if f.type == md.AssociatedFileType.TENSOR_AXIS_LABELS), None)
    labels: tuple[str, ...] = ()
    if label_file:
        with zipfile.ZipFile(io.BytesIO(model)) as z:
            labels = tuple(line for line in z.read(label_file).decode().splitlines() if line)
    return TfliteMetadata(
        name=_s(meta.name), description=_s(meta.description), version=_s(meta.version),
        min_parser_version=_s(meta.minParserVersion), input_name=_s(inp.name),
        mean=tuple(float(v) for v in norm.mean), std=tuple(float(v) for v in norm.std),
        input_min=tuple(float(v) for v in inp.stats.min), input_max=tuple(float(v) for v in inp.stats.max),
        output_name=_s(out.name), label_file=label_file, labels=labels,
    )
