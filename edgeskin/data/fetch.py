"""Fetch a public data set (HAM10000) into the layout :func:`edgeskin.data.load_dataset` reads.

Standard library only (urllib, hashlib, zipfile, json). Three sources:

* the official Harvard Dataverse record (default), through Dataverse's native API, which
  publishes each file's size and checksum; ``server=`` points at another installation/mirror;
* a JSON manifest for mirrors: ``[{"name", "url", "size"?, "sha256"? | "md5"?}, ...]``
  (or ``{"base_url": ..., "files": [...]}``, relative urls joined to base_url);
* ``archives=DIR``: copies downloaded by hand, unpacked without any network.

Downloads go to ``DEST/.download/NAME.part``, resume with ``Range: bytes=N-`` (append on 206,
restart on 200), retry a cut connection ``retries`` times, and are verified (md5/sha-1/sha-256/
sha-512, whichever the source gives) before use. Zips are unpacked into a temporary folder that
is renamed into place; ``DEST/.download/done.json`` records what is finished (with digests), so a
re-run skips it.

The data set's licence (HAM10000: CC BY-NC 4.0, :mod:`edgeskin.data.licence`) comes back in the
result, is written beside the images as ``DEST/DATA_LICENCE.txt``, and the licence the Dataverse
listing states is reported so that a change at the source shows.

Why not pooch: docs/data-fetch.md (it restarts a cut download from byte 0, cannot fetch an ingested
table's original form, and its Dataverse registry needs an ``md5`` field some installations omit).

Dataverse API, as checked against its documentation and source:

* ``GET {server}/api/datasets/:persistentId/?persistentId=doi:...`` returns
  ``{"status": "OK", "data": {"latestVersion": {"files": [{"label", "dataFile": {...}}]}}}``
  (see rclone's Dataverse backend, SwissDataScienceCenter/rclone backend/doi/api/dataversetypes.go).
  ``dataFile`` carries ``id``, ``filename``, ``filesize``, ``md5`` (only when the checksum type is
  MD5), ``checksum: {"type", "value"}`` (type: MD5, SHA-1, SHA-256 or SHA-512, per installation),
  and for ingested tabular files ``originalFileName``, ``originalFileSize``, ``originalFileFormat``
  (IQSS/dataverse src/main/java/edu/harvard/iq/dataverse/util/json/JsonPrinter.java).
* ``GET {server}/api/access/datafile/{id}`` downloads a file; ``format=original`` gives the "Saved
  Original" of an ingested tabular file instead of the generated tab-separated .tab
  (https://guides.dataverse.org/en/latest/api/dataaccess.html). Harvard redirects downloads to
  its object store; urllib follows the redirect and keeps the Range header.
* Caveat: for some ingested files the published md5 matches neither download
  (https://github.com/IQSS/dataverse/issues/9501), so a mismatch on the metadata file says that
  ``--no-verify`` accepts it (the metadata is then still checked by reading the data set).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError
from ..fileio import atomic_path, write_json
from ..progress import NullReporter, Reporter
from .licence import HAM10000, DataLicence

#: checksums, not security: say so where hashlib takes it (Python 3.9+; the device side runs 3.8)
_NOT_FOR_SECURITY: dict = {"usedforsecurity": False} if sys.version_info >= (3, 9) else {}

CONNECT_TIMEOUT = 10.0  # seconds: an unreachable server fails fast
READ_TIMEOUT = 60.0  # seconds without data before a transfer counts as cut (and is resumed)
CHUNK = 1 << 16
DOWNLOAD_DIR = ".download"
DONE_FILE = "done.json"
LICENCE_FILE = "DATA_LICENCE.txt"  # beside the images: the terms travel with the folder
RETRY_WAIT = 0.5  # seconds, doubled each retry, at most MAX_WAIT
MAX_WAIT = 8.0

_ALGOS = {"md5": "md5", "sha1": "sha1", "sha256": "sha256", "sha512": "sha512"}


@dataclass(frozen=True)
class _Wanted:
    """One file of a data set: the local name, what to do with it, and the names it may have."""

    name: str  # local name, e.g. HAM10000_metadata.csv
    kind: str  # "zip": unpacked into DEST/<stem>/ ; "table": saved as DEST/<name> (CSV)
    extensions: tuple[str, ...]  # accepted extensions of the source file

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class _DatasetSpec:
    name: str
    doi: str
    server: str
    files: tuple[_Wanted, ...]
    title: str
    licence: DataLicence


DATASETS: dict[str, _DatasetSpec] = {
    "ham10000": _DatasetSpec(
        name="ham10000",
        doi="doi:10.7910/DVN/DBW86T",
        server="https://dataverse.harvard.edu",
        title="HAM10000 (Tschandl et al. 2018, Harvard Dataverse)",
        licence=HAM10000,
        files=(
            _Wanted("HAM10000_images_part_1.zip", "zip", (".zip",)),
            _Wanted("HAM10000_images_part_2.zip", "zip", (".zip",)),
            _Wanted("HAM10000_metadata.csv", "table", (".csv", ".tab", "")),
        ),
    ),
}


@dataclass
class FetchedFile:
    """One file of the result: where it came from and how it was checked."""

    name: str
    size: int
    algorithm: str | None  # md5 | sha1 | sha256 | sha512, None when not verified
    digest: str | None
    verified: bool
    source: str
    skipped: bool = False  # finished by an earlier run

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "algorithm": self.algorithm, "digest": self.digest,
                "verified": self.verified, "source": self.source}


@dataclass
class FetchResult:
    dest: Path
    files: list[FetchedFile] = field(default_factory=list)
    n_images: int = 0
    bytes_downloaded: int = 0
    resumed: bool = False
    #: the data set's licence (shown by `data fetch`, recorded in what is trained on it)
    licence: DataLicence | None = None
    #: the licence the Dataverse listing states, when it states one (latestVersion.license.name)
    licence_at_source: str | None = None


@dataclass
class _Remote:
    """A file to download (or, with archives, to take from a folder)."""

    wanted: _Wanted
    url: str
    size: int | None = None
    algorithm: str | None = None
    digest: str | None = None
    source_name: str = ""  # name at the source (e.g. HAM10000_metadata.tab)
    ingested: bool = False


class _Cut(Exception):
    """A transfer stopped early; it can be resumed."""


class _Unreachable(Exception):
    """The server cannot be reached at all (name lookup, refused, connect timeout)."""


# ----------------------------------------------------------------- locations

def default_data_dir(name: str = "ham10000") -> Path:
    """Where ``edgeskin data fetch`` puts a data set by default:
    ``$EDGESKIN_HOME/data/NAME`` if EDGESKIN_HOME is set, else ``$XDG_DATA_HOME/edgeskin/data/NAME``
    (``~/.local/share/edgeskin/data/NAME`` when XDG_DATA_HOME is unset or not absolute)."""
    home = os.environ.get("EDGESKIN_HOME")
    if home:
        return Path(home).expanduser() / "data" / name
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "edgeskin" / "data" / name


def resolve_data_path(given: Path | None, recipe_path: Path | None = None) -> tuple[Path, str]:
    """The data folder and where it came from: --data, the recipe, $EDGESKIN_DATA, the default folder."""
    if given is not None:
        return given, "--data"
    if recipe_path is not None:
        return recipe_path, "recipe [data] path"
    env = os.environ.get("EDGESKIN_DATA")
    if env:
        return Path(env), "EDGESKIN_DATA"
    d = default_data_dir()
    if d.exists():
        return d, "default folder"
    raise DataError("no data given and none in the default folder " + str(d),
                    "pass --data DIR, set EDGESKIN_DATA, or run `edgeskin data fetch ham10000` to download it there")


def _spec(name: str) -> _DatasetSpec:
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise DataError(f"unknown data set {name!r}", f"choose one of: {', '.join(DATASETS)}")
    return spec


def _layout(spec: _DatasetSpec, dest: Path) -> str:
    parts = []
    for w in spec.files:
        parts.append(f"{dest / w.stem}/ISIC_*.jpg (unzipped {w.name})" if w.kind == "zip" else str(dest / w.name))
    return ", ".join(parts)


def _by_hand_hint(spec: _DatasetSpec, dest: Path) -> str:
    names = ", ".join(w.name if w.kind == "zip" else f"{w.stem} (as CSV: 'Original File Format')" for w in spec.files)
    return (f"download by hand from https://doi.org/{spec.doi.removeprefix('doi:')}: {names}; then either "
            f"put them in place as {_layout(spec, dest)}, or run `edgeskin data fetch {spec.name} "
            f"--archives DIR --dest {dest}` to unpack the downloaded files from DIR")


# ----------------------------------------------------------------- hashing and bookkeeping

def _algo(name: str | None) -> str | None:
    if not name:
        return None
    return _ALGOS.get(name.lower().replace("-", "").replace("_", ""))


def _digest_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, **_NOT_FOR_SECURITY)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def human_bytes(n: int | None) -> str:
    """1234567 -> '1.2 MB'."""
    if n is None:
        return "size unknown"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{n} B"


def _read_done(dl: Path) -> dict[str, Any]:
    try:
        data = json.loads((dl / DONE_FILE).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


def _output_of(w: _Wanted, dest: Path) -> Path:
    return dest / w.stem if w.kind == "zip" else dest / w.name


def _is_done(w: _Wanted, dest: Path, done: dict[str, Any]) -> bool:
    out = _output_of(w, dest)
    return w.name in done["files"] and (out.is_dir() if w.kind == "zip" else out.is_file())


# ----------------------------------------------------------------- HTTP

def _classify(exc: BaseException) -> BaseException:
    """Map a urllib/socket error to _Unreachable (do not retry) or _Cut (resume)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError) else None
    if reason is not None:
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)):
            return _Unreachable(str(reason))
        if isinstance(reason, ssl.SSLCertVerificationError):
            return _Unreachable(f"TLS certificate not accepted ({reason})")
        if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
            return _Unreachable(str(reason))
        return _Cut(str(reason))
    return _Cut(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _open(url: str, offset: int = 0) -> http.client.HTTPResponse:
    from .. import __version__

    headers = {"User-Agent": f"edgeskin/{__version__} (data fetch)", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=CONNECT_TIMEOUT)
    try:  # connected: allow a slower trickle of data than the connect timeout
        resp.fp.raw._sock.settimeout(READ_TIMEOUT)  # type: ignore[union-attr]
    except AttributeError:
        pass
    return resp


def _http_error(exc: urllib.error.HTTPError, what: str, hint: str) -> DataError:
    detail = ""
    try:
        body = exc.read(2000).decode("utf-8", "replace")
        detail = json.loads(body).get("message", "") if body.lstrip().startswith("{") else ""
    except Exception:  # noqa: BLE001 - best effort only
        pass
    msg = f"{what}: HTTP {exc.code} {exc.reason}" + (f" ({detail})" if detail else "")
    if exc.code in (401, 403):
        hint = "the server refuses anonymous downloads of this file; " + hint
    return DataError(msg, hint)


def _list_dataverse(spec: _DatasetSpec, server: str, dest: Path) -> tuple[list[_Remote], str | None]:
    """The files to download and the licence the listing states (None when it states none)."""
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "https://" + server
    if urllib.parse.urlsplit(server).scheme not in ("http", "https"):
        raise DataError(f"--server {server}: not an http(s) address", "e.g. --server https://dataverse.harvard.edu")
    url = (f"{server}/api/datasets/:persistentId/?persistentId="
           f"{urllib.parse.quote(spec.doi, safe=':/')}")
    try:
        with _open(url) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, f"{server}: cannot list {spec.doi}", _by_hand_hint(spec, dest)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        err = _classify(exc)
        raise DataError(f"cannot reach {server} ({err})", _by_hand_hint(spec, dest)) from None
    try:
        doc = json.loads(raw)
        if doc.get("status") != "OK":
            raise ValueError(doc.get("message", f"status {doc.get('status')!r}"))
        latest = doc["data"]["latestVersion"]
        entries = latest["files"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{url}: not a Dataverse dataset listing ({exc})",
                        "check --server (a Dataverse installation, e.g. https://dataverse.harvard.edu)") from None
    remotes: list[_Remote] = []
    for w in spec.files:
        found = None
        for e in entries:
            df = e.get("dataFile") or {}
            names = [n for n in (df.get("originalFileName"), df.get("filename"), e.get("label")) if n]
            if any(_matches(w, n) for n in names):
                found = df
                break
        if found is None:
            continue
        ingested = bool(found.get("originalFileName")) and w.kind == "table"
        ck = found.get("checksum") or {}
        algorithm, digest = _algo(ck.get("type")), ck.get("value")
        if not (algorithm and digest) and found.get("md5"):
            algorithm, digest = "md5", found["md5"]
        size = found.get("originalFileSize") if ingested else found.get("filesize")
        remotes.append(_Remote(
            wanted=w,
            url=f"{server}/api/access/datafile/{found['id']}" + ("?format=original" if ingested else ""),
            size=int(size) if size is not None else None,
            algorithm=algorithm, digest=(digest or "").lower() or None,
            source_name=found.get("originalFileName") if ingested else found.get("filename", w.name),
            ingested=ingested,
        ))
    missing = [w.name for w in spec.files if w.name not in {r.wanted.name for r in remotes}]
    if missing:
        raise DataError(f"{server}: {spec.doi} does not list {', '.join(missing)}",
                        "the record may have changed; " + _by_hand_hint(spec, dest))
    lic = latest.get("license")  # Dataverse 5.10+: {"name": "CC BY-NC 4.0", "uri": ...}
    stated = lic.get("name") if isinstance(lic, dict) else (lic if isinstance(lic, str) else None)
    return remotes, (str(stated) if stated else None)


def _matches(w: _Wanted, filename: str) -> bool:
    base = PurePosixPath(filename.replace("\\", "/")).name
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    return stem == w.stem and (f".{ext}" if ext else "").lower() in w.extensions


def _read_manifest(path: Path, spec: _DatasetSpec, dest: Path) -> list[_Remote]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found", "pass a JSON file listing name, url and sha256 or md5") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a JSON file ({exc})", "the manifest is a JSON list of {name, url, size, sha256|md5}") from None
    base = ""
    items = doc
    if isinstance(doc, dict):
        base, items = str(doc.get("base_url", "")), doc.get("files")
    if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("name") for i in items):
        raise DataError(f"{path}: expected a list of {{name, url, size?, sha256?|md5?}}",
                        'e.g. [{"name": "HAM10000_images_part_1.zip", "url": "https://...", "sha256": "..."}]')
    remotes: list[_Remote] = []
    for w in spec.files:
        item = next((i for i in items if _matches(w, str(i["name"]))), None)
        if item is None:
            continue
        algorithm = digest = None
        for key in ("sha256", "sha512", "sha1", "md5"):
            if item.get(key):
                algorithm, digest = key, str(item[key]).lower()
                break
        url = str(item.get("url") or "")
        remotes.append(_Remote(w, urllib.parse.urljoin(base, url) if base else url,
                               int(item["size"]) if item.get("size") is not None else None,
                               algorithm, digest, str(item["name"])))
    return remotes


# ----------------------------------------------------------------- download

class _Downloader:
    def __init__(self, reporter: Reporter, retries: int, spec: _DatasetSpec, dest: Path) -> None:
        self.reporter = reporter
        self.retries = max(0, int(retries))
        self.spec = spec
        self.dest = dest
        self.bytes = 0
        self.resumed = False

    def fetch(self, r: _Remote, part: Path) -> None:
        """Download ``r`` into ``part`` (resuming what is there) until it is complete."""
        name = r.wanted.name
        if not r.url:
            raise DataError(f"{name}: no url to download from", "give each manifest entry a url")
        attempt = 0
        started = False
        try:
            while True:
                offset = part.stat().st_size if part.exists() else 0
                if r.size is not None and offset > r.size:
                    part.unlink()
                    offset = 0
                if r.size is not None and offset == r.size:
                    break
                if not started:
                    self.reporter.start(f"{name} ({human_bytes(r.size)})", r.size)
                    self.reporter.advance(offset)
                    started = True
                try:
                    if self._transfer(r, part, offset):
                        break
                    reason = "the connection closed before the end of the file"
                except _Cut as exc:
                    reason = str(exc)
                except _Unreachable as exc:
                    kept = part.stat().st_size if part.exists() else 0
                    raise DataError(
                        f"cannot reach the server for {name} ({exc})"
                        + (f"; {kept} bytes kept in {part}, running the same command again resumes" if kept else ""),
                        _by_hand_hint(self.spec, self.dest)) from None
                attempt += 1
                kept = part.stat().st_size if part.exists() else 0
                if attempt > self.retries:
                    raise DataError(
                        f"download of {name} interrupted ({reason}) after {self.retries} "
                        f"retr{'y' if self.retries == 1 else 'ies'}; {kept} of "
                        f"{r.size if r.size is not None else '?'} bytes are kept in {part}: running the same "
                        "command again resumes from there",
                        "for a flaky connection raise --retries; or " + _by_hand_hint(self.spec, self.dest))
                self.reporter.message(f"{name}: {reason}; resuming at byte {kept} (retry {attempt}/{self.retries})")
                time.sleep(min(MAX_WAIT, RETRY_WAIT * 2 ** (attempt - 1)))
        finally:
            self.reporter.stop()

    def _transfer(self, r: _Remote, part: Path, offset: int) -> bool:
        """One request. True when the file is complete, False when the body ended early."""
        try:
            resp = _open(r.url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # range not satisfiable: what we have is all there is
                if r.size is None or offset >= r.size:
                    return True
                part.unlink()
                raise _Cut("the server refused to resume; starting again") from None
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Cut(f"HTTP {exc.code} {exc.reason}") from None
            raise _http_error(exc, f"{r.url}: cannot download {r.wanted.name}", _by_hand_hint(self.spec, self.dest)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _classify(exc) from None
        except ValueError as exc:  # not a URL urllib can open
            raise DataError(f"{r.wanted.name}: cannot download {r.url!r} ({exc})",
                            "give an http(s) url (check the manifest)") from None
        with resp:
            expected_end: int | None = None
            length = resp.headers.get("Content-Length")
            if offset and resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range", ""))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise _Cut(f"the server resumed at byte {start} instead of {offset}; starting again")
                self.resumed = True
                expected_end = total
                mode = "ab"
            else:
                if offset:  # 200 to a Range request: the whole file again
                    self.reporter.start(f"{r.wanted.name} ({human_bytes(r.size)}, again from the start)", r.size)
                offset = 0
                mode = "wb"
            if expected_end is None and length is not None and length.isdigit():
                expected_end = offset + int(length)
            if expected_end is None:
                expected_end = r.size
            part.parent.mkdir(parents=True, exist_ok=True)
            pos = offset
            try:
                with open(part, mode) as f:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        pos += len(block)
                        self.bytes += len(block)
                        self.reporter.advance(len(block))
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DataError(f"{part}: disk full", "free some space and run the same command again to resume") from None
                raise _classify(exc) from None
        return expected_end is None or pos >= expected_end


def _content_range(value: str) -> tuple[int, int | None]:
    """'bytes 100-199/200' -> (100, 200)."""
    try:
        unit, _, rest = value.strip().partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-")[0])
        return start, (int(total) if total.strip().isdigit() else None)
    except (ValueError, IndexError):
        return -1, None


# ----------------------------------------------------------------- unpacking

def _safe_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    out = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        p = PurePosixPath(name)
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise DataError(f"{archive}: unsafe member {info.filename!r} (absolute path or '..')",
                            "this archive would write outside its folder; download it again from the official source")
        if info.is_dir() or not p.parts or p.parts[0] == "__MACOSX":
            continue
        out.append((info, p))
    return out


def _unpack(archive: Path, target: Path, reporter: Reporter) -> int:
    """Unpack ``archive`` into ``target`` through a temporary folder; returns the file count."""
    tmp = target.parent / DOWNLOAD_DIR / f"{target.name}.unpacking"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _safe_members(zf, archive)
            tops = {p.parts[0] for _, p in members}
            strip = len(tops) == 1 and tops == {target.name} and all(len(p.parts) > 1 for _, p in members)
            reporter.start(f"unpacking {archive.name}", len(members))
            for info, p in members:
                rel = PurePosixPath(*p.parts[1:]) if strip else p
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                reporter.advance(1)
            reporter.stop()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        reporter.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive}: not a readable zip file ({exc})",
                        "delete it and download it again") from None
    except BaseException:
        reporter.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    tmp.mkdir(exist_ok=True)
    os.replace(tmp, target)
    return len(members)


def _save_table(src: Path, target: Path) -> None:
    """Write the metadata as CSV: a tab-separated copy (Dataverse's .tab) is converted."""
    with open(src, "rb") as f:
        head = f.readline().decode("utf-8-sig", "replace")
    with atomic_path(target) as tmp:
        if "\t" in head and "," not in head:
            with open(src, newline="", encoding="utf-8-sig") as fin, open(tmp, "w", newline="", encoding="utf-8") as fout:
                w = csv.writer(fout)
                for row in csv.reader(fin, delimiter="\t"):
                    w.writerow(row)
        else:
            shutil.copyfile(src, tmp)


# ----------------------------------------------------------------- the whole fetch

def fetch_dataset(
    name: str,
    dest: Path,
    *,
    server: str | None = None,
    manifest: Path | None = None,
    archives: Path | None = None,
    retries: int = 3,
    verify: bool = True,
    reporter: Reporter | None = None,
) -> FetchResult:
    """Download (or take from ``archives``), verify and unpack data set ``name`` into ``dest``,
    then check that :func:`edgeskin.data.load_dataset` reads it.

    ``server``: a Dataverse installation (default: the official one); ``manifest``: a JSON list of
    ``{name, url, size?, sha256?|md5?}`` used instead of the Dataverse listing (with ``archives``,
    only its checksums are used). Unverifiable files are refused unless ``verify=False``.
    Raises :class:`DataError` (message + hint) for every user-facing failure.
    """
    spec = _spec(name)
    rep: Reporter = reporter or NullReporter()
    dest = Path(dest).expanduser()
    dl = dest / DOWNLOAD_DIR
    dl.mkdir(parents=True, exist_ok=True)
    done = _read_done(dl)
    result = FetchResult(dest=dest, licence=spec.licence)

    todo = [w for w in spec.files if not _is_done(w, dest, done)]
    for w in spec.files:
        if w not in todo:
            rec = done["files"][w.name]
            result.files.append(FetchedFile(w.name, int(rec.get("size") or 0), rec.get("algorithm"), rec.get("digest"),
                                            bool(rec.get("verified")), str(rec.get("source", "")), skipped=True))
            rep.message(f"{w.name}: already fetched, skipped")

    if todo:
        remotes: dict[str, _Remote] = {}
        if manifest is not None:
            remotes = {r.wanted.name: r for r in _read_manifest(manifest, spec, dest)}
        if archives is not None:
            _from_archives(spec, todo, Path(archives).expanduser(), remotes, dest, dl, done, result, rep, verify)
        else:
            if manifest is None:
                listed, result.licence_at_source = _list_dataverse(spec, server or spec.server, dest)
                remotes = {r.wanted.name: r for r in listed}
            missing = [w.name for w in todo if w.name not in remotes]
            if missing:
                raise DataError(f"{manifest}: no entry for {', '.join(missing)}",
                                f"list every file of {spec.name}: {', '.join(w.name for w in spec.files)}")
            _check_space(dest, [remotes[w.name] for w in todo], dl)
            dler = _Downloader(rep, retries, spec, dest)
            try:
                for w in todo:
                    _download_one(remotes[w.name], dest, dl, done, result, rep, dler, verify)
            finally:
                result.bytes_downloaded = dler.bytes
                result.resumed = dler.resumed

    from .readers import load_dataset

    try:
        ds = load_dataset(dest)
    except DataError as exc:
        raise DataError(f"{dest}: fetched, but the data set does not read: {exc.message}",
                        exc.hint or "delete the folder and fetch again") from None
    result.n_images = len(ds)
    _write_licence(dest, spec.licence)
    return result


def _write_licence(dest: Path, lic: DataLicence) -> None:
    """``DEST/DATA_LICENCE.txt``: the terms beside the images, for whoever copies the folder on."""
    text = f"{lic.dataset}: {lic.name} ({lic.spdx})\n{lic.url}\n\nCite: {lic.attribution}\n\n{lic.notice}\n"
    path = dest / LICENCE_FILE
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _record(done: dict[str, Any], dl: Path, f: FetchedFile) -> None:
    done["files"][f.name] = f.to_dict()
    write_json(dl / DONE_FILE, done)


def _check_space(dest: Path, remotes: list[_Remote], dl: Path) -> None:
    need = 0
    for r in remotes:
        if r.size is None:
            return
        have = 0
        for p in (dl / f"{r.wanted.name}.part", dl / r.wanted.name):
            if p.exists():
                have = max(have, p.stat().st_size)
        need += (r.size - have) + (r.size if r.wanted.kind == "zip" else 0)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise DataError(f"{dest}: needs about {human_bytes(need)} free (downloads + unpacked images), {human_bytes(free)} free",
                        "free some space or pass --dest on a larger disk")


def _verify(path: Path, r: _Remote, verify: bool, *, delete: bool) -> tuple[str | None, str | None, bool]:
    """Check ``path`` against ``r``'s checksum. Returns (algorithm, digest, verified)."""
    name = r.wanted.name
    if not verify:
        return None, None, False
    if not (r.algorithm and r.digest):
        if delete:
            path.unlink(missing_ok=True)
        raise DataError(f"{name}: the source publishes no checksum, so it cannot be verified",
                        "use a source that gives sha256 or md5 (a --manifest), or pass --no-verify to accept it unchecked")
    actual = _digest_file(path, r.algorithm)
    if actual != r.digest:
        if delete:
            path.unlink(missing_ok=True)
        hint = ("the download was corrupted or the file changed at the source; run the command again to download "
                "it afresh" if delete else "the file differs from the published one; download it again")
        if r.ingested:
            hint += ("; Dataverse sometimes publishes a checksum that matches neither form of an ingested table "
                     "(IQSS/dataverse#9501): --no-verify accepts it (the table is still checked by reading it)")
        raise DataError(f"{name}: {r.algorithm} mismatch (expected {r.digest}, got {actual}); "
                        + ("the download was deleted" if delete else "nothing was unpacked"), hint)
    return r.algorithm, actual, True


def _install(r: _Remote, src: Path, dest: Path, rep: Reporter) -> None:
    w = r.wanted
    if w.kind == "zip":
        _unpack(src, dest / w.stem, rep)
    else:
        _save_table(src, dest / w.name)


def _download_one(r: _Remote, dest: Path, dl: Path, done: dict[str, Any], result: FetchResult, rep: Reporter,
                  dler: _Downloader, verify: bool) -> None:
    w = r.wanted
    complete = dl / w.name  # verified by an earlier run, not yet unpacked
    part = dl / f"{w.name}.part"
    if complete.exists():
        try:
            algorithm, digest, ok = _verify(complete, r, verify, delete=True)
        except DataError:
            algorithm = None  # stale or damaged: fetch again
            complete.unlink(missing_ok=True)
        else:
            rep.message(f"{w.name}: downloaded earlier, unpacking")
    if not complete.exists():
        dler.fetch(r, part)
        algorithm, digest, ok = _verify(part, r, verify, delete=True)
        os.replace(part, complete)
    size = complete.stat().st_size
    _install(r, complete, dest, rep)
    f = FetchedFile(w.name, size, algorithm, digest, ok, r.url)
    _record(done, dl, f)
    complete.unlink(missing_ok=True)
    result.files.append(f)
    rep.message(f"{w.name}: {human_bytes(size)}, " + (f"{algorithm} verified" if ok else "NOT verified (--no-verify)"))


def _from_archives(spec: _DatasetSpec, todo: list[_Wanted], folder: Path, checks: dict[str, _Remote], dest: Path,
                   dl: Path, done: dict[str, Any], result: FetchResult, rep: Reporter, verify: bool) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found", "pass --archives DIR, the folder holding the downloaded files")
    found: dict[str, Path] = {}
    for w in todo:
        for p in sorted(folder.iterdir()):
            if p.is_file() and _matches(w, p.name):
                found[w.name] = p
                break
    missing = [w.name for w in todo if w.name not in found]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}", _by_hand_hint(spec, dest))
    for w in todo:
        src = found[w.name]
        r = checks.get(w.name) or _Remote(w, "")
        if r.algorithm and r.digest and verify:
            algorithm, digest, ok = _verify(src, r, True, delete=False)
        else:
            algorithm, digest, ok = "sha256", _digest_file(src, "sha256"), False
        _install(r, src, dest, rep)
        f = FetchedFile(w.name, src.stat().st_size, algorithm, digest, ok, str(src))
        _record(done, dl, f)
        result.files.append(f)
        rep.message(f"{w.name}: from {src}, " + (f"{algorithm} verified" if ok else
                                                  "checksum NOT verified (no checksum given: pass --manifest "
                                                  "with sha256 or md5 to verify)"))
