"""Data-set readers (HAM10000, ISIC 2018 Task 3, folder per class), label sets and splits."""

from __future__ import annotations

import csv
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CODES

from edgeskin.data import (
    SPLITS,
    Dataset,
    Sample,
    decode_dataset,
    load_dataset,
    make_split,
    read_folder,
    read_ham10000,
    read_isic2018,
    read_split,
    write_split,
)
from edgeskin.errors import ConfigError, DataError, ImageError
from edgeskin.labels import BINARY, HAM10000, HAM10000_CODES, get_label_set
from edgeskin.preprocess import PreprocessConfig

FRACTIONS = (0.7, 0.1, 0.2)


# --------------------------------------------------------------------------- helpers


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _write_rows(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _meta(root: Path) -> Path:
    return root / "HAM10000_metadata.csv"


def _image_path(root: Path, image_id: str) -> Path:
    hits = sorted(root.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
    assert len(hits) == 1, hits
    return hits[0]


def _lesion_splits(split) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for image_id, name in split.assignment.items():
        out[split.lesion_of[image_id]].add(name)
    return out


def _synthetic(seed: int = 0, *, mixed: int = 0) -> Dataset:
    """7 classes with 20-200 lesions each, 1-3 images per lesion (paths need not exist).

    ``mixed`` lesions get images with two different diagnoses (majority first).
    """
    rng = np.random.default_rng(seed)
    counts = [20, 37, 55, 81, 113, 150, 200]
    samples: list[Sample] = []
    n = 0
    for ci, dx in enumerate(CODES):
        for li in range(counts[ci]):
            lesion = f"L{ci}_{li:04d}"
            for _ in range(int(rng.integers(1, 4))):
                samples.append(Sample(f"IMG_{n:06d}", lesion, dx, f"/nonexistent/IMG_{n:06d}.jpg"))
                n += 1
    for mi in range(mixed):
        lesion = f"MIX_{mi:03d}"
        dxs = [CODES[mi % 7], CODES[mi % 7], CODES[(mi + 3) % 7]]
        for dx in dxs:
            samples.append(Sample(f"IMG_{n:06d}", lesion, dx, f"/nonexistent/IMG_{n:06d}.jpg"))
            n += 1
    order = rng.permutation(len(samples))  # lesions' images interleaved, as in real metadata
    return Dataset([samples[i] for i in order], "synthetic", "ham10000")


# --------------------------------------------------------------------------- label sets


def test_binary_label_set() -> None:
    assert BINARY.codes == ("benign", "malignant")
    for dx in ("mel", "bcc", "akiec", "MEL", " bcc "):
        assert BINARY.encode(dx) == 1
    for dx in ("nv", "bkl", "df", "vasc"):
        assert BINARY.encode(dx) == 0
    assert BINARY.positive == "malignant"
    assert get_label_set("Binary") is BINARY
    with pytest.raises(ConfigError):
        BINARY.encode("xyz")


def test_ham10000_label_set() -> None:
    assert HAM10000.codes == CODES
    assert [HAM10000.encode(c) for c in CODES] == list(range(7))
    assert HAM10000.positive == "mel"
    with pytest.raises(ConfigError):
        HAM10000.encode("xyz")
    with pytest.raises(ConfigError):
        HAM10000.encode("")
    with pytest.raises(ConfigError):
        get_label_set("ham9999")


# --------------------------------------------------------------------------- HAM10000 reader


def test_ham10000_finds_images_in_both_parts(tiny_ham: Path) -> None:
    ds = read_ham10000(_meta(tiny_ham))
    _, rows = _read_rows(_meta(tiny_ham))
    assert len(ds) == len(rows) == 7 * 4 * 2
    assert ds.layout == "ham10000" and ds.lesion_grouped and ds.skipped == []
    parents = Counter(Path(s.path).parent.name for s in ds.samples)
    assert parents == {"HAM10000_images_part_1": 28, "HAM10000_images_part_2": 28}
    for s, row in zip(ds.samples, rows):
        assert Path(s.path).is_file()
        assert Path(s.path).stem == s.image_id == row["image_id"]
        assert s.lesion_id == row["lesion_id"] and s.dx == row["dx"]
    assert ds.class_counts() == {c: 8 for c in CODES}


def test_ham10000_explicit_image_dirs(tiny_ham: Path) -> None:
    part1 = tiny_ham / "HAM10000_images_part_1"
    with pytest.raises(DataError):  # half of the images are in part 2
        read_ham10000(_meta(tiny_ham), [part1])
    ds = read_ham10000(_meta(tiny_ham), [part1], skip_bad=True)
    assert len(ds) == 28 and len(ds.skipped) == 28
    with pytest.raises(DataError, match="image folder not found"):
        read_ham10000(_meta(tiny_ham), [tiny_ham / "nope"])


def test_ham10000_keeps_metadata_order(tiny_ham: Path) -> None:
    fields, rows = _read_rows(_meta(tiny_ham))
    order = np.random.default_rng(5).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    _write_rows(_meta(tiny_ham), fields, shuffled)
    ds = read_ham10000(_meta(tiny_ham))
    assert [s.image_id for s in ds.samples] == [r["image_id"] for r in shuffled]
    assert [s.image_id for s in ds.samples] != sorted(s.image_id for s in ds.samples)


def _assert_names_line(err: DataError, meta: Path, line: int) -> None:
    assert f"{meta}:{line}:" in str(err)


def test_ham10000_missing_image(tiny_ham: Path) -> None:
    _, rows = _read_rows(_meta(tiny_ham))
    victim = rows[9]["image_id"]
    _image_path(tiny_ham, victim).unlink()
    with pytest.raises(DataError) as ei:
        read_ham10000(_meta(tiny_ham))
    _assert_names_line(ei.value, _meta(tiny_ham), 11)  # header is line 1, rows[0] is line 2
    assert victim in str(ei.value)
    ds = read_ham10000(_meta(tiny_ham), skip_bad=True)
    assert len(ds) == len(rows) - 1
    assert victim not in ds.by_id()
    assert len(ds.skipped) == 1
    assert ds.skipped[0].where == f"{_meta(tiny_ham)}:11" and victim in ds.skipped[0].reason


def test_ham10000_unknown_label(tiny_ham: Path) -> None:
    fields, rows = _read_rows(_meta(tiny_ham))
    rows[3]["dx"] = "xyz"
    _write_rows(_meta(tiny_ham), fields, rows)
    with pytest.raises(DataError) as ei:
        load_dataset(tiny_ham)
    _assert_names_line(ei.value, _meta(tiny_ham), 5)
    assert "xyz" in str(ei.value)
    ds = load_dataset(tiny_ham, skip_bad=True)
    assert len(ds) == len(rows) - 1 and rows[3]["image_id"] not in ds.by_id()
    assert [s.where for s in ds.skipped] == [f"{_meta(tiny_ham)}:5"]
    assert "xyz" in ds.skipped[0].reason


def test_ham10000_labels_are_normalised(tiny_ham: Path) -> None:
    fields, rows = _read_rows(_meta(tiny_ham))
    rows[0]["dx"] = " MEL "
    _write_rows(_meta(tiny_ham), fields, rows)
    ds = read_ham10000(_meta(tiny_ham))
    assert ds.samples[0].dx == "mel"


def test_ham10000_duplicate_row(tiny_ham: Path) -> None:
    fields, rows = _read_rows(_meta(tiny_ham))
    dup = dict(rows[2])
    rows.insert(6, dup)  # file line 8
    _write_rows(_meta(tiny_ham), fields, rows)
    with pytest.raises(DataError) as ei:
        read_ham10000(_meta(tiny_ham))
    _assert_names_line(ei.value, _meta(tiny_ham), 8)
    assert dup["image_id"] in str(ei.value) and "line 4" in str(ei.value)
    ds = read_ham10000(_meta(tiny_ham), skip_bad=True)
    assert len(ds) == len(rows) - 1
    assert [s.image_id for s in ds.samples].count(dup["image_id"]) == 1
    assert [s.where for s in ds.skipped] == [f"{_meta(tiny_ham)}:8"]


def test_ham10000_duplicate_image_file_in_two_folders(tiny_ham: Path) -> None:
    _, rows = _read_rows(_meta(tiny_ham))
    image_id = rows[0]["image_id"]
    original = _image_path(tiny_ham, image_id)
    other = "HAM10000_images_part_2" if original.parent.name.endswith("_1") else "HAM10000_images_part_1"
    copy = tiny_ham / other / original.name
    shutil.copyfile(original, copy)
    with pytest.raises(DataError) as ei:
        load_dataset(tiny_ham)
    msg = str(ei.value)
    assert image_id in msg and (str(copy) in msg or str(original) in msg)
    ds = load_dataset(tiny_ham, skip_bad=True)
    assert len(ds) == len(rows)  # the image itself is kept once
    assert [s.image_id for s in ds.samples].count(image_id) == 1
    assert len(ds.skipped) == 1
    assert ds.skipped[0].where in (str(copy), str(original))
    assert ds.by_id()[image_id].path != ds.skipped[0].where


def test_ham10000_missing_columns_and_missing_file(tmp_path: Path, tiny_ham: Path) -> None:
    bad = tmp_path / "meta.csv"
    bad.write_text("lesion_id,image,dx\nHAM_1,ISIC_1,mel\n")
    with pytest.raises(DataError) as ei:
        read_ham10000(bad, [tiny_ham / "HAM10000_images_part_1"])
    assert str(bad) in str(ei.value)
    with pytest.raises(DataError) as ei:
        read_ham10000(tmp_path / "nope.csv")
    assert "nope.csv" in str(ei.value)


def test_ham10000_all_rows_bad_is_an_error(tiny_ham: Path) -> None:
    for p in tiny_ham.glob("HAM10000_images_part_*/*.jpg"):
        p.unlink()
    with pytest.raises(DataError, match="no usable images"):
        read_ham10000(_meta(tiny_ham), skip_bad=True)


# --------------------------------------------------------------------------- decoding


def test_decode_dataset_corrupt_image(tiny_ham: Path) -> None:
    pre = PreprocessConfig(size=32, resize=32)
    ds = read_ham10000(_meta(tiny_ham))
    victim = ds.samples[5]
    Path(victim.path).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    with pytest.raises(ImageError) as ei:
        decode_dataset(ds, pre)
    assert victim.path in str(ei.value)
    assert ei.value.path == victim.path
    assert str(ei.value).count(victim.path) == 1

    seen = []
    out, arrays = decode_dataset(ds, pre, skip_bad=True, progress=seen.append)
    assert len(out) == len(arrays) == len(ds) - 1
    assert victim.image_id not in out.by_id()
    assert [s.image_id for s in out.samples] == [s.image_id for s in ds.samples if s is not victim]
    assert len(out.skipped) == 1 and out.skipped[0].where == victim.path
    assert sum(seen) == len(ds)
    for a in arrays:
        assert a.dtype == np.uint8 and a.shape == (32, 42, 3)  # 48x36 -> shorter side 32


def test_decode_dataset_keeps_reader_skips(tiny_ham: Path) -> None:
    _, rows = _read_rows(_meta(tiny_ham))
    _image_path(tiny_ham, rows[0]["image_id"]).unlink()
    ds = read_ham10000(_meta(tiny_ham), skip_bad=True)
    victim = ds.samples[0]
    Path(victim.path).write_bytes(b"")
    out, arrays = decode_dataset(ds, PreprocessConfig(size=32, resize=32), skip_bad=True)
    assert len(out) == len(rows) - 2 and len(arrays) == len(out)
    assert [s.where for s in out.skipped] == [f"{_meta(tiny_ham)}:2", victim.path]


# --------------------------------------------------------------------------- ISIC 2018 Task 3


ISIC = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def _make_isic(root: Path, *, groupings: str | None = None, extra_rows: list[list[str]] = ()) -> Path:
    """10 images: one per class, plus three more sharing lesions with earlier ones."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "ISIC2018_Task3_Training_Input"
    images.mkdir()
    labels = list(ISIC) + ["NV", "NV", "MEL"]
    rows, groups = [], []
    for i, lab in enumerate(labels):
        image = f"ISIC_{i:07d}"
        Image.new("RGB", (40, 32), (i * 20, 100, 200 - i * 10)).save(images / f"{image}.jpg")
        rows.append([image] + ["1.0" if c == lab else "0.0" for c in ISIC])
        lesion = f"IL_{i:07d}" if i < 7 else {7: "IL_0000001", 8: "IL_0000001", 9: "IL_0000000"}[i]
        groups.append([image, lesion, "histopathology"])
    gt = root / "ISIC2018_Task3_Training_GroundTruth.csv"
    with open(gt, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *ISIC])
        w.writerows(rows + list(extra_rows))
    if groupings:
        with open(root / groupings, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "lesion_id", "diagnosis_confirm_type"])
            w.writerows(groups)
    return gt


def test_isic2018_without_groupings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gt = _make_isic(tmp_path / "isic")
    ds = read_isic2018(gt)
    assert ds.layout == "isic2018" and not ds.lesion_grouped
    assert [s.dx for s in ds.samples] == ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "nv", "nv", "mel"]
    assert all(s.lesion_id == s.image_id for s in ds.samples)
    assert all(Path(s.path).is_file() and Path(s.path).stem == s.image_id for s in ds.samples)
    assert "lesion" in caplog.text


def test_isic2018_with_groupings(tmp_path: Path) -> None:
    gt = _make_isic(tmp_path / "isic", groupings="ISIC2018_Task3_Training_LesionGroupings.csv")
    ds = read_isic2018(gt)  # groupings found next to the ground truth
    assert ds.lesion_grouped
    by = ds.by_id()
    assert by["ISIC_0000007"].lesion_id == by["ISIC_0000008"].lesion_id == by["ISIC_0000001"].lesion_id
    assert by["ISIC_0000009"].lesion_id == by["ISIC_0000000"].lesion_id == "IL_0000000"
    assert by["ISIC_0000003"].lesion_id == "IL_0000003" and by["ISIC_0000003"].dx == "akiec"
    split = make_split(ds, seed=1)
    assert all(len(v) == 1 for v in _lesion_splits(split).values())
    assert split.assignment["ISIC_0000007"] == split.assignment["ISIC_0000001"]


def test_isic2018_explicit_groupings_path(tmp_path: Path) -> None:
    gt = _make_isic(tmp_path / "isic", groupings="groups.csv")  # not auto-discovered
    assert not read_isic2018(gt).lesion_grouped
    ds = read_isic2018(gt, groupings=tmp_path / "isic" / "groups.csv")
    assert ds.lesion_grouped and ds.by_id()["ISIC_0000008"].lesion_id == "IL_0000001"


def test_isic2018_two_labels_in_a_row(tmp_path: Path) -> None:
    two = ["ISIC_0000099", "1.0", "0.0", "0.0", "0.0", "1.0", "0.0", "0.0"]
    gt = _make_isic(tmp_path / "isic", extra_rows=[two])
    Image.new("RGB", (40, 32)).save(tmp_path / "isic" / "ISIC2018_Task3_Training_Input" / "ISIC_0000099.jpg")
    with pytest.raises(DataError) as ei:
        read_isic2018(gt)
    assert f"{gt}:12:" in str(ei.value) and "ISIC_0000099" in str(ei.value)
    ds = read_isic2018(gt, skip_bad=True)
    assert len(ds) == 10 and "ISIC_0000099" not in ds.by_id()
    assert [s.where for s in ds.skipped] == [f"{gt}:12"]


@pytest.mark.parametrize("values", [["0.0"] * 7, ["x", "1.0", "0", "0", "0", "0", "0"]])
def test_isic2018_no_label_or_garbage(tmp_path: Path, values: list[str]) -> None:
    gt = _make_isic(tmp_path / "isic", extra_rows=[["ISIC_0000000", *values]])
    with pytest.raises(DataError) as ei:
        read_isic2018(gt)
    assert f"{gt}:12:" in str(ei.value)


def test_isic2018_integer_one_hot_and_missing_image(tmp_path: Path) -> None:
    gt = _make_isic(tmp_path / "isic", extra_rows=[["ISIC_0000050", "0", "0", "0", "0", "0", "1", "0"]])
    with pytest.raises(DataError) as ei:
        read_isic2018(gt)
    assert f"{gt}:12:" in str(ei.value) and "not found" in str(ei.value)
    Image.new("RGB", (40, 32)).save(tmp_path / "isic" / "ISIC_0000050.png")
    assert read_isic2018(gt).by_id()["ISIC_0000050"].dx == "df"


def test_isic2018_wrong_header(tmp_path: Path) -> None:
    bad = tmp_path / "gt.csv"
    bad.write_text("image,MEL,NV\nISIC_1,1.0,0.0\n")
    with pytest.raises(DataError) as ei:
        read_isic2018(bad)
    assert str(bad) in str(ei.value)


# --------------------------------------------------------------------------- folder per class


def _make_folder(root: Path) -> Path:
    for rel in ("mel/a.jpg", "mel/b.png", "nv/c.jpg", "nv/deeper/d.jpeg", "bcc/e.JPG"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36, 32), (50, 60, 70)).save(p, "PNG" if p.suffix == ".png" else "JPEG")
    (root / "mel" / "notes.txt").write_text("not an image")
    return root


def test_folder_reader(tmp_path: Path) -> None:
    ds = read_folder(_make_folder(tmp_path / "fold"))
    assert ds.layout == "folder" and not ds.lesion_grouped
    got = {s.image_id: s.dx for s in ds.samples}
    assert got == {"a": "mel", "b": "mel", "c": "nv", "d": "nv", "e": "bcc"}
    assert all(s.lesion_id == s.image_id for s in ds.samples)
    assert ds.class_counts()["nv"] == 2 and ds.class_counts()["df"] == 0


def test_folder_reader_unknown_class_folder(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "fold")
    (root / "melanoma").mkdir()
    Image.new("RGB", (36, 32)).save(root / "melanoma" / "z.jpg")
    with pytest.raises(DataError) as ei:
        read_folder(root)
    assert str(root / "melanoma") in str(ei.value)
    ds = read_folder(root, skip_bad=True)
    assert "z" not in ds.by_id() and len(ds) == 5
    assert [s.where for s in ds.skipped] == [str(root / "melanoma")]


def test_folder_reader_duplicate_stem(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "fold")
    Image.new("RGB", (36, 32)).save(root / "nv" / "a.jpg")  # also mel/a.jpg
    with pytest.raises(DataError) as ei:
        read_folder(root)
    assert "'a'" in str(ei.value)


def test_folder_reader_empty(tmp_path: Path) -> None:
    (tmp_path / "empty" / "mel").mkdir(parents=True)
    with pytest.raises(DataError):
        read_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- layout detection


def test_load_dataset_detects_all_layouts(tmp_path: Path, tiny_ham: Path) -> None:
    assert load_dataset(tiny_ham).layout == "ham10000"
    assert load_dataset(_meta(tiny_ham)).layout == "ham10000"
    assert len(load_dataset(tiny_ham)) == 56

    gt = _make_isic(tmp_path / "isic", groupings="ISIC2018_Task3_Training_LesionGroupings.csv")
    for arg in (gt.parent, gt):
        ds = load_dataset(arg)
        assert ds.layout == "isic2018" and len(ds) == 10 and ds.lesion_grouped

    ds = load_dataset(_make_folder(tmp_path / "fold"))
    assert ds.layout == "folder" and len(ds) == 5

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_ham, renamed)
    _meta(renamed).rename(renamed / "metadata.csv")
    assert load_dataset(renamed).layout == "ham10000"


def test_load_dataset_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_dataset(tmp_path / "missing")
    assert "missing" in str(ei.value)
    other = tmp_path / "other.csv"
    other.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="unknown data layout"):
        load_dataset(other)


# --------------------------------------------------------------------------- splits


def test_make_split_tiny_ham_is_lesion_disjoint(tiny_ham: Path) -> None:
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    assert set(split.assignment) == set(ds.by_id())
    lesions = _lesion_splits(split)
    assert len(lesions) == 28
    assert all(len(v) == 1 for v in lesions.values())
    counts = split.counts()
    for dx in CODES:  # 4 lesions of 2 images per class: 2 train, 1 val, 1 test
        assert [counts[s][dx] for s in SPLITS] == [4, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_make_split_synthetic_is_lesion_disjoint(seed: int) -> None:
    ds = _synthetic(seed, mixed=30)
    split = make_split(ds, seed=seed)
    assert len(split.assignment) == len(ds)
    lesions = _lesion_splits(split)
    assert len(lesions) == len({s.lesion_id for s in ds.samples})
    bad = {lesion: names for lesion, names in lesions.items() if len(names) > 1}
    assert bad == {}
    # the mixed-diagnosis lesions really exist and really have several images
    mixed = [s for s in ds.samples if s.lesion_id.startswith("MIX_")]
    assert len({s.dx for s in mixed if s.lesion_id == "MIX_000"}) == 2


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.2), (0.6, 0.2, 0.2), (0.8, 0.0, 0.2)])
def test_make_split_is_stratified_by_lesion(fractions: tuple[float, float, float]) -> None:
    ds = _synthetic(3)
    split = make_split(ds, fractions=fractions, seed=3)
    lesion_dx = {s.lesion_id: s.dx for s in ds.samples}
    per_class: dict[str, Counter] = defaultdict(Counter)
    for lesion, names in _lesion_splits(split).items():
        (name,) = names
        per_class[lesion_dx[lesion]][name] += 1
    for dx in CODES:
        n = sum(per_class[dx].values())
        assert n >= 20
        for name, frac in zip(SPLITS, fractions):
            got = per_class[dx][name]
            assert abs(got - round(n * frac)) <= 1, (dx, name, got, n * frac)
            if frac > 0:
                assert got >= 1, (dx, name)
            else:
                assert got == 0


def test_make_split_small_classes_still_in_every_split() -> None:
    samples = [Sample(f"I{c}{i}", f"L{c}{i}", c, "x") for c in ("df", "vasc") for i in range(3)]
    samples += [Sample(f"Inv{i}", f"Lnv{i}", "nv", "x") for i in range(30)]
    split = make_split(Dataset(samples, "s", "ham10000"), seed=0)
    counts = split.counts()
    for dx in ("df", "vasc"):
        assert [counts[s][dx] for s in SPLITS] == [1, 1, 1]


def test_make_split_is_deterministic() -> None:
    ds = _synthetic(2)
    a = make_split(ds, seed=42)
    b = make_split(_synthetic(2), seed=42)
    assert a.assignment == b.assignment and a.sha256() == b.sha256()
    c = make_split(ds, seed=43)
    assert c.assignment != a.assignment and c.sha256() != a.sha256()
    moved = sum(a.assignment[i] != c.assignment[i] for i in a.assignment)
    assert moved > len(ds) // 10


def test_make_split_does_not_depend_on_sample_order() -> None:
    ds = _synthetic(4)
    rev = Dataset(list(reversed(ds.samples)), ds.source, ds.layout)
    assert make_split(ds, seed=5).assignment == make_split(rev, seed=5).assignment


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (1.2, -0.1, -0.1)])
def test_make_split_rejects_bad_fractions(fractions) -> None:
    with pytest.raises(DataError):
        make_split(_synthetic(0), fractions=fractions)


def test_split_round_trip(tmp_path: Path) -> None:
    ds = _synthetic(6)
    split = make_split(ds, seed=9)
    path = write_split(split, tmp_path / "sub" / "split.csv")
    assert path.is_file() and not (tmp_path / "sub" / "split.csv.tmp").exists()
    back = read_split(path)
    assert back.assignment == split.assignment
    assert back.lesion_of == split.lesion_of
    assert back.dx_of == split.dx_of
    assert back.sha256() == split.sha256()
    assert back.source == str(path)
    assert sorted(back.ids("test")) == sorted(split.ids("test"))


def test_split_apply(tiny_ham: Path) -> None:
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    parts = {name: split.apply(ds, name) for name in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(ds)
    for name, part in parts.items():
        ids = [s.image_id for s in part.samples]
        assert set(ids) == set(split.ids(name))
        order = [s.image_id for s in ds.samples if s.image_id in set(ids)]
        assert ids == order
    smaller = Dataset(ds.samples[:10], ds.source, ds.layout)
    with pytest.raises(DataError):
        split.apply(smaller, "train")
    with pytest.raises(DataError):
        split.ids("holdout")


def _write_split_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "lesion_id", "dx", "split"])
        w.writerows(rows)
    return path


def test_read_split_rejects_lesion_in_two_splits(tmp_path: Path) -> None:
    path = _write_split_csv(tmp_path / "split.csv", [
        ("ISIC_1", "HAM_A", "mel", "train"),
        ("ISIC_2", "HAM_B", "nv", "val"),
        ("ISIC_3", "HAM_A", "mel", "test"),
    ])
    with pytest.raises(DataError) as ei:
        read_split(path)
    msg = str(ei.value)
    assert str(path) in msg and "HAM_A" in msg


def test_read_split_accepts_a_lesion_in_one_split(tmp_path: Path) -> None:
    path = _write_split_csv(tmp_path / "split.csv", [
        ("ISIC_1", "HAM_A", "mel", "test"),
        ("ISIC_2", "HAM_B", "nv", "val"),
        ("ISIC_3", "HAM_A", "MEL", "test"),
    ])
    split = read_split(path)
    assert split.assignment == {"ISIC_1": "test", "ISIC_2": "val", "ISIC_3": "test"}
    assert split.dx_of["ISIC_3"] == "mel"


@pytest.mark.parametrize("row, needle", [
    (("ISIC_9", "HAM_Z", "mel", "holdout"), "holdout"),
    (("ISIC_9", "HAM_Z", "xyz", "train"), "xyz"),
    (("ISIC_1", "HAM_A", "mel", "train"), "duplicate"),
])
def test_read_split_rejects_bad_rows(tmp_path: Path, row, needle: str) -> None:
    path = _write_split_csv(tmp_path / "split.csv", [("ISIC_1", "HAM_A", "mel", "train"), row])
    with pytest.raises(DataError) as ei:
        read_split(path)
    assert f"{path}:3:" in str(ei.value) and needle in str(ei.value)


def test_read_split_missing_or_wrong_header(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        read_split(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,split\nISIC_1,train\n")
    with pytest.raises(DataError):
        read_split(bad)


# --------------------------------------------------------------------------- the real data


@pytest.mark.data
def test_real_ham10000_subset(ham_data: Path) -> None:
    ds = load_dataset(ham_data)
    assert ds.layout == "ham10000" and ds.skipped == []
    assert len(ds) == 3738
    assert ds.class_counts() == {"akiec": 245, "bcc": 384, "bkl": 824, "df": 87, "mel": 824,
                                 "nv": 1268, "vasc": 106}
    assert len({s.lesion_id for s in ds.samples}) == 2562
    split = make_split(ds, seed=0)
    assert set(split.assignment) == set(ds.by_id())
    assert all(len(v) == 1 for v in _lesion_splits(split).values())
    counts = split.counts()
    for dx in HAM10000_CODES:
        n = sum(counts[s][dx] for s in SPLITS)
        for name, frac in zip(SPLITS, FRACTIONS):
            assert abs(counts[name][dx] / n - frac) <= 0.05, (dx, name, counts[name][dx], n)
