import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeskin.errors import CheckpointError, ConfigError
from edgeskin.labels import HAM10000
from edgeskin.models import Ensemble, build_model, load_checkpoint, load_ensemble, save_checkpoint, set_trainable
from edgeskin.preprocess import PreprocessConfig


def test_resnet50_has_published_head_layout():
    m, source = build_model("resnet50", 7, dropout=0.3, pretrained=None)
    assert source is None
    assert isinstance(m.fc, nn.Sequential) and isinstance(m.fc[0], nn.Dropout) and m.fc[0].p == 0.3
    assert tuple(m.fc[1].weight.shape) == (7, 2048)
    assert "fc.1.weight" in m.state_dict()
    m.eval()
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_large"])
def test_other_archs_build(arch):
    m, _ = build_model(arch, 2, dropout=0.2, pretrained=None)
    m.eval()
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_unknown_arch_suggests_closest():
    with pytest.raises(ConfigError, match="resnet50"):
        build_model("resnet05", 7, pretrained=None)


def test_pretrained_file_is_loaded(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "imagenet_r18.pth"
    torch.save(ref.state_dict(), path)
    m, source = build_model("resnet18", 7, pretrained=str(path))
    assert source == "imagenet:imagenet_r18.pth"
    assert torch.equal(m.conv1.weight, ref.conv1.weight)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("resnet18", 7, pretrained=str(tmp_path / "missing.pth"))


def test_auto_pretrained_without_cache_is_random(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    _, source = build_model("resnet18", 7, pretrained="auto")
    assert source is None


def test_set_trainable_last_stages():
    m, _ = build_model("resnet18", 7, pretrained=None)
    names = set_trainable(m, "resnet18", 1)
    assert names == ["layer4", "head"]
    assert m.fc[1].weight.requires_grad and m.layer4[0].conv1.weight.requires_grad
    assert not m.layer3[0].conv1.weight.requires_grad and not m.conv1.weight.requires_grad
    set_trainable(m, "resnet18", 0)
    assert not m.layer4[0].conv1.weight.requires_grad and m.fc[1].weight.requires_grad
    set_trainable(m, "resnet18", None)
    assert all(p.requires_grad for p in m.parameters())


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_ensemble_is_mean_of_softmax_not_softmax_of_mean_logits():
    a, b = [10.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    ens = Ensemble([_Fixed(a), _Fixed(b)])
    got = ens(torch.zeros(1, 3, 4, 4))[0]
    want = (torch.softmax(torch.tensor(a), 0) + torch.softmax(torch.tensor(b), 0)) / 2
    wrong = torch.softmax((torch.tensor(a) + torch.tensor(b)) / 2, 0)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, wrong, atol=1e-3)
    assert torch.isclose(got.sum(), torch.tensor(1.0))


def _save_tiny(path, seed=0):
    torch.manual_seed(seed)
    m, _ = build_model("resnet18", 7, pretrained=None)
    m.eval()
    meta = save_checkpoint(m, path, arch="resnet18", labels=HAM10000, preprocess=PreprocessConfig(size=32),
                           dropout=0.3, recipe={"loss": "wce"}, metrics={"val": {"top1": 0.5}})
    return m, meta


def test_checkpoint_round_trip(tmp_path):
    m, meta = _save_tiny(tmp_path / "member0")
    assert meta.name == "member0.json" and (tmp_path / "member0.pt").is_file()
    ck = load_checkpoint(meta)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(ck.model(x), m(x))
    assert ck.preprocess == PreprocessConfig(size=32)
    assert ck.labels is HAM10000 or ck.labels.codes == HAM10000.codes
    assert ck.config["recipe"] == {"loss": "wce"} and ck.metrics == {"val": {"top1": 0.5}}
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_checkpoint_tampered_weights_refused(tmp_path):
    _, meta = _save_tiny(tmp_path / "member0")
    pt = tmp_path / "member0.pt"
    data = bytearray(pt.read_bytes())
    data[-10] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(meta)


def test_ensemble_loads_from_directory(tmp_path):
    _save_tiny(tmp_path / "member0", 0)
    _save_tiny(tmp_path / "member1", 1)
    (tmp_path / "notes.json").write_text(json.dumps({"other": 1}))
    members = load_ensemble(tmp_path)
    assert [m.name for m in members] == ["member0", "member1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_ensemble(tmp_path / "empty")


def test_ensemble_members_keep_their_own_preprocessing_but_share_the_class_order(tmp_path):
    _save_tiny(tmp_path / "member0")
    m, _ = build_model("resnet18", 7, pretrained=None)
    save_checkpoint(m, tmp_path / "member1", arch="resnet18", labels=HAM10000,
                    preprocess=PreprocessConfig(size=64), dropout=0.3)
    members = load_ensemble(tmp_path)  # each member is fed through its own preprocessing
    assert [x.preprocess.size for x in members] == [members[0].preprocess.size, 64]
    from edgeskin.labels import BINARY

    b, _ = build_model("resnet18", 2, pretrained=None)
    save_checkpoint(b, tmp_path / "member2", arch="resnet18", labels=BINARY,
                    preprocess=PreprocessConfig(size=64), dropout=0.3)
    with pytest.raises(CheckpointError, match="class order"):
        load_ensemble(tmp_path)


@pytest.mark.reference
def test_reference_ensemble_loads_as_ensemble(reference_model):
    members = load_ensemble(reference_model)
    assert len(members) == 3
    assert members[0].preprocess.size == 112 and members[0].preprocess.resize_size == 128
    assert list(members[0].labels.codes) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    ens = Ensemble([m.model for m in members]).eval()
    with torch.inference_mode():
        p = ens(torch.zeros(2, 3, 112, 112))
    assert p.shape == (2, 7) and torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)
