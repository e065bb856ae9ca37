"""TFLite model metadata for phone bundles, written with MediaPipe's maintained metadata writer.

What an app's metadata-aware client (MediaPipe Tasks' ``ImageClassifier``, or LiteRT Support)
reads from ``model.tflite``: the image input (its normalisation, if the app must apply one),
the labels as an associated ``labels.txt``, and what the output holds. The metadata claims only
what is true of the model:

- ``uint8`` input (pixels 0-255, normalisation inside the model): no normalisation options,
  stats 0-255. MediaPipe feeds the pixels as they are.
- ``normalized`` float input: the per-channel mean/std (in 0-255 pixel units) the app must
  apply. MediaPipe refuses per-channel values ("Per-channel image normalization is not
  available"); that form is for custom pipelines.
- ``normalized`` int8 input: the same mean/std, and the description says the normalised values
  must then be quantized with the input tensor's own scale and zero point.
- ``probabilities`` output: a classification tensor with stats 0-1 (MediaPipe's scores).
- ``logits`` output: the same labels, no 0-1 stats, and a description saying softmax is the app's.

Needs ``mediapipe`` (the ``phone`` extra). mediapipe 1.2.2's wheel lacks the compiled
``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version`` that its own
``metadata.py`` imports (so ``metadata_writers`` cannot be imported as shipped); when it is
missing, :func:`_writer_modules` provides that one function, a port of MediaPipe's
``GetMinimumMetadataParserVersion`` (mediapipe/tasks/cc/metadata/metadata_version.cc), and the
maintained writer does the rest.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any, Sequence

import numpy as np

from ..errors import require

#: version of each schema member added after metadata 1.0.0 (metadata_version.cc, GetMemberVersion)
_MEMBER_VERSION = {"vocabulary_file": (1, 0, 1), "subgraph_process_units": (1, 1, 0), "bert": (1, 1, 0),
                   "sentencepiece": (1, 1, 0), "tensor_groups": (1, 2, 0), "regex": (1, 2, 1),
                   "audio": (1, 3, 0), "scann_file": (1, 4, 0), "file_version": (1, 4, 1)}
_PYWRAP = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def minimum_parser_version(metadata_buf: bytes) -> str:
    """The oldest metadata parser that reads ``metadata_buf`` (a ModelMetadata flatbuffer): the
    largest version among the schema members it uses, as MediaPipe's C++ computes it."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    md = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(bytes(metadata_buf), 0))
    used: set[str] = set()
    opts = {fb.ProcessUnitOptions.BertTokenizerOptions: "bert",
            fb.ProcessUnitOptions.SentencePieceTokenizerOptions: "sentencepiece",
            fb.ProcessUnitOptions.RegexTokenizerOptions: "regex"}

    def files(fs: Any) -> None:
        for f in fs or ():
            if f.type == fb.AssociatedFileType.VOCABULARY:
                used.add("vocabulary_file")
            if f.type == fb.AssociatedFileType.SCANN_INDEX_FILE:
                used.add("scann_file")
            if f.version is not None:
                used.add("file_version")

    def units(us: Any) -> None:
        for u in us or ():
            if u.optionsType in opts:
                used.add(opts[u.optionsType])

    for sg in md.subgraphMetadata or ():
        for t in (sg.inputTensorMetadata or []) + (sg.outputTensorMetadata or []):
            files(t.associatedFiles)
            units(t.processUnits)
            if t.content is not None and t.content.contentPropertiesType == fb.ContentProperties.AudioProperties:
                used.add("audio")
        files(sg.associatedFiles)
        for pu in (sg.inputProcessUnits, sg.outputProcessUnits):
            if pu is not None:
                used.add("subgraph_process_units")
                units(pu)
        if sg.inputTensorGroups is not None or sg.outputTensorGroups is not None:
            used.add("tensor_groups")
    files(md.associatedFiles)
    return ".".join(map(str, max([(1, 0, 0)] + [_MEMBER_VERSION[u] for u in used])))


def _writer_modules() -> tuple[Any, Any, Any]:
    """(metadata_writer, metadata_info, metadata) from mediapipe, importable as installed."""
    require("mediapipe", extra="phone", purpose="writing MediaPipe-readable metadata into phone bundles")
    try:
        __import__(_PYWRAP)
    except ImportError:  # mediapipe 1.2.2's wheel: see the module docstring
        parts = _PYWRAP.split(".")
        for i in range(3, len(parts)):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        shim = types.ModuleType(_PYWRAP)
        shim.GetMinimumMetadataParserVersion = minimum_parser_version  # type: ignore[attr-defined]
        shim.__doc__ = "edgeskin's port of MediaPipe's metadata_version.cc (the wheel lacks the compiled one)"
        sys.modules[_PYWRAP] = shim
    from mediapipe.tasks.python.metadata import metadata
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, metadata_writer

    return metadata_writer, metadata_info, metadata


def _inline_buffers(model: bytes) -> bytes:
    """``model`` with every constant buffer inside the flatbuffer. Converters may store large
    buffers after the flatbuffer, addressed by offset (ai-edge-quantizer's fp16 output does);
    the metadata populator re-packs the flatbuffer, which would leave those offsets pointing at
    the wrong bytes, so they are pulled in first. A model without such buffers is unchanged."""
    import flatbuffers
    from mediapipe.tasks.metadata import schema_py_generated as schema

    m = schema.Model.GetRootAsModel(model, 0)
    if not any(m.Buffers(i).Offset() > 1 for i in range(m.BuffersLength())):
        return model
    t = schema.ModelT.InitFromObj(m)
    for b in t.buffers or ():
        if b.offset > 1:
            b.data = np.frombuffer(model, np.uint8, count=b.size, offset=b.offset)
            b.offset = b.size = 0
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_metadata(model: bytes, *, labels: Sequence[str], name: str, description: str, input_type: str,
                   output_kind: str, mean255: Sequence[float], std255: Sequence[float]) -> bytes:
    """``model`` with metadata and ``labels.txt`` packed in (MediaPipe's writer and populator).

    ``input_type``: ``uint8`` (pixels 0-255, normalisation inside the model) or ``normalized``
    (the app applies ``(pixel - mean255) / std255`` per channel, and quantizes with the tensor's
    own parameters when the tensor is integer). ``output_kind``: ``probabilities`` or ``logits``.
    """
    mw, _, _ = _writer_modules()
    model = _inline_buffers(model)
    w = mw.MetadataWriter.create(bytearray(model))
    w.add_general_info(name, description)
    from mediapipe.tasks.metadata import schema_py_generated as schema
    from mediapipe.tasks.python.metadata.metadata_writers import writer_utils

    in_type = writer_utils.get_input_tensor_types(bytearray(model))[0]

    if input_type == "uint8":
        w.add_image_input(None, None, name="image",  # type: ignore[arg-type]
                          description="RGB image, pixels 0-255 (uint8); the model normalises them itself.")
    else:
        quantized = in_type in (schema.TensorType.INT8, schema.TensorType.UINT8)
        text = ("RGB image normalised per channel, (pixel - mean) / std with pixels 0-255"
                + ("; then quantized with this tensor's own scale and zero point." if quantized else "."))
        # (for an int8 tensor the writer records no min/max stats: none would be true in pixel units)
        w.add_image_input(list(map(float, mean255)), list(map(float, std255)), name="image", description=text)
    labels_md = mw.Labels().add(list(labels))
    if output_kind == "probabilities":
        w.add_classification_output(labels_md, name="probabilities",
                                    description="Class probabilities (softmax inside the model), one per label.")
    else:
        w.add_classification_output(labels_md, name="logits",
                                    description="Class logits (not probabilities: apply softmax), one per label.")
        # the writer gives a float32 classification tensor stats 0-1; logits have no such range
        w._output_mds[-1].min_values = w._output_mds[-1].max_values = None
    out, _ = w.populate()
    del w  # its temporary folder goes now, not at interpreter exit
    return bytes(out)


def read_metadata(model: bytes) -> dict[str, Any]:
    """The metadata as MediaPipe's displayer reads it back: its JSON, plus the packed files."""
    _, _, metadata = _writer_modules()
    d = metadata.MetadataDisplayer.with_model_buffer(bytearray(model))
    out = json.loads(d.get_metadata_json())
    out["packed_files"] = {n: d.get_associated_file_buffer(n) for n in d.get_packed_associated_file_list()}
    return out


__all__ = ["minimum_parser_version", "read_metadata", "write_metadata"]
