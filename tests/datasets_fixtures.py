"""Test helpers for the real-dataset modules: a local HTTP server and tiny archives in the exact upstream layouts.

The server (http.server in a thread on 127.0.0.1) serves byte strings by path (query string included), honours Range
requests, can cut a response short once (to test resume), require a header (Kaggle basic auth), redirect (Kaggle's
signed storage URL, on another host name), and log in with a form and a cookie (cityscapes-dataset.com).
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
from PIL import Image

DEEPGLOBE_PALETTE = [(0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255),
                     (255, 255, 255)]


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    require: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (header, exact value)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute URL
    cut_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping the connection
    login: tuple[str, str] | None = None  # (username, password) accepted by POST /login
    cookie_paths: set[str] = field(default_factory=set)  # paths that need the session cookie
    log: list[tuple[str, str, dict]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    @property
    def state(self) -> ServerState:
        return self.server.state  # type: ignore[attr-defined]

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server API)
        st, path = self.state, self.path
        st.log.append(("GET", path, dict(self.headers)))
        if path == "/login":
            return self._send(200, b"<form>login</form>")
        if path in st.require:
            header, value = st.require[path]
            if self.headers.get(header) != value:
                return self._send(401, b"unauthorised")
        if path in st.cookie_paths and "session=ok" not in (self.headers.get("Cookie") or ""):
            return self._send(302, b"", {"Location": "/login"})
        if path in st.redirects:
            return self._send(302, b"", {"Location": st.redirects[path]})
        if path not in st.files:
            return self._send(404, b"not found")
        data = st.files[path]
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            start = 0
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not match and path in st.cut_once:
            self.wfile.write(body[: st.cut_once.pop(path)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        st = self.state
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        st.log.append(("POST", self.path, {k: v for k, v in self.headers.items()}))
        if self.path == "/login" and st.login and (form.get("username", [""])[0], form.get("password", [""])[0]) \
                == st.login:
            return self._send(302, b"", {"Location": "/", "Set-Cookie": "session=ok; Path=/"})
        return self._send(200, b"<form>wrong username or password</form>")


@contextmanager
def serve(state: ServerState):
    """Yields the base URL http://127.0.0.1:<port>."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tif(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def deepglobe_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB mask, class ids) with 8x8 blocks of palette colours."""
    ids = rng.integers(0, 7, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    return np.asarray(DEEPGLOBE_PALETTE, np.uint8)[ids], ids


def deepglobe_zip(path: Path, ids: list[str], *, size: int = 64, layout: str = "kaggle", wrong_size: str | None = None,
                  off_palette: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The Kaggle layout (train/ with 803-style pairs, valid/ and test/ without masks, class_dict.csv, metadata.csv)
    or the official `land-train/` layout. Returns the expected class-id maps."""
    rng = np.random.default_rng(seed)
    folder = "train" if layout == "kaggle" else "land-train"
    expected = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for tile in ids:
            s = size // 2 if tile == wrong_size else size
            image = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
            mask, label = deepglobe_mask(rng, s)
            if tile == off_palette:
                mask = mask.copy()
                mask[0, 0] = (200, 30, 240)  # thresholds to rangeland (255, 0, 255)
                mask[0, 1] = (250, 10, 5)  # thresholds to red: not a DeepGlobe colour -> ignore
                label = label.copy()
                label[0, 0], label[0, 1] = 3, 255
            zf.writestr(f"{folder}/{tile}_sat.jpg", _jpg(image))
            zf.writestr(f"{folder}/{tile}_mask.png", png_bytes(mask))
            expected[tile] = label
        if layout == "kaggle":
            zf.writestr("valid/999901_sat.jpg", _jpg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
            zf.writestr("test/999902_sat.jpg", _jpg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
            zf.writestr("class_dict.csv", "name,r,g,b\nurban_land,0,255,255\n")
            zf.writestr("metadata.csv", "image_id,split\n")
    return expected


def inria_inner_zip(ids: list[str], *, size: int = 48, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """NEW2-AerialImageDataset.zip bytes: AerialImageDataset/train/{images,gt}/<id>.tif (+ a test image)."""
    rng = np.random.default_rng(seed)
    buf, expected = io.BytesIO(), {}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for tile in ids:
            label = (rng.random((size, size)) < 0.3).astype(np.uint8)
            zf.writestr(f"AerialImageDataset/train/images/{tile}.tif",
                        _tif(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
            zf.writestr(f"AerialImageDataset/train/gt/{tile}.tif", _tif(label * 255))
            expected[tile] = label
        zf.writestr("AerialImageDataset/test/images/bellingham1.tif",
                    _tif(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return buf.getvalue(), expected


def inria_7z_parts(folder: Path, inner: bytes, parts: int = 5) -> list[Path]:
    """aerialimagelabeling.7z.001..00N: a 7z holding NEW2-AerialImageDataset.zip, split into byte ranges."""
    import py7zr

    folder.mkdir(parents=True, exist_ok=True)
    whole = folder / "whole.7z"
    with py7zr.SevenZipFile(whole, "w") as sz:
        sz.writestr(inner, "NEW2-AerialImageDataset.zip")
    data = whole.read_bytes()
    whole.unlink()
    step = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = folder / f"aerialimagelabeling.7z.{i + 1:03d}"
        path.write_bytes(data[i * step:(i + 1) * step])
        paths.append(path)
    return paths


CITYSCAPES_LABEL_IDS = np.arange(-1, 34)  # labelIds drawn in fixtures (-1 never appears in images)


def cityscapes_zips(folder: Path, train: list[str], val: list[str], *, hw: tuple[int, int] = (32, 64),
                    seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip in the official layout; returns labelId maps."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    gt, left = folder / "gtFine_trainvaltest.zip", folder / "leftImg8bit_trainvaltest.zip"
    labels = {}
    with zipfile.ZipFile(gt, "w") as zg, zipfile.ZipFile(left, "w") as zl:
        for split, ids in (("train", train), ("val", val), ("test", ["berlin_000000_000019"])):
            for base in ids:
                city = base.split("_")[0]
                label = rng.integers(0, 34, hw).astype(np.uint8)
                zg.writestr(f"gtFine/{split}/{city}/{base}_gtFine_labelIds.png", png_bytes(label))
                zg.writestr(f"gtFine/{split}/{city}/{base}_gtFine_color.png", png_bytes(np.zeros((*hw, 3), np.uint8)))
                zg.writestr(f"gtFine/{split}/{city}/{base}_gtFine_polygons.json", "{}")
                zl.writestr(f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png",
                            png_bytes(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)))
                labels[base] = label
        zl.writestr("license.txt", "fixture")
    return gt, left, labels
