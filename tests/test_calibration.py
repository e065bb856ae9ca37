"""Calibration sets: refused requests, stratification, determinism, manifests, leaks, hashes, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _bundles import run_cli
from conftest import CODES, make_ham_tree
from edgeskin.calibration import (MIN_IMAGES, make_calibration_set, read_calibration_set,
                                  resolve_calibration_images, write_calibration_set)
from edgeskin.data import Dataset, Split, load_dataset, make_split, write_split
from edgeskin.errors import DataError

#: lesions kept per class in the uneven data set (2 images each)
LESIONS = {"akiec": 44, "bcc": 44, "bkl": 44, "df": 2, "mel": 44, "nv": 44, "vasc": 10}
#: what make_split(seed=0) puts in train for those (44 lesions: 4 val, 9 test, 31 train -> 62 images;
#: 2 lesions: all train; 10 lesions: 1 val, 2 test, 7 train)
TRAIN = {"akiec": 62, "bcc": 62, "bkl": 62, "df": 4, "mel": 62, "nv": 62, "vasc": 14}
#: 300 images over 328 by largest remainder: quotas 56.71 (x5), 3.66 and 12.80 -> floors 295,
#: the 5 left go to the largest remainders (vasc .80, then akiec, bcc, bkl, mel at .71, by name)
EXPECTED_300 = {"akiec": 57, "bcc": 57, "bkl": 57, "df": 3, "mel": 57, "nv": 56, "vasc": 13}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_ham_tree(tmp_path_factory.mktemp("calib") / "ham", lesions_per_class=44, images_per_lesion=2,
                         size=(24, 18))


@pytest.fixture(scope="module")
def full(tree) -> Dataset:
    return load_dataset(tree)


@pytest.fixture(scope="module")
def ds(full) -> Dataset:
    """An uneven data set: the first LESIONS[dx] lesions of each class."""
    keep = [s for s in full.samples if int(s.lesion_id[-5:]) < LESIONS[s.dx]]
    return Dataset(keep, full.source, full.layout, full.lesion_grouped)


@pytest.fixture(scope="module")
def split(ds) -> Split:
    return make_split(ds, seed=0)


def test_precondition_train_counts(ds, split):
    assert split.counts()["train"] == TRAIN
    assert sum(TRAIN.values()) == 328 >= MIN_IMAGES


def test_draws_from_train_only_with_largest_remainder_counts(ds, split):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    m = cal.manifest
    assert len(cal.image_ids) == m["size"] == 300 and len(set(cal.image_ids)) == 300
    assert all(split.assignment[i] == "train" for i in cal.image_ids)
    assert m["class_counts"] == EXPECTED_300
    dx = {s.image_id: s.dx for s in ds.samples}
    assert {c: sum(dx[i] == c for i in cal.image_ids) for c in CODES} == EXPECTED_300
    # largest remainder: every count within 1 of its exact proportional share
    for c in CODES:
        assert abs(EXPECTED_300[c] - 300 * TRAIN[c] / 328) < 1
    assert m["forced"] is False and m["forced_reasons"] == []
    assert m["source_split"] == "train" and m["seed"] == 0 and m["split_sha256"] == split.sha256()
    assert cal.name.startswith("train-300-seed0-") and cal.name.endswith(cal.sha256[:8])
    assert all(len(im["sha256"]) == 64 for im in m["images"])


@pytest.mark.parametrize("size", [7, 10, 20])
def test_every_class_present_even_when_small(ds, split, size):
    cal = make_calibration_set(ds, split, size=size, seed=0, force=True)
    counts = cal.manifest["class_counts"]
    assert sum(counts.values()) == size == len(cal.image_ids)
    assert all(counts[c] >= 1 for c in CODES), counts


def test_deterministic_for_a_seed_and_different_for_another(ds, split):
    a = make_calibration_set(ds, split, size=300, seed=0)
    b = make_calibration_set(ds, split, size=300, seed=0)
    c = make_calibration_set(ds, split, size=300, seed=1)
    assert a.image_ids == b.image_ids and a.manifest == b.manifest
    assert c.image_ids != a.image_ids and c.sha256 != a.sha256
    assert c.manifest["class_counts"] == a.manifest["class_counts"]  # same rule, different draw


def test_too_small_is_refused_unless_forced(ds, split):
    with pytest.raises(DataError) as e:
        make_calibration_set(ds, split, size=299)
    assert "299 images is fewer than the 300" in e.value.message and "--force" in e.value.hint
    cal = make_calibration_set(ds, split, size=299, force=True)
    assert cal.manifest["forced"] is True
    assert any("fewer than the 300" in r for r in cal.manifest["forced_reasons"])


def test_more_than_the_split_holds_is_refused_even_forced(ds, split):
    with pytest.raises(DataError, match="has 328"):
        make_calibration_set(ds, split, size=329, force=True)


def test_class_without_training_image_is_refused_unless_forced(ds, split):
    no_df = dict(split.assignment)
    for i, dx in split.dx_of.items():
        if dx == "df":
            no_df[i] = "test"
    s2 = Split(no_df, split.lesion_of, split.dx_of, source="no-df")
    with pytest.raises(DataError) as e:
        make_calibration_set(ds, s2, size=300)
    assert "df" in e.value.message and "no image in the train split" in e.value.message
    cal = make_calibration_set(ds, s2, size=300, force=True)
    m = cal.manifest
    assert m["forced"] is True and any("df" in r for r in m["forced_reasons"])
    assert m["class_counts"]["df"] == 0 and sum(m["class_counts"].values()) == 300
    assert all(m["class_counts"][c] > 0 for c in CODES if c != "df")


@pytest.mark.parametrize("source", ["val", "test"])
def test_non_train_source_is_refused_unless_forced(ds, split, source):
    with pytest.raises(DataError) as e:
        make_calibration_set(ds, split, size=20, source_split=source)
    assert f"{source!r} split leaks evaluation images" in e.value.message
    cal = make_calibration_set(ds, split, size=20, source_split=source, force=True)
    m = cal.manifest
    assert m["forced"] is True and m["source_split"] == source
    assert any("leaks" in r for r in m["forced_reasons"])
    assert all(split.assignment[i] == source for i in cal.image_ids)
    # explicitly forced: the leak is accepted (and recorded) when the set is used
    assert len(resolve_calibration_images(cal, ds, split)) == 20


def test_write_read_round_trip(ds, split, tmp_path):
    cal = make_calibration_set(ds, split, size=300, seed=3)
    path = write_calibration_set(cal, tmp_path / "calibration")
    assert path == tmp_path / "calibration" / f"{cal.name}.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    back = read_calibration_set(path)
    assert back.name == cal.name and back.image_ids == cal.image_ids
    assert back.manifest == cal.manifest and back.path == path and back.sha256 == cal.sha256
    assert back.summary() == {"id": cal.name, "sha256": cal.sha256, "size": 300, "forced": False,
                              "source_split": "train"}


@pytest.mark.parametrize("edit", ["swap_image", "drop_image", "change_hash"])
def test_hand_edited_manifest_is_refused(ds, split, tmp_path, edit):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    path = write_calibration_set(cal, tmp_path)
    m = json.loads(path.read_text())
    if edit == "swap_image":
        unused = next(i for i in split.ids("train") if i not in set(cal.image_ids))
        m["images"][0]["image_id"] = unused
    elif edit == "drop_image":
        m["images"].pop()
    else:
        m["images"][5]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="does not match its sha256"):
        read_calibration_set(path)


@pytest.mark.parametrize("text, match", [("{", "not valid JSON"), ('{"format": "other"}', "not an edgeskin")])
def test_unreadable_manifest(tmp_path, text, match):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_calibration_set(p)
    with pytest.raises(DataError, match="not found"):
        read_calibration_set(tmp_path / "missing.json")


def test_resolve_with_its_own_split(ds, split):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    got = resolve_calibration_images(cal, ds, split)
    assert [s.image_id for s in got.samples] == list(cal.image_ids)


def _leaked(cal, other: Split) -> list[str]:  # noqa: ANN001
    return [i for i in cal.image_ids if other.assignment[i] in ("val", "test")]


def test_resolve_refuses_a_leak_into_another_split(ds, split):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    other = make_split(ds, seed=1)
    assert _leaked(cal, other)  # precondition: the other split puts some of them in val/test
    with pytest.raises(DataError) as e:
        resolve_calibration_images(cal, ds, other)
    assert "validation/test split" in e.value.message
    assert f"{len(_leaked(cal, other))} calibration image(s)" in e.value.message


def test_a_set_forced_for_size_is_still_checked_for_leaks(ds, split):
    """--force for a small set accepts the small size, not a later leak into val/test."""
    cal = make_calibration_set(ds, split, size=40, seed=0, force=True)
    assert cal.manifest["forced"] is True
    other = make_split(ds, seed=1)
    assert _leaked(cal, other)
    with pytest.raises(DataError, match="validation/test split"):
        resolve_calibration_images(cal, ds, other)


def test_resolve_refuses_a_changed_image_file(ds, split, tmp_path):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    victim = cal.image_ids[17]
    changed = tmp_path / f"{victim}.jpg"
    Image.fromarray(np.zeros((18, 24, 3), np.uint8)).save(changed)
    samples = [replace(s, path=str(changed)) if s.image_id == victim else s for s in ds.samples]
    ds2 = Dataset(samples, ds.source, ds.layout, ds.lesion_grouped)
    with pytest.raises(DataError) as e:
        resolve_calibration_images(cal, ds2, split)
    assert str(changed) in e.value.message and "changed" in e.value.message


def test_resolve_refuses_missing_images(ds, split):
    cal = make_calibration_set(ds, split, size=300, seed=0)
    ds2 = Dataset([s for s in ds.samples if s.image_id != cal.image_ids[0]], ds.source, ds.layout)
    with pytest.raises(DataError, match="not in"):
        resolve_calibration_images(cal, ds2, split)


def test_cli_calib_make(tree, full, tmp_path):
    split_file = write_split(make_split(full, seed=0), tmp_path / "split.csv")
    out_dir = tmp_path / "cal"
    r = run_cli("calib", "make", "--data", str(tree), "--split", str(split_file), "--size", "300",
                "--seed", "2", "--out-dir", str(out_dir))
    assert r.returncode == 0, r.stderr
    written = list(out_dir.glob("*.json"))
    assert len(written) == 1 and written[0].name.startswith("train-300-seed2-")
    cal = read_calibration_set(written[0])
    assert len(cal.image_ids) == 300 and cal.manifest["forced"] is False
    assert str(written[0]) in r.stdout.replace("\n", "")
    # the CLI draws exactly what the API draws
    from edgeskin.data import read_split

    api = make_calibration_set(full, read_split(split_file), size=300, seed=2)
    assert api.image_ids == cal.image_ids

    r = run_cli("calib", "make", "--data", str(tree), "--split", str(split_file), "--size", "50",
                "--out-dir", str(tmp_path / "small"), "--name", "small")
    assert r.returncode == 2
    assert "error:" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "small" / "small.json").exists()

    r = run_cli("calib", "make", "--data", str(tree), "--split", str(split_file), "--size", "50",
                "--out-dir", str(tmp_path / "small"), "--name", "small", "--force")
    assert r.returncode == 0, r.stderr
    assert "forced" in r.stderr
    assert read_calibration_set(tmp_path / "small" / "small.json").manifest["forced"] is True
