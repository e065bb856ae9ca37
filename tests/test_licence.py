"""HAM10000's non-commercial licence follows the data: detected from the data set read, recorded in
the checkpoint trained on it, and carried into the provenance every bundle manifest gets."""

from __future__ import annotations

import json

import pytest

from edgeskin.data import load_dataset, make_split
from edgeskin.data.licence import HAM10000, ISIC2018, licence_of, licence_record, same_licence


def test_licence_is_known_by_layout_and_unknown_for_a_plain_folder():
    assert licence_of("ham10000") is HAM10000 and licence_of("isic2018") is ISIC2018
    assert licence_of("folder") is None and licence_record("folder") is None
    rec = licence_record("ham10000")
    assert rec["spdx"] == "CC-BY-NC-4.0" and "no commercial use" in rec["notice"] and "Tschandl" in rec["attribution"]
    assert json.loads(json.dumps(rec)) == rec  # goes into JSON provenance as is


@pytest.mark.parametrize("stated,same", [("CC BY-NC 4.0", True), ("CC-BY-NC-4.0", True),
                                         ("Creative Commons Attribution-NonCommercial 4.0 International", True),
                                         ("CC BY-NC-SA 4.0", False), ("CC0 1.0", False)])
def test_same_licence(stated, same):
    assert same_licence(stated, HAM10000) is same


def test_a_member_trained_on_ham10000_records_the_licence_and_bundles_carry_it(tiny_ham, tmp_path):
    from edgeskin.targets.prepare import model_provenance
    from edgeskin.train import TrainConfig, train_ensemble

    ds = load_dataset(tiny_ham)
    assert ds.layout == "ham10000"
    split = make_split(ds, seed=0)
    cfg = TrainConfig(arch="resnet18", size=32, epochs=1, batch_size=8, steps_per_epoch=1, pretrained=None,
                      bf16="off", patience=None)
    [res] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "ens", members=1)
    config = json.loads(res.checkpoint.read_text())
    assert config["recipe"]["data_licence"] == HAM10000.to_dict()

    prov = model_provenance("member0", "resnet18", config["sha256"], config, split)
    assert prov["data_licence"]["spdx"] == "CC-BY-NC-4.0"
    # a model whose training data edgeskin cannot name gets no licence claim at all
    assert "data_licence" not in model_provenance("m", "resnet18", "0" * 64, {"recipe": {}}, split)
