"""Bundles: manifest round trip, atomic writes, folder/zip readers, tamper and schema checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _bundles import run_cli
from conftest import CODES
from edgeskin.bundle import (MANIFEST, SCHEMA_VERSION, BundleError, BundleReader, InputSpec, Manifest,
                             pack_bundle, write_bundle)
from edgeskin.preprocess import PreprocessConfig


# the shared fixture exports with torch's legacy exporter, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

@pytest.fixture()
def bundle_copy(built, tmp_path) -> Path:
    """A private copy of the (small) int8 bundle, safe to tamper with."""
    return Path(shutil.copytree(built.int8, tmp_path / "copy.edgeskin"))


def small_manifest(**kw) -> Manifest:
    base = dict(
        name="t", target="cpu", precision="int8",
        engine={"name": "onnxruntime", "format": "onnx", "opset": 17},
        input=InputSpec(size=32, resize=37, dtype="uint8", scale=0.02, zero_point=128),
        labels=CODES, model_file="model.onnx",
        provenance={"model": {"name": "m", "sha256": "ab" * 32}},
        accuracy={"top1_agreement": 0.99, "forced": False},
        golden={"file": "golden.npz", "n": 2, "tolerance": 1e-2},
        extra={"note": "x"}, created="2026-01-01T00:00:00+00:00", edgeskin_version="0.1.0",
    )
    base.update(kw)
    return Manifest(**base)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ------------------------------------------------------------------ manifest


def test_manifest_round_trip_through_json():
    m = small_manifest(files={"model.onnx": {"sha256": "00" * 32, "bytes": 3}})
    d = json.loads(json.dumps(m.to_dict()))
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["labels"] == list(CODES) and d["input"]["mean"] == [0.485, 0.456, 0.406]
    back = Manifest.from_dict(d)
    assert back == m
    assert isinstance(back.input, InputSpec) and isinstance(back.labels, tuple)
    assert back.input.scale == 0.02 and back.input.zero_point == 128 and back.input.dtype == "uint8"


def test_input_spec_matches_preprocess_config():
    pre = PreprocessConfig(size=32)
    spec = InputSpec.from_preprocess(pre)
    assert (spec.size, spec.resize, spec.layout, spec.interpolation) == (32, 37, "NCHW", "bilinear")
    assert spec.preprocess_config() == pre
    other = InputSpec.from_preprocess(PreprocessConfig(size=64, resize=80, interpolation="bicubic", layout="NHWC"))
    assert other.preprocess_config() == PreprocessConfig(size=64, resize=80, interpolation="bicubic", layout="NHWC")


def test_newer_minor_version_with_unknown_fields_is_read():
    d = small_manifest().to_dict()
    d["schema_version"] = "1.7"
    d["a_field_from_the_future"] = {"x": 1}
    m = Manifest.from_dict(d)
    assert m.schema_version == "1.7" and m.labels == CODES


@pytest.mark.parametrize("version", ["2.0", "2", "0.9"])
def test_other_schema_major_is_refused_clearly(version):
    d = small_manifest().to_dict()
    d["schema_version"] = version
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(d, "x/manifest.json")
    msg = str(e.value)
    assert f"schema {version} is not supported" in msg and "1.x" in msg and "x/manifest.json" in msg
    assert e.value.hint and "upgrade edgeskin" in e.value.hint


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("schema_version"),
    lambda d: d.__setitem__("schema_version", "one"),
    lambda d: d.pop("input"),
    lambda d: d["input"].pop("mean"),
    lambda d: d["input"].__setitem__("bogus", 1),
    lambda d: d.pop("labels"),
])
def test_malformed_manifest_dict_is_a_bundle_error(mutate):
    d = small_manifest().to_dict()
    mutate(d)
    with pytest.raises(BundleError):
        Manifest.from_dict(d)


# ------------------------------------------------------------------ write_bundle


def test_write_bundle_writes_hashes_and_leaves_no_temp(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file")
    out = tmp_path / "out" / "b.edgeskin"
    path = write_bundle(out, small_manifest(), {"model.onnx": b"model bytes", "labels.txt": src})
    assert path == out and out.is_dir()
    assert _leftovers(out.parent, {"b.edgeskin"}) == []
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", MANIFEST, "model.onnx"]
    m = json.loads((out / MANIFEST).read_text())
    assert m["files"]["model.onnx"] == {"sha256": hashlib.sha256(b"model bytes").hexdigest(), "bytes": 11}
    assert m["files"]["labels.txt"]["sha256"] == hashlib.sha256(b"from a file").hexdigest()
    r = BundleReader(out)
    assert r.verify() == ["labels.txt", "model.onnx"]
    assert r.read("labels.txt") == b"from a file"


class _ExplodingPath:
    """A file source that fails while the bundle is being written (after other files)."""

    def __fspath__(self) -> str:
        raise RuntimeError("disk went away")


def test_write_bundle_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "b.edgeskin"
    files = {"model.onnx": b"x" * 1000, "labels.txt": b"a\n", "golden.npz": _ExplodingPath()}
    with pytest.raises(RuntimeError, match="disk went away"):
        write_bundle(out, small_manifest(), files)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_bundle_missing_source_file_leaves_nothing_behind(tmp_path):
    out = tmp_path / "b.edgeskin"
    with pytest.raises(FileNotFoundError):
        write_bundle(out, small_manifest(), {"model.onnx": b"x", "labels.txt": tmp_path / "nope.txt"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["sub/model.onnx", MANIFEST])
def test_write_bundle_refuses_bad_file_names(tmp_path, bad):
    with pytest.raises(BundleError, match="invalid bundle file name"):
        write_bundle(tmp_path / "b.edgeskin", small_manifest(), {"model.onnx": b"x", bad: b"y"})
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tmp_path):
    out = tmp_path / "b.edgeskin"
    write_bundle(out, small_manifest(name="old"), {"model.onnx": b"old", "old-only.txt": b"o"})
    with pytest.raises(BundleError, match="already exists") as e:
        write_bundle(out, small_manifest(name="new"), {"model.onnx": b"new"})
    assert "--overwrite" in (e.value.hint or "")
    assert BundleReader(out).manifest.name == "old" and (out / "model.onnx").read_bytes() == b"old"

    # a failed overwrite keeps the old bundle intact
    with pytest.raises(RuntimeError):
        write_bundle(out, small_manifest(name="new"), {"model.onnx": _ExplodingPath()}, overwrite=True)
    assert BundleReader(out).manifest.name == "old" and BundleReader(out).verify() == ["model.onnx", "old-only.txt"]

    write_bundle(out, small_manifest(name="new"), {"model.onnx": b"new"}, overwrite=True)
    r = BundleReader(out)
    assert r.manifest.name == "new" and r.read("model.onnx") == b"new"
    assert not (out / "old-only.txt").exists()  # replaced, not merged
    assert _leftovers(tmp_path, {"b.edgeskin"}) == []


# ------------------------------------------------------------------ readers


def test_reader_on_compiled_folder(built):
    r = BundleReader(built.int8)
    assert r.manifest.target == "cpu" and r.manifest.precision == "int8"
    assert r.verify() == ["golden.npz", "labels.txt", "model.onnx"]
    assert r.read("labels.txt").decode().split() == list(CODES)
    g = r.golden()
    assert g is not None and g["inputs"].shape == (8, 3, 32, 32) and g["probs"].shape == (8, 7)
    assert len(g["ids"]) == 8


def test_pack_and_read_zip(built, tmp_path):
    z = pack_bundle(built.int8, tmp_path / "int8.edgeskin.zip")
    assert z.is_file() and _leftovers(tmp_path, {"int8.edgeskin.zip"}) == []
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == sorted(f"int8.edgeskin/{n}" for n in
                                               ["manifest.json", "model.onnx", "labels.txt", "golden.npz"])
    folder, zipped = BundleReader(built.int8), BundleReader(z)
    try:
        assert zipped.manifest == folder.manifest
        assert zipped.verify() == folder.verify()
        assert zipped.read("model.onnx") == folder.read("model.onnx")
        np.testing.assert_array_equal(zipped.golden()["probs"], folder.golden()["probs"])
    finally:
        zipped.close()


def test_default_pack_name(bundle_copy):
    z = pack_bundle(bundle_copy)
    assert z == bundle_copy.with_name("copy.edgeskin.zip") and z.is_file()


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.onnx", "golden.npz", "labels.txt"])
def test_tampered_file_is_refused_naming_it(bundle_copy, name):
    _flip_byte(bundle_copy / name)
    r = BundleReader(bundle_copy)  # the manifest itself is fine
    with pytest.raises(BundleError) as e:
        r.verify()
    assert name in e.value.message and "modified" in e.value.message
    with pytest.raises(BundleError, match=name):
        r.read(name)


def test_tampered_model_is_refused_by_the_runtime(bundle_copy):
    from edgeskin.runtime import load

    _flip_byte(bundle_copy / "model.onnx", offset=100)
    with pytest.raises(BundleError, match="model.onnx"):
        load(bundle_copy)


def test_tampered_golden_is_refused_by_golden(bundle_copy):
    _flip_byte(bundle_copy / "golden.npz")
    with pytest.raises(BundleError, match="golden.npz"):
        BundleReader(bundle_copy).golden()


def test_tampered_zip_member_is_refused(bundle_copy, tmp_path):
    z = tmp_path / "t.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(bundle_copy.iterdir()):
            data = p.read_bytes()
            if p.name == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            zf.writestr(f"copy.edgeskin/{p.name}", data)
    with pytest.raises(BundleError, match="model.onnx"):
        BundleReader(z).verify()


def test_missing_listed_file(bundle_copy):
    (bundle_copy / "labels.txt").unlink()
    with pytest.raises(BundleError, match="labels.txt.*missing|missing.*labels.txt"):
        BundleReader(bundle_copy).verify()


def test_pack_refuses_a_tampered_folder(bundle_copy, tmp_path):
    _flip_byte(bundle_copy / "golden.npz")
    with pytest.raises(BundleError, match="golden.npz"):
        pack_bundle(bundle_copy, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["copy.edgeskin"]


def test_schema_major_2_on_disk_is_refused(bundle_copy):
    mpath = bundle_copy / MANIFEST
    d = json.loads(mpath.read_text())
    d["schema_version"] = "2.0"
    mpath.write_text(json.dumps(d))
    with pytest.raises(BundleError) as e:
        BundleReader(bundle_copy)
    assert "schema 2.0 is not supported" in e.value.message and str(mpath) in e.value.message


def test_missing_manifest(tmp_path):
    (tmp_path / "empty.edgeskin").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        BundleReader(tmp_path / "empty.edgeskin")


def test_zip_without_manifest(tmp_path):
    z = tmp_path / "x.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x/model.onnx", b"abc")
    with pytest.raises(BundleError, match="no manifest.json in this zip"):
        BundleReader(z)


def test_non_bundle_paths(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(BundleError, match="not a bundle folder or zip"):
        BundleReader(f)
    with pytest.raises(BundleError, match="not found"):
        BundleReader(tmp_path / "missing.edgeskin")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "malformed manifest"),
    ('"a string"', "malformed manifest"),
    ('{"schema_version": "1.0"}', "malformed manifest"),
    ('{"name": "x"}', "schema_version"),
])
def test_malformed_manifest_on_disk(tmp_path, text, match):
    d = tmp_path / "b.edgeskin"
    d.mkdir()
    (d / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=match):
        BundleReader(d)


def test_model_file_must_be_hashed(tmp_path):
    out = write_bundle(tmp_path / "b.edgeskin", small_manifest(model_file="other.onnx"), {"model.onnx": b"x"})
    with pytest.raises(BundleError, match="other.onnx is not hashed"):
        BundleReader(out).verify()



@pytest.mark.parametrize("name", ["../outside.txt", "sub/x", ".."])
def test_manifest_cannot_point_outside_the_bundle(tmp_path, name):
    (tmp_path / "outside.txt").write_text("secret")
    out = write_bundle(tmp_path / "b.edgeskin", small_manifest(), {"model.onnx": b"x"})
    mpath = out / MANIFEST
    d = json.loads(mpath.read_text())
    d["files"][name] = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    mpath.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="invalid file name"):
        BundleReader(out).verify()


# ------------------------------------------------------------------ CLI


def test_cli_verify_good_and_tampered(built, bundle_copy):
    r = run_cli("bundle", "verify", str(built.int8))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "3 files verified" in r.stdout and "cpu/int8" in r.stdout

    _flip_byte(bundle_copy / "model.onnx", offset=200)
    r = run_cli("bundle", "verify", str(bundle_copy))
    assert r.returncode == 2
    assert "error:" in r.stderr and "model.onnx" in r.stderr and "modified" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_verify_malformed_manifest_is_a_clean_error(tmp_path):
    d = tmp_path / "b.edgeskin"
    d.mkdir()
    (d / MANIFEST).write_text("[]")
    r = run_cli("bundle", "verify", str(d))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_bundle_show_summarises_the_compile_check_with_intervals_and_warnings(tmp_path, capsys):
    from edgeskin.cli.bundle import bundle_show

    check = {"n": 384, "top1_agreement": 0.9922, "passed": True, "forced": False, "failures": [],
             "drops_points": {"top1": 0.26, "balanced": 0.4, "mel_recall": None},
             "intervals": {"level": 0.95, "top1_agreement": [0.9832, 0.9964],
                           "drops_points": {"top1": [-0.26, 0.78], "balanced": [-1.1, 1.9], "mel_recall": None}},
             "warnings": ["balanced budget 1.5 points < one flipped image (1.59 points; smallest class df: 9 images)"]}
    path = write_bundle(tmp_path / "b.edgeskin", small_manifest(accuracy=check), {"model.onnx": b"m"})
    bundle_show(path)
    err = " ".join(capsys.readouterr().err.split())  # the console wraps at its width
    assert ("within budget: vs FP32 on validation, agreement 99.2% [98.3, 99.6] of 384 images; drop (points, "
            "95% interval): top1 0.26 [-0.26, 0.78], balanced 0.40 [-1.10, 1.90]") in err
    assert "warning: validation split small for the compile budget: balanced budget 1.5 points < one flipped" in err
    # a bundle without the record says nothing about it
    bundle_show(write_bundle(tmp_path / "c.edgeskin", small_manifest(accuracy={}), {"model.onnx": b"m"}))
    err = capsys.readouterr().err
    assert "within budget" not in err and "warning" not in err
