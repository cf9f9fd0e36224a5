"""Obtaining raw data safely, shared by the real-dataset modules.

- `download`: streamed HTTP(S) download with a tqdm bar, resume through HTTP Range, retries with back-off, written to
  `<name>.part` and renamed to `<name>` only after the size and checksum pass (a failed checksum deletes the partial
  file). Credentials travel only in request headers, are dropped on redirects to another host and never appear in
  messages.
- `safe_extract`: zip, tar and (multi-part) 7z extraction that first checks every entry and refuses the whole archive
  if one is absolute, climbs out with `..`, or is a symlink, hard link or device.
- Preparation helpers used by deepglobe/inria/cityscapes/urur: the raw-data folder (`<data_root>/raw/<dataset>/`, never
  inside the prepared output that DVC deletes), the overwrite guard (`--force`), problem reports by file name
  (`--allow-incomplete`), the worker pool with progress, atomic PNG writes and meta.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.base import SPLITS, DatasetError, write_split

CHUNK = 1 << 20
USER_AGENT = "uhrbench/1 (+https://github.com/)"
SPLITS_DIR = Path(__file__).resolve().parent / "splits"
RETRY_BACKOFF = 2.0  # seconds before the first retry, doubled each time (tests lower it)


class DownloadAuthError(DatasetError):
    """The server refused the request (HTTP 401/403): credentials missing, wrong, or terms not accepted."""


class _Truncated(OSError):
    """The connection ended before the announced number of bytes arrived (resumable)."""


# --------------------------------------------------------------------------------------------------- download
class _NoLeakRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, never forwarding Authorization or Cookie headers to another host (e.g. a signed URL)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 (urllib API)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            for name in ("Authorization", "Cookie"):
                new.remove_header(name)
        return new


def opener(*handlers) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoLeakRedirect(), *handlers)


def public_url(url: str) -> str:
    """The URL without query string or user info, safe to print (signed URLs carry tokens in the query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def file_md5(path: Path, progress: bool = False) -> str:
    digest = hashlib.md5()
    path = Path(path)
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"md5 {path.name}", disable=not progress, leave=False) as bar:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _check_file(path: Path, name: str, size: int | None, md5: str | None, progress: bool) -> str | None:
    """None when the file matches, otherwise what is wrong."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} B, expected {size} B"
    if md5:
        got = file_md5(path, progress)
        if got.lower() != md5.lower():
            return f"md5 {got}, expected {md5}"
    return None


def _fetch_once(url: str, part: Path, headers: Mapping[str, str], timeout: float, progress: bool, desc: str,
                open_url: urllib.request.OpenerDirector) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = open_url.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part file is complete (checked by the caller)
            return
        raise
    with response:
        status = response.status
        if have and status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match.group(1)) != have:
                raise _Truncated(f"server answered a resume with an unexpected range '{content_range}'")
            mode = "ab"
        else:  # a plain 200: the server ignores Range, start again
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        received = 0
        with open(part, mode) as out, tqdm(total=None if remaining is None else have + remaining, initial=have,
                                           unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                                           disable=not progress) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except http.client.IncompleteRead as exc:
                    out.write(exc.partial)
                    raise _Truncated(str(exc)) from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if remaining is not None and received < remaining:
            raise _Truncated(f"connection closed after {have + received} of {have + remaining} bytes")


def download(url: str, dest: str | Path, *, md5: str | None = None, size: int | None = None,
             headers: Mapping[str, str] | None = None, retries: int = 4, backoff: float | None = None,
             timeout: float = 60.0,
             progress: bool = True, open_url: urllib.request.OpenerDirector | None = None) -> Path:
    """Download `url` to `dest`; resumable, retried, verified. Returns `dest`.

    An existing `dest` that passes the checks is kept (nothing is downloaded). Bytes go to `dest.part` first; an
    interrupted run leaves it behind and the next call resumes it with an HTTP Range request. When the transfer is
    complete the size and md5 (if given) are checked; on a mismatch the partial file is deleted and DatasetError names
    the file, the expected and the actual value. HTTP 401/403 raise DownloadAuthError (no retry).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    headers = dict(headers or {})
    backoff = RETRY_BACKOFF if backoff is None else backoff
    open_url = open_url or opener()
    if dest.is_file():
        problem = _check_file(dest, dest.name, size, md5, progress)
        if problem is None:
            return dest
        print(f"{dest}: {problem}; downloading it again", file=sys.stderr)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    shown = public_url(url)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, headers, timeout, progress, dest.name, open_url)
            break
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise DownloadAuthError(f"{shown} refused the download of {dest.name} (HTTP {exc.code}); check the "
                                        "credentials and that you accepted the dataset's terms on its web site"
                                        ) from None
            if exc.code == 404 or (400 <= exc.code < 500 and exc.code not in (408, 429)):
                raise DatasetError(f"cannot download {dest.name}: {shown} answered HTTP {exc.code} {exc.reason}; "
                                   "check the URL (or use --source with a local copy)") from None
            error: Exception = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            error = exc
        if attempt == retries:
            kept = f"; {part.stat().st_size} B kept in {part}, re-run to resume" if part.exists() else ""
            raise DatasetError(f"cannot download {dest.name} from {shown} after {retries + 1} attempts "
                               f"({error}){kept}") from None
        wait = backoff * 2 ** attempt
        print(f"{dest.name}: {error}; retrying in {wait:.0f} s (resuming)", file=sys.stderr)
        time.sleep(wait)
    if not part.exists():  # e.g. an empty 416 answer with no part file
        part.touch()
    problem = _check_file(part, dest.name, size, md5, progress)
    if problem is not None:
        part.unlink()
        raise DatasetError(f"checksum failed for {dest.name} downloaded from {shown}: {problem}; the partial file "
                           "was deleted, re-run to download it again")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------- extraction
def _safe_name(name: str, archive: Path) -> str:
    """The entry's relative path, or DatasetError if it is absolute or climbs out with `..`."""
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise DatasetError(f"{archive.name}: entry '{name}' has an absolute path; refusing to extract this archive "
                           "(it may be corrupt or malicious)")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{archive.name}: entry '{name}' escapes the target folder with '..'; refusing to extract "
                           "this archive (it may be corrupt or malicious)")
    return "/".join(parts)


def _refuse_link(name: str, kind: str, archive: Path) -> None:
    raise DatasetError(f"{archive.name}: entry '{name}' is a {kind}; refusing to extract this archive (links could "
                       "point outside the target folder)")


def is_7z(path: Path) -> bool:
    return bool(re.search(r"\.7z(\.0*1)?$", path.name, re.IGNORECASE))


def _volumes(path: Path) -> list[Path]:
    """The volumes of a multi-part 7z given its first one (`x.7z.001`), in order; [path] for a single file."""
    match = re.search(r"\.7z\.(0*1)$", path.name, re.IGNORECASE)
    return sorted(path.parent.glob(path.name[: -len(match.group(1))] + "*")) if match else [path]


def _open_7z(path: Path):
    import py7zr  # optional dependency: only the Inria archive needs it

    match = re.search(r"\.7z\.(0*1)$", path.name, re.IGNORECASE)
    if match:
        import multivolumefile

        base = path.with_name(path.name[: -len(match.group(1)) - 1])
        parts = sorted(path.parent.glob(base.name + ".*"))
        return py7zr.SevenZipFile(multivolumefile.MultiVolume(base, mode="rb", ext_digits=len(match.group(1))),
                                  mode="r"), parts
    return py7zr.SevenZipFile(path, mode="r"), [path]


def _write_stream(src, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    os.replace(tmp, out)


def _extract_7z(sz, archive: Path, target: Path, select, destination, progress: bool) -> list[Path]:
    """safe_extract's 7z branch: every entry checked, then the selected ones extracted."""
    names, written = [], []
    for entry in sz.files:
        name = _safe_name(entry.filename, archive)
        if entry.is_symlink or entry.is_junction:
            _refuse_link(entry.filename, "symbolic link", archive)
        if entry.is_socket:
            _refuse_link(entry.filename, "socket", archive)
        if not entry.is_directory and name and select(name):
            names.append((entry.filename, name))
    if names:
        tmp = target / ".extract.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"extracting {len(names)} file(s) from {archive.name} ...", file=sys.stderr)
        sz.extract(path=tmp, targets=[n for n, _ in names])
        for original, name in names:
            out = destination(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / original, out)
            written.append(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def safe_extract(archive: str | Path, target: str | Path, *, select: Callable[[str], bool] | None = None,
                 progress: bool = True) -> list[Path]:
    """Extract the regular files of a zip / tar / 7z (`x.7z.001` = multi-part) archive whose names pass `select`.

    Every entry (selected or not) is checked first; one absolute path, `..` component, symlink, hard link or device
    refuses the whole archive with DatasetError naming the entry. Returns the extracted files.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist; check --source")
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    select = select or (lambda name: True)
    written: list[Path] = []

    def destination(name: str) -> Path:
        out = (root / name).resolve()
        if out != root and root not in out.parents:
            raise DatasetError(f"{archive.name}: entry '{name}' resolves outside {target}; refusing to extract")
        return out

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = []
            for info in zf.infolist():
                name = _safe_name(info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    _refuse_link(info.filename, "symbolic link", archive)
                if not info.is_dir() and name and select(name):
                    members.append((info, name))
            for info, name in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
                out = destination(name)
                with zf.open(info) as src:
                    _write_stream(src, out)
                written.append(out)
        return written
    if is_7z(archive):
        try:
            import py7zr
        except ImportError:
            raise DatasetError(f"{archive.name} is a 7z archive and py7zr is not installed; "
                               "`pip install -r requirements.txt`") from None
        try:
            sz, _parts = _open_7z(archive)
            with sz:
                return _extract_7z(sz, archive, target, select, destination, progress)
        except (OSError, EOFError, ValueError, KeyError, RuntimeError, py7zr.exceptions.ArchiveError) as exc:
            if isinstance(exc, DatasetError) or fatal_write_error(exc):
                raise
            present = ", ".join(p.name for p in _volumes(archive))
            raise DatasetError(f"{archive.name} cannot be read ({str(exc)[:120] or exc.__class__.__name__}): a 7z "
                               f"volume is missing or truncated (present: {present}); download the volumes "
                               "again") from None
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = []
            for member in tf.getmembers():
                name = _safe_name(member.name, archive)
                if member.issym():
                    _refuse_link(member.name, "symbolic link", archive)
                if member.islnk():
                    _refuse_link(member.name, "hard link", archive)
                if member.isdev():
                    _refuse_link(member.name, "device or fifo", archive)
                if member.isfile() and name and select(name):
                    members.append((member, name))
            for member, name in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
                out = destination(name)
                src = tf.extractfile(member)
                with src:
                    _write_stream(src, out)
                written.append(out)
        return written
    raise DatasetError(f"{archive} is not a zip, tar or 7z archive; pass the archive or the extracted folder")


def archive_md5(archive: Path, progress: bool = True) -> str:
    """The content checksum of an archive; of all its volumes, in order, for a multi-part 7z."""
    parts = _volumes(Path(archive))
    if len(parts) == 1:
        return file_md5(parts[0], progress)
    return hashlib.md5("".join(file_md5(p, progress) for p in parts).encode()).hexdigest()


def extract_once(archive: Path, target: Path, *, select: Callable[[str], bool] | None = None,
                 progress: bool = True) -> Path:
    """safe_extract into an emptied `target` unless its marker holds this archive's content checksum: a changed
    archive of the same name is never extracted over stale files."""
    archive = Path(archive)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist; check --source")
    marker = target / ".extracted.json"
    stamp = {"archive": archive.name, "md5": archive_md5(archive, progress)}
    if marker.is_file():
        with contextlib.suppress(ValueError):
            if json.loads(marker.read_text()) == stamp:
                return target
    shutil.rmtree(target, ignore_errors=True)
    safe_extract(archive, target, select=select, progress=progress)
    marker.write_text(json.dumps(stamp))
    return target


# --------------------------------------------------------------------------------------------------- preparation
def raw_dir(out_dir: Path, name: str, raw_root: str | Path | None = None) -> Path:
    """Where downloads and extracted raw files live: `<data_root>/raw/<name>/` (outside the prepared output)."""
    path = Path(raw_root) if raw_root else Path(out_dir).resolve().parent / "raw" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def guard_output(out_dir: Path, name: str, force: bool) -> None:
    """Refuse to overwrite a prepared dataset (meta.json, written last, marks one) unless `force`; then clear the
    output (with `force`, or the leftovers of an interrupted run, which never wrote meta.json)."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists() and not force:
        raise DatasetError(f"{out_dir} already holds a prepared {name} dataset; pass --force to overwrite it "
                           "(or delete the folder)")
    (out_dir / "meta.json").unlink(missing_ok=True)
    for sub in ("images", "labels", "splits"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for sub in ("images", "labels", "splits"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def source_path(source: str | Path, name: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"--source {path} does not exist; pass the {name} archive or its extracted folder")
    if not (path.is_file() or path.is_dir()):
        raise DatasetError(f"--source {path} is not a regular file or folder (a device, fifo or socket"
                           f"{' behind a symbolic link' if path.is_symlink() else ''}); pass the {name} archive or its "
                           "extracted folder")
    return path


# the PIL modes label files arrive in, as a reader would name them
MODE_TEXT = {"1": "1-bit", "L": "8-bit greyscale", "P": "8-bit palette", "RGB": "8-bit RGB", "RGBA": "RGB with alpha",
             "LA": "greyscale with alpha", "I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit integer",
             "F": "32-bit float", "CMYK": "CMYK"}


def read_label(path: Path, modes: tuple[str, ...], expected: str) -> np.ndarray:
    """A label file as an array, only in its dataset's official format (PIL `modes`): anything else (16-bit,
    greyscale where RGB is official, alpha) is refused naming the file and what was expected, never converted."""
    with Image.open(path) as img:
        if img.mode not in modes:
            raise ValueError(f"{Path(path).name}: {MODE_TEXT.get(img.mode, img.mode)} ({img.mode}) label file, "
                             f"expected {expected}")
        return np.asarray(img)


def fatal_write_error(exc: BaseException) -> bool:
    """A failure to write (full disk, read-only or forbidden folder): the run stops with it, never blamed on one
    source file."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                      errno.EPERM)


def tile_index(entries: Iterable[tuple[str, str, Path]], root: Path) -> dict[str, dict[str, Path]]:
    """id -> {kind: path} from (id, kind, path) entries; an id with two files of one kind (a backup folder beside
    the official one) is refused with the list of duplicates, never first-found-wins."""
    found: dict[str, dict[str, Path]] = {}
    duplicates = []
    for tile, kind, path in entries:
        if kind in found.setdefault(tile, {}):
            duplicates.append(f"{found[tile][kind].relative_to(root)} and {Path(path).relative_to(root)}")
        else:
            found[tile][kind] = Path(path)
    if duplicates:
        head = "; ".join(duplicates[:4]) + (f"; and {len(duplicates) - 4} more" if len(duplicates) > 4 else "")
        raise DatasetError(f"{root} holds {len(duplicates)} tile(s) twice: {head}; keep one copy of each (move "
                           "backups out of the source) and run again")
    return found


def load_split_lists(name: str, split_lists: Mapping[str, Iterable[str]] | str | Path | None) -> dict[str, list[str]]:
    """Standard split ids: the bundled datasets/splits/<name>_<split>.txt, a folder of such files, or a mapping."""
    if isinstance(split_lists, Mapping):
        return {s: [str(i) for i in split_lists.get(s, [])] for s in SPLITS}
    folder = Path(split_lists) if split_lists else SPLITS_DIR
    lists = {}
    for split in SPLITS:
        path = folder / f"{name}_{split}.txt"
        if not path.is_file():
            raise DatasetError(f"split list {path} is missing; restore it from datasets/splits/")
        lists[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lists


def info(message: str) -> None:
    """A note for the user (stderr, so it never mixes with machine-readable stdout)."""
    print(message, file=sys.stderr)


def check_problems(name: str, problems: list[str], where: Path, allow_incomplete: bool, report_dir: Path) -> None:
    """Every problem names its file. Without allow_incomplete any problem is an error (first line: the first few)."""
    if not problems:
        return
    report = Path(report_dir) / "problems.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("".join(f"{p}\n" for p in problems))
    head = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    if not allow_incomplete:
        raise DatasetError(f"{name} source {where} has {len(problems)} problem(s): {head} (full list in {report}); "
                           "fix the source, or pass --allow-incomplete to prepare only what is present")
    info(f"{name}: --allow-incomplete: skipping {len(problems)} problem(s): {head} (full list in {report})")


def image_size_problem(path: Path, expected_hw: tuple[int, int] | None) -> str | None:
    """Reads only the header. None when decodable and of the expected (H, W) (None = any size)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except OSError as exc:
        return f"{path.name}: cannot be decoded ({exc})"
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        return f"{path.name}: {w}x{h}, expected {expected_hw[1]}x{expected_hw[0]}"
    return None


def pair_problems(files: dict[str, Path], required: dict[str, tuple[str, str]],
                  expected_hw: tuple[int, int] | None) -> list[str]:
    """What is wrong with one image/label pair. `required` maps each kind (e.g. "image", "label") to (the
    message when that file is missing, the prefix of its size/decoding problem). Empty: the pair is usable."""
    problems = []
    for kind, (missing, where) in required.items():
        if kind not in files:
            problems.append(missing)
        elif problem := image_size_problem(files[kind], expected_hw):
            problems.append(f"{where}{problem}")
    return problems


def save_png(array: np.ndarray | Image.Image, path: Path, compress_level: int = 1) -> None:
    """Lossless PNG written to a temporary name then renamed (never a truncated file under the final name)."""
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # zlib level 1 with the RLE strategy: ~15% faster than the default strategy and no larger on imagery
        img.save(tmp, format="PNG", compress_level=compress_level, compress_type=zlib.Z_RLE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_pool(fn: Callable, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """fn over jobs on `workers` processes (ordered results), with a progress bar."""
    workers = max(1, min(int(workers), len(jobs) or 1))
    with multiprocessing.get_context().Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(fn, jobs) if pool else map(fn, jobs)
        return list(tqdm(results, total=len(jobs), desc=desc, unit="tile", disable=not progress))


def convert_tiles(fn: Callable, jobs: list, workers: int, name: str, progress: bool, out_dir: Path, where: Path,
                  allow_incomplete: bool, report_dir: Path) -> dict[str, dict]:
    """Run a dataset's per-tile converter over `jobs`; the outputs of a tile that failed are removed, the failures
    reported like any other problem (`check_problems`). Returns the results of the converted tiles by id."""
    results = run_pool(fn, jobs, workers, name, progress)
    failed = [r for r in results if r["error"]]
    for r in failed:
        for sub in ("images", "labels"):
            (Path(out_dir) / sub / f"{r['id']}.png").unlink(missing_ok=True)
    check_problems(name, [r["error"] for r in failed], where, allow_incomplete, report_dir)
    return {r["id"]: r for r in results if not r["error"]}


def class_pixel_totals(done: Mapping[str, dict], splits: Mapping[str, list[str]], names: list[str] | tuple[str, ...]
                       ) -> dict[str, dict[str, int]]:
    """Per split, the label pixels of each class (the converters' per-tile `counts`, in `names` order)."""
    return {s: dict(zip(names, map(int, np.sum([done[t]["counts"] for t in tiles], axis=0) if tiles
                                    else [0] * len(names)), strict=True)) for s, tiles in splits.items()}


def write_image_png(img: Image.Image, source: str | Path, target: Path) -> None:
    """The prepared image: an RGB PNG source is copied byte for byte (no re-encoding), anything else converted."""
    if img.format == "PNG" and img.mode == "RGB":
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    else:
        save_png(img.convert("RGB"), target)


def finish(out_dir: Path, name: str, info_dict: dict, splits: Mapping[str, list[str]], meta: dict) -> None:
    """Write the split lists, then meta.json last (an interrupted run never looks prepared)."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        write_split(out_dir, split, list(splits.get(split, [])))
    body = {"dataset": name, "info": info_dict, **meta}
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, out_dir / "meta.json")
