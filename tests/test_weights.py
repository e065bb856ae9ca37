"""ImageNet weights for transfer learning: download through torch hub's hash-checked path from a
real HTTP server on 127.0.0.1, the cache hit, the offline error, and the sha256 in the checkpoint."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeskin.errors import CheckpointError
from edgeskin.models import build_model
from edgeskin.models.weights import fetch_weights, imagenet_url, resolve_pretrained


class WeightsServer:
    """Serves files from a folder and counts the requests per path."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.hits = folder, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                f = outer.folder / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """A resnet18 state_dict (random weights standing in for ImageNet ones) served under a torch
    hub name whose hash prefix is right, and a copy whose prefix is wrong; TORCH_HOME in tmp."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = tmp_path / "www"
    folder.mkdir()
    torch.manual_seed(3)
    raw = folder / "raw.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = folder / f"resnet18-{digest[:8]}.pth"
    raw.rename(good)
    (folder / "resnet18-00000000.pth").write_bytes(good.read_bytes())
    server = WeightsServer(folder)
    yield server, good.name, digest
    server.close()


def test_download_hash_check_and_cache_hit(served, tmp_path):
    server, name, digest = served
    url = f"{server.url}/{name}"
    wf = resolve_pretrained("resnet18", url)
    assert wf.sha256 == digest and wf.path.name == name
    assert wf.path.parent == Path(torch.hub.get_dir()) / "checkpoints"  # torchvision's own cache folder
    assert server.hits == {f"/{name}": 1}
    again = resolve_pretrained("resnet18", url)  # second run: the cache, no request
    assert again.path == wf.path and server.hits == {f"/{name}": 1}
    model, source = build_model("resnet18", 7, pretrained=wf)
    state = torch.load(wf.path, weights_only=True)
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and source == f"url:{url}"


def test_a_file_that_does_not_match_its_hash_is_refused_and_not_cached(served):
    server, _, _ = served
    with pytest.raises(CheckpointError, match="does not match its published hash"):
        fetch_weights(f"{server.url}/resnet18-00000000.pth")
    assert not (Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-00000000.pth").exists()
    assert not any((Path(torch.hub.get_dir()) / "checkpoints").glob("*.partial"))


def test_imagenet_offline_names_the_file_and_where_to_put_it(served, monkeypatch):
    server, _, _ = served
    port = server.server.server_address[1]
    server.close()  # the mirror is gone: as on a machine without internet
    monkeypatch.setenv("EDGESKIN_WEIGHTS_MIRROR", f"http://127.0.0.1:{port}/")
    expected = imagenet_url("resnet18").rsplit("/", 1)[1]  # torchvision's own file name
    with pytest.raises(CheckpointError) as info:
        resolve_pretrained("resnet18", "imagenet")
    hint = info.value.hint
    assert expected in hint and str(Path(torch.hub.get_dir()) / "checkpoints") in hint
    assert "--pretrained none" in hint
    # auto never downloads: offline it falls back to random initialisation
    assert resolve_pretrained("resnet18", "auto") is None


def test_imagenet_from_the_cache_then_training_records_its_sha256(served, monkeypatch, tiny_ham, tmp_path):
    """``imagenet`` with torchvision's file already in torch hub's cache (as after a download)
    trains from it without a request, and the checkpoint keeps the file's sha256."""
    from edgeskin.data import load_dataset, make_split
    from edgeskin.train import TrainConfig, train_ensemble

    server, name, digest = served
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    expected = imagenet_url("resnet18").rsplit("/", 1)[1]
    (cache / expected).write_bytes((server.folder / name).read_bytes())
    monkeypatch.setenv("EDGESKIN_WEIGHTS_MIRROR", server.url)
    ds = load_dataset(tiny_ham)
    cfg = TrainConfig(arch="resnet18", size=32, epochs=1, batch_size=8, steps_per_epoch=1, pretrained="imagenet",
                      bf16="off", freeze_epochs=0)
    [r] = train_ensemble(cfg, dataset=ds, split=make_split(ds, seed=0), out_dir=tmp_path / "e", members=1)
    meta = json.loads(r.checkpoint.read_text())
    assert meta["recipe"]["initialisation"] == f"imagenet:{expected}"
    assert meta["recipe"]["initial_weights_sha256"] == digest
    assert server.hits == {}


def test_published_preset_and_full_recipe_ask_for_imagenet_explicitly():
    from edgeskin.train import PRESETS

    repo = Path(__file__).resolve().parent.parent
    assert PRESETS["published"]["pretrained"] == "imagenet"
    text = (repo / "recipes" / "full.toml").read_text()
    assert 'pretrained = "imagenet"' in text


def test_auto_on_the_published_preset_warns_loudly(tiny_ham, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgeskin.cli import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    r = CliRunner().invoke(app, ["train", "--data", str(tiny_ham), "--out", str(tmp_path / "w"), "--preset", "published",
                                 "--pretrained", "auto", "--arch", "resnet18", "--size", "32", "--epochs", "1",
                                 "--steps-per-epoch", "1", "--members", "1", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "warning:" in text and "not the published method" in text and "--pretrained imagenet" in text
    assert np.isfinite(json.loads((tmp_path / "w" / "member0.json").read_text())["recipe"]["best_val_balanced_accuracy"])
