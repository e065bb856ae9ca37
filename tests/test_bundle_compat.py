"""The bundle schema's compatibility policy (docs/compatibility.md), as the runtime applies it: any
1.x manifest reads; another major, or an input field this runtime does not know, is refused with the
manifest's path, the edgeskin that wrote it, and the fix."""

from __future__ import annotations

import json

import pytest

from edgeskin import __version__
from edgeskin.bundle import MANIFEST, SCHEMA_VERSION, SUPPORTED_MAJOR, BundleError, BundleReader, InputSpec, Manifest

CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _manifest(**changes) -> dict:
    m = Manifest(name="m", target="cpu", precision="fp32", engine={"name": "onnxruntime"},
                 input=InputSpec(size=32, resize=37), labels=CODES, model_file="model.onnx",
                 edgeskin_version="0.1.0")
    d = m.to_dict()
    d.update(changes)
    return d


def test_this_release_writes_the_major_it_reads():
    assert int(SCHEMA_VERSION.split(".")[0]) == SUPPORTED_MAJOR


def test_a_newer_minor_reads_and_its_unknown_top_level_fields_are_ignored():
    m = Manifest.from_dict(_manifest(schema_version=f"{SUPPORTED_MAJOR}.9", provenance_v2={"x": 1}))
    assert m.schema_version == f"{SUPPORTED_MAJOR}.9" and m.labels == CODES


def test_a_newer_major_names_the_file_the_writer_and_the_fix(tmp_path):
    b = tmp_path / "m.edgeskin"
    b.mkdir()
    newer = f"{SUPPORTED_MAJOR + 1}.0"
    (b / MANIFEST).write_text(json.dumps(_manifest(schema_version=newer, edgeskin_version="9.0.0")))
    with pytest.raises(BundleError) as e:
        BundleReader(b)
    msg = e.value.message
    assert str(b / MANIFEST) in msg and f"schema {newer} is not supported" in msg
    assert "written by edgeskin 9.0.0" in msg and f"this is edgeskin {__version__}" in msg
    assert f"reads schema {SUPPORTED_MAJOR + 1}.x" in e.value.hint and "docs/compatibility.md" in e.value.hint


def test_an_unknown_input_field_is_refused_not_ignored(tmp_path):
    d = _manifest(schema_version=f"{SUPPORTED_MAJOR}.3", edgeskin_version="0.4.0")
    d["input"]["gamma"] = 2.2  # a newer writer's preprocessing step this runtime cannot apply
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(d, "b/manifest.json")
    msg = e.value.message
    assert msg.startswith("b/manifest.json:") and "'gamma'" in msg and "written by edgeskin 0.4.0" in msg
    assert e.value.hint.startswith("upgrade edgeskin on this device")
