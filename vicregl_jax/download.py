"""Files over HTTP(S) into a local cache: downloaded once, resumed, and verified at every use.

  fetch(url, path) -> path     the file at path, downloaded first if absent

A download goes to `path.part` with a progress bar; an interrupted one (a dropped
connection, a killed process) resumes from the bytes already there with an HTTP Range
request, on the next attempt or the next call. A finished download must have the size the
server announced (Content-Length / Content-Range). Beside the file, `path.json` records its
address, size and sha256 when it first arrives (or when a file put there by hand is first
used); every later use checks the file's size and sha256 against that record, and a new
download whose sha256 differs from the record (the file changed on the server since) is
refused with nothing in the cache replaced. Every failure is one line that names the
address and where to put the file by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20  # bytes per read and per hash update
ATTEMPTS = 3  # a dropped connection is resumed this many times in one call


class DownloadError(ValueError):
    """A file could not be downloaded, or the cached file is not the one recorded."""


def sha256_of(path: str) -> str:
    """Returns the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(path: str) -> str:
    """Returns where the record (address, size, sha256) of a cached file is kept."""
    return path + ".json"


def read_record(path: str) -> dict | None:
    """Returns the record of a cached file, or None when it has none."""
    try:
        with open(record_path(path)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_record(path: str, record: dict) -> None:
    temporary = record_path(path) + ".tmp"
    with open(temporary, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(temporary, record_path(path))  # atomic: a record is whole or absent


def _by_hand(url: str, path: str) -> str:
    return f"put the file there by hand (curl -L -o {path} {url}) and run again"


def _total_size(response, resumed_from: int) -> int | None:
    """Returns the whole file's size the response announces (None when it does not)."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != resumed_from:
            raise http.client.HTTPException(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _attempt(url: str, part: str, *, progress: bool, timeout: float) -> tuple[int, int | None]:
    """Downloads (the rest of) url into part; returns (bytes in part, announced total size)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        # 416: the part already holds every byte (a download killed before its rename).
        total = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") if error.headers else "")
        if error.code == 416 and total and int(total.group(1)) == have:
            return have, have
        raise
    with response:
        if response.status != 206:
            have = 0  # the server ignored the Range: start again
        total = _total_size(response, have)
        bar = tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=os.path.basename(part[: -len(".part")]),
            disable=not progress,
            leave=False,
        )
        with open(part, "ab" if have else "wb") as f, bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return os.path.getsize(part), total


def download(url: str, part: str, *, progress: bool = True, timeout: float = 60.0, attempts: int = ATTEMPTS) -> int:
    """Returns the size of url's file, downloaded (or resumed) into part; raises DownloadError
    (the part kept, to resume) when the server fails, drops the connection every attempt or
    sends another size than it announced."""
    reason = ""
    for _ in range(attempts):
        try:
            size, total = _attempt(url, part, progress=progress, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code < 500:  # 404, 403...: trying again cannot help
                raise DownloadError(
                    f"could not download {url} (HTTP {error.code} {error.reason}): "
                    f"{_by_hand(url, part[: -len('.part')])}."
                ) from None
            reason = f"HTTP {error.code} {error.reason}"
            continue
        except (OSError, http.client.HTTPException) as error:
            reason = str(getattr(error, "reason", "") or error) or type(error).__name__
            if isinstance(error, urllib.error.URLError) and not os.path.exists(part):
                break  # no connection at all (offline, unknown host): trying again cannot help
            continue
        if total is None or size == total:
            return size
        reason = f"the connection closed after {size} of {total} bytes"
        if size > total:
            os.remove(part)  # more than announced: not a prefix of the file
    kept = (
        f"; the {os.path.getsize(part)} bytes received are kept in {part} and the next try resumes"
        if os.path.exists(part) and os.path.getsize(part)
        else ""
    )
    raise DownloadError(f"could not download {url} ({reason}){kept}; or {_by_hand(url, part[: -len('.part')])}.")


def check(path: str, record: dict) -> None:
    """Raises DownloadError when the file at path has another size or sha256 than its record."""
    size = os.path.getsize(path)
    if size != record["size"] or sha256_of(path) != record["sha256"]:
        what = f"{size} bytes, not {record['size']}" if size != record["size"] else "its sha256 differs"
        raise DownloadError(
            f"{path} is not the file downloaded from {record['url']} on {record['downloaded']} ({what}): it was "
            f"changed or damaged since; delete it to download it again."
        )


@contextlib.contextmanager
def _locked(path: str):
    """Holds an exclusive lock on path.lock (processes sharing the cache take turns); a
    read-only cache gets no lock, and works as long as it holds every file already."""
    try:
        handle = open(path + ".lock", "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fetch(url: str, path: str, *, progress: bool = True, timeout: float = 60.0) -> str:
    """Returns path, holding url's file: checked against its record when cached, else
    downloaded (resuming a part left by an earlier try) and recorded; raises DownloadError."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"cannot create the cache folder {folder} ({error.strerror}): make it writable or "
            "choose another cache folder."
        ) from None
    with _locked(path):
        record = read_record(path)
        if os.path.exists(path):
            if record is None:  # put there by hand: trusted on first use, checked from then on
                record = {
                    "url": url,
                    "size": os.path.getsize(path),
                    "sha256": sha256_of(path),
                    "downloaded": f"{_now()} (put there by hand)",
                }
                _write_or_explain(path, record, folder)
            check(path, record)
            return path
        if not os.access(folder, os.W_OK):
            raise DownloadError(
                f"cannot download {url} into the read-only cache folder {folder}: make it "
                f"writable, choose another cache folder, or {_by_hand(url, path)}."
            )
        part = path + ".part"
        size = download(url, part, progress=progress, timeout=timeout)
        digest = sha256_of(part)
        if record is not None and (digest != record["sha256"] or size != record["size"]):
            os.remove(part)
            raise DownloadError(
                f"refused {url}: it is not the file first downloaded on {record['downloaded']} "
                f"(sha256 {digest[:12]}... of {size} bytes, recorded {record['sha256'][:12]}... of {record['size']}); "
                f"nothing in the cache was changed. If the file was replaced on purpose, delete {record_path(path)} "
                "to accept the new one."
            )
        os.replace(part, path)
        if record is None:
            _write_or_explain(path, {"url": url, "size": size, "sha256": digest, "downloaded": _now()}, folder)
    return path


def _write_or_explain(path: str, record: dict, folder: str) -> None:
    try:
        _write_record(path, record)
    except OSError as error:
        raise DownloadError(
            f"cannot write {record_path(path)} in the cache folder {folder} ({error.strerror}): "
            "make it writable or choose another cache folder."
        ) from None
