"""`edgeskin data fetch`: a real local HTTP server emulating the Dataverse API (listing, downloads with
Range, cut connections), a tiny HAM10000-shaped release made with Pillow, no mocks of the fetch code."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from edgeskin.data import load_dataset
from edgeskin.data.fetch import DOWNLOAD_DIR, LICENCE_FILE, FetchResult, default_data_dir, fetch_dataset
from edgeskin.data.licence import HAM10000
from edgeskin.errors import DataError

DOI = "doi:10.7910/DVN/DBW86T"
CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "nv")


# ----------------------------------------------------------------- a tiny release

def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, bytes]:
    """8 images in two zips (part 1 with a top-level folder, part 2 flat) and the metadata CSV."""
    ids = [f"ISIC_{i:07d}" for i in range(8)]
    zips = {}
    for part, chunk in ((1, ids[:4]), (2, ids[4:])):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for i in chunk:
                arc = f"HAM10000_images_part_1/{i}.jpg" if part == 1 else f"{i}.jpg"
                zf.writestr(arc, _jpeg(int(i[-2:])))
        zips[f"HAM10000_images_part_{part}.zip"] = buf.getvalue()
    meta = io.StringIO()
    w = csv.writer(meta, lineterminator="\n")
    w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
    for n, (i, dx) in enumerate(zip(ids, CODES)):
        w.writerow([f"HAM_{n // 2:07d}", i, dx, "histo", "50.0", "male", "back"])
    return {**zips, "HAM10000_metadata.csv": meta.getvalue().encode()}


# ----------------------------------------------------------------- a fake Dataverse

class FakeDataverse:
    """ThreadingHTTPServer on 127.0.0.1: the dataset listing and /api/access/datafile/{id} with Range.

    ``cuts[id]`` lists, per request for that file, after how many body bytes to close the socket
    (None: send all). ``requests`` records (path, headers) of every request."""

    IDS = {"HAM10000_images_part_1.zip": 101, "HAM10000_images_part_2.zip": 102, "HAM10000_metadata.csv": 103,
           "ISIC2018_Task3_Test_Images.zip": 104}

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.files["ISIC2018_Task3_Test_Images.zip"] = b"not wanted"
        self.cuts: dict[int, list[int | None]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.md5_override: dict[str, str] = {}
        self.honour_range = True
        self.licence = "CC BY-NC 4.0"  # what Harvard's record states (latestVersion.license.name)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[tuple[str, dict[str, str]]]:
        return [r for r in self.requests if r[0].startswith("/api/access/datafile/")]

    def listing(self) -> dict:
        entries = []
        for name, fid in self.IDS.items():
            data = self.files[name]
            md5 = self.md5_override.get(name, hashlib.md5(data).hexdigest())
            df = {"id": fid, "filename": name, "filesize": len(data), "contentType": "application/zip"}
            if name == "HAM10000_images_part_2.zip":  # an installation configured for SHA-256
                df["checksum"] = {"type": "SHA-256", "value": hashlib.sha256(data).hexdigest()}
            else:
                df["md5"] = md5
                df["checksum"] = {"type": "MD5", "value": md5}
            if name.endswith(".csv"):  # ingested tabular file: listed as .tab, original is the CSV
                df.update(filename="HAM10000_metadata.tab", contentType="text/tab-separated-values",
                          filesize=len(self._tab()), originalFileName=name, originalFileSize=len(data),
                          originalFileFormat="text/csv")
            entries.append({"label": df["filename"], "dataFile": df})
        latest = {"files": entries}
        if self.licence:
            latest["license"] = {"name": self.licence, "uri": "http://creativecommons.org/licenses/by-nc/4.0"}
        return {"status": "OK", "data": {"latestVersion": latest}}

    def _tab(self) -> bytes:
        rows = list(csv.reader(io.StringIO(self.files["HAM10000_metadata.csv"].decode())))
        return "\n".join("\t".join(f'"{c}"' for c in r) for r in rows).encode()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        u = urlparse(h.path)
        q = parse_qs(u.query)
        with self.lock:
            self.requests.append((h.path, dict(h.headers.items())))
        if u.path.rstrip("/") == "/api/datasets/:persistentId" and q.get("persistentId") == [DOI]:
            return self._send(h, 200, json.dumps(self.listing()).encode(), "application/json")
        if u.path.startswith("/api/access/datafile/"):
            fid = int(u.path.rsplit("/", 1)[1])
            name = next((n for n, i in self.IDS.items() if i == fid), None)
            if name is None:
                return self._send(h, 404, b'{"status":"ERROR","message":"not found"}', "application/json")
            data = self.files[name]
            if name.endswith(".csv") and q.get("format") != ["original"]:
                data = self._tab()
            with self.lock:
                plan = self.cuts.get(fid)
                cut = plan.pop(0) if plan else None
            start = 0
            rng = h.headers.get("Range")
            if rng and self.honour_range and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                if start >= len(data):
                    return self._send(h, 416, b"", "text/plain")
            body = data[start:]
            h.send_response(206 if start else 200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Accept-Ranges", "bytes")
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.end_headers()
            if cut is not None:
                h.wfile.write(body[:cut])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            h.wfile.write(body)
            return
        self._send(h, 404, b'{"status":"ERROR","message":"no such endpoint"}', "application/json")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def dv(release):
    server = FakeDataverse(release)
    yield server
    server.close()


class Recorder:
    """A Reporter that records what it is told."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, int | None]] = []
        self.advanced: dict[str, int] = {}
        self.messages: list[str] = []
        self._cur = ""

    def start(self, description, total):
        self._cur = description.split(" ")[0]
        self.starts.append((description, total))
        self.advanced.setdefault(self._cur, 0)

    def advance(self, n=1):
        self.advanced[self._cur] += n

    def update(self, description):
        pass

    def stop(self):
        pass

    def message(self, text):
        self.messages.append(text)


def _assert_layout(dest: Path) -> None:
    assert sorted(p.name for p in (dest / "HAM10000_images_part_1").iterdir()) == [f"ISIC_{i:07d}.jpg" for i in range(4)]
    assert sorted(p.name for p in (dest / "HAM10000_images_part_2").iterdir()) == [f"ISIC_{i:07d}.jpg" for i in range(4, 8)]
    assert (dest / "HAM10000_metadata.csv").read_text().startswith("lesion_id,image_id,dx")
    assert len(load_dataset(dest)) == 8
    assert not list((dest / DOWNLOAD_DIR).glob("*.part"))


# ----------------------------------------------------------------- tests

def test_full_fetch_verifies_unpacks_and_reports_bytes(dv, release, tmp_path):
    rec = Recorder()
    res = fetch_dataset("ham10000", tmp_path / "d", server=dv.url, reporter=rec)
    assert isinstance(res, FetchResult) and res.n_images == 8 and not res.resumed
    _assert_layout(tmp_path / "d")
    by = {f.name: f for f in res.files}
    assert set(by) == {"HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata.csv"}
    assert all(f.verified for f in res.files)
    assert by["HAM10000_images_part_2.zip"].algorithm == "sha256"
    assert by["HAM10000_images_part_1.zip"].digest == hashlib.md5(release["HAM10000_images_part_1.zip"]).hexdigest()
    # the ingested table is fetched as the original CSV; the unwanted file is never requested
    paths = [p for p, _ in dv.downloads()]
    assert "/api/access/datafile/103?format=original" in paths and not any("/104" in p for p in paths)
    for name, data in release.items():
        assert rec.advanced[name] == len(data), name
    assert res.bytes_downloaded == sum(len(d) for d in release.values())
    done = json.loads((tmp_path / "d" / DOWNLOAD_DIR / "done.json").read_text())
    assert set(done["files"]) == set(by)
    assert not (tmp_path / "d" / DOWNLOAD_DIR / "HAM10000_images_part_1.zip").exists()  # archive removed once unpacked


def test_cut_connection_is_resumed_with_range(dv, release, tmp_path):
    k = 1000
    dv.cuts[101] = [k]  # first request for part 1: close the socket after k bytes
    rec = Recorder()
    res = fetch_dataset("ham10000", tmp_path / "d", server=dv.url, reporter=rec, retries=2)
    _assert_layout(tmp_path / "d")
    assert res.resumed
    ranges = [h.get("Range") for p, h in dv.downloads() if p.endswith("/101")]
    assert ranges == [None, f"bytes={k}-"]
    assert rec.advanced["HAM10000_images_part_1.zip"] == len(release["HAM10000_images_part_1.zip"])
    assert any("resuming at byte 1000" in m for m in rec.messages)


def test_resume_across_runs(dv, release, tmp_path):
    k = 1500
    dv.cuts[102] = [k]
    dest = tmp_path / "d"
    with pytest.raises(DataError) as ei:
        fetch_dataset("ham10000", dest, server=dv.url, retries=0)
    msg = ei.value.message
    assert "HAM10000_images_part_2.zip" in msg and f"{k} of {len(release['HAM10000_images_part_2.zip'])} bytes are kept" in msg
    assert "running the same command again resumes" in msg
    part = dest / DOWNLOAD_DIR / "HAM10000_images_part_2.zip.part"
    assert part.stat().st_size == k
    n_before = len(dv.downloads())
    res = fetch_dataset("ham10000", dest, server=dv.url, retries=0)
    assert res.resumed and res.n_images == 8
    second = dv.downloads()[n_before:]
    assert [h.get("Range") for p, h in second if p.endswith("/102")] == [f"bytes={k}-"]
    assert not any(p.endswith("/101") for p, _ in second)  # part 1 finished in the first run
    _assert_layout(dest)


def test_server_without_range_restarts_from_zero(dv, release, tmp_path):
    dv.cuts[101] = [800]
    dv.honour_range = False  # answers a Range request with 200 and the whole file
    rec = Recorder()
    res = fetch_dataset("ham10000", tmp_path / "d", server=dv.url, reporter=rec)
    _assert_layout(tmp_path / "d")
    assert not res.resumed
    assert [h.get("Range") for p, h in dv.downloads() if p.endswith("/101")] == [None, "bytes=800-"]
    assert any("again from the start" in d for d, _ in rec.starts)


def test_manifest_mirror(dv, release, tmp_path):
    manifest = tmp_path / "mirror.json"
    ids = {"HAM10000_images_part_1.zip": 101, "HAM10000_images_part_2.zip": 102, "HAM10000_metadata.csv": 103}
    manifest.write_text(json.dumps({"base_url": dv.url + "/api/access/datafile/", "files": [
        {"name": n, "url": f"{ids[n]}" + ("?format=original" if n.endswith(".csv") else ""), "size": len(d),
         "sha256": hashlib.sha256(d).hexdigest()} for n, d in release.items()]}))
    res = fetch_dataset("ham10000", tmp_path / "d", manifest=manifest)
    assert all(f.verified and f.algorithm == "sha256" for f in res.files)
    assert not any(p.startswith("/api/datasets") for p, _ in dv.requests)
    _assert_layout(tmp_path / "d")
    # a manifest entry without a checksum is refused unless verify=False
    manifest.write_text(json.dumps([{"name": n, "url": f"{dv.url}/api/access/datafile/{ids[n]}?format=original"}
                                    for n in release]))
    with pytest.raises(DataError, match="publishes no checksum"):
        fetch_dataset("ham10000", tmp_path / "e", manifest=manifest)
    assert not list((tmp_path / "e" / DOWNLOAD_DIR).glob("*.part"))
    res = fetch_dataset("ham10000", tmp_path / "e", manifest=manifest, verify=False)
    assert res.n_images == 8 and not any(f.verified for f in res.files)


def test_checksum_mismatch_refuses_and_deletes(dv, tmp_path):
    dv.md5_override["HAM10000_images_part_1.zip"] = "0" * 32
    dest = tmp_path / "d"
    with pytest.raises(DataError) as ei:
        fetch_dataset("ham10000", dest, server=dv.url)
    msg = ei.value.message
    assert "HAM10000_images_part_1.zip" in msg and "0" * 32 in msg and "md5 mismatch" in msg
    assert not (dest / "HAM10000_images_part_1").exists()
    assert not list((dest / DOWNLOAD_DIR).glob("*.part"))
    assert not (dest / DOWNLOAD_DIR / "HAM10000_images_part_1.zip").exists()


def test_rerun_skips_finished_files(dv, tmp_path):
    dest = tmp_path / "d"
    fetch_dataset("ham10000", dest, server=dv.url)
    n = len(dv.requests)
    rec = Recorder()
    res = fetch_dataset("ham10000", dest, server=dv.url, reporter=rec)
    assert len(dv.requests) == n  # nothing downloaded (nor listed) again
    assert res.n_images == 8 and res.bytes_downloaded == 0 and all(f.skipped for f in res.files)
    assert sum("already fetched" in m for m in rec.messages) == 3


def test_unreachable_server_fails_fast_with_hand_copy_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "d"
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        fetch_dataset("ham10000", dest, server=f"http://127.0.0.1:{port}", retries=3)
    assert time.monotonic() - t0 < 5
    assert "cannot reach" in ei.value.message
    hint = ei.value.hint
    assert "https://doi.org/10.7910/DVN/DBW86T" in hint and "--archives DIR" in hint
    assert "HAM10000_images_part_1.zip" in hint and "HAM10000_images_part_2.zip" in hint
    assert str(dest / "HAM10000_images_part_1") in hint and str(dest / "HAM10000_metadata.csv") in hint


def test_archives_unpacks_without_network_and_refuses_unsafe_zip(release, tmp_path):
    arch = tmp_path / "downloads"
    arch.mkdir()
    for name, data in release.items():
        (arch / name).write_bytes(data)
    rec = Recorder()
    res = fetch_dataset("ham10000", tmp_path / "d", archives=arch, reporter=rec)
    _assert_layout(tmp_path / "d")
    assert res.bytes_downloaded == 0 and not any(f.verified for f in res.files)
    assert sum("NOT verified" in m for m in rec.messages) == 3
    assert (arch / "HAM10000_images_part_1.zip").exists()  # the user's copies are left alone

    # with a manifest, the archives are verified against it
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"name": n, "url": "", "sha256": hashlib.sha256(d).hexdigest()}
                                    for n, d in release.items()]))
    res = fetch_dataset("ham10000", tmp_path / "d2", archives=arch, manifest=manifest)
    assert all(f.verified for f in res.files)

    # a member escaping the folder is refused, and nothing is left behind
    evil = tmp_path / "evil"
    evil.mkdir()
    for name, data in release.items():
        (evil / name).write_bytes(data)
    with zipfile.ZipFile(evil / "HAM10000_images_part_2.zip", "a") as zf:
        zf.writestr("../evil.jpg", b"x")
    dest = tmp_path / "d3"
    with pytest.raises(DataError, match="unsafe member '../evil.jpg'"):
        fetch_dataset("ham10000", dest, archives=evil)
    assert not (tmp_path / "evil.jpg").exists() and not (dest.parent / "evil.jpg").exists()
    assert not (dest / "HAM10000_images_part_2").exists()
    assert not list((dest / DOWNLOAD_DIR).glob("*.unpacking"))


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESKIN_HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / "data" / "ham10000"
    monkeypatch.delenv("EDGESKIN_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "edgeskin" / "data" / "ham10000"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "edgeskin" / "data" / "ham10000"


def test_cli_fetch(dv, tmp_path):
    from typer.testing import CliRunner

    from edgeskin.cli_data import data_app

    dest = tmp_path / "d"
    r = CliRunner().invoke(data_app, ["fetch", "ham10000", "--server", dv.url, "--dest", str(dest)],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, (r.output, r.exception)
    assert "8 images in" in r.output and f"EDGESKIN_DATA={dest}" in r.output
    _assert_layout(dest)
    # the non-commercial licence is shown where the user meets the data, and kept beside it
    assert "CC BY-NC 4.0" in r.output and "no commercial use" in r.output and "Tschandl" in r.output
    assert "source states" not in r.output  # the listing's "CC BY-NC 4.0" is the licence we know
    assert HAM10000.url in (dest / LICENCE_FILE).read_text()


def test_licence_stated_by_the_source_is_reported_and_a_different_one_flagged(dv, tmp_path):
    res = fetch_dataset("ham10000", tmp_path / "d", server=dv.url)
    assert res.licence is HAM10000 and res.licence_at_source == "CC BY-NC 4.0"
    from typer.testing import CliRunner

    from edgeskin.cli_data import data_app

    dv.licence = "CC BY-NC-SA 4.0"
    r = CliRunner().invoke(data_app, ["fetch", "ham10000", "--server", dv.url, "--dest", str(tmp_path / "e"), "-q"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "the source states the licence CC BY-NC-SA 4.0, not CC-BY-NC-4.0" in " ".join(r.output.split())
