"""datasets/download.py: resumable verified downloads against a local server, and safe extraction."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest
from datasets_fixtures import ServerState, inria_7z_parts, md5, serve

from datasets import download as dl
from datasets.base import DatasetError

DATA = os.urandom(3 * dl.CHUNK + 12345)


def test_interrupted_download_resumes_with_range(tmp_path):
    state = ServerState(files={"/f.bin": DATA}, cut_once={"/f.bin": dl.CHUNK + 100})
    with serve(state) as url:
        out = dl.download(f"{url}/f.bin", tmp_path / "f.bin", md5=md5(DATA), backoff=0.01, progress=False)
    assert out.read_bytes() == DATA
    assert not (tmp_path / "f.bin.part").exists()
    gets = [headers.get("Range") for method, path, headers in state.log if path == "/f.bin"]
    assert gets == [None, f"bytes={dl.CHUNK + 100}-"]


def test_existing_part_file_is_resumed(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:5000])
    state = ServerState(files={"/f.bin": DATA})
    with serve(state) as url:
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", size=len(DATA), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert [h.get("Range") for _, _, h in state.log] == ["bytes=5000-"]
    with serve(state) as url:  # a verified file is kept: no second download
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", size=len(DATA), progress=False)
    assert len(state.log) == 1


def test_wrong_checksum_is_rejected_and_nothing_left(tmp_path):
    state = ServerState(files={"/f.bin": DATA})
    with serve(state) as url, pytest.raises(DatasetError) as err:
        dl.download(f"{url}/f.bin", tmp_path / "f.bin", md5="0" * 32, progress=False)
    message = str(err.value)
    assert "checksum failed for f.bin" in message and "expected " + "0" * 32 in message and "deleted" in message
    assert list(tmp_path.iterdir()) == []


def test_http_errors_are_clear(tmp_path):
    state = ServerState(files={"/f.bin": DATA}, require={"/f.bin": ("Authorization", "Basic x")})
    with serve(state) as url:
        with pytest.raises(dl.DownloadAuthError, match="HTTP 401"):
            dl.download(f"{url}/f.bin", tmp_path / "f.bin", progress=False)
        with pytest.raises(DatasetError, match="HTTP 404"):
            dl.download(f"{url}/nothing.bin", tmp_path / "g.bin", progress=False)


def test_credentials_not_forwarded_to_another_host(tmp_path):
    state = ServerState(files={"/store/f.bin": DATA}, require={"/api/f": ("Authorization", "Basic secret")})
    with serve(state) as url:
        state.redirects["/api/f"] = url.replace("127.0.0.1", "localhost") + "/store/f.bin?token=abc"
        state.files["/store/f.bin?token=abc"] = DATA
        dl.download(f"{url}/api/f", tmp_path / "f.bin", headers={"Authorization": "Basic secret"}, progress=False)
    store = [h for _, p, h in state.log if p.startswith("/store")]
    assert store and all("Authorization" not in h for h in store)
    assert dl.public_url("https://u:p@host:8080/a/b?sig=1") == "https://host:8080/a/b"


def _zip_with(tmp_path, name):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt", "C:/escape.txt"])
def test_extraction_refuses_escaping_entries(tmp_path, name):
    target = tmp_path / "out"
    with pytest.raises(DatasetError, match="refusing to extract"):
        dl.safe_extract(_zip_with(tmp_path, name), target, progress=False)
    assert not (tmp_path / "escape.txt").exists()
    assert not any(p.is_file() for p in target.rglob("*"))  # the whole archive is refused, nothing half-written


def test_extraction_refuses_links(tmp_path):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DatasetError, match="symbolic link"):
        dl.safe_extract(path, tmp_path / "out", progress=False)
    zpath = tmp_path / "links.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="symbolic link"):
        dl.safe_extract(zpath, tmp_path / "out", progress=False)


def test_extract_zip_tar_and_multipart_7z(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"hello"
        info = tarfile.TarInfo("a/b.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "x.tar.gz").write_bytes(buf.getvalue())
    files = dl.safe_extract(tmp_path / "x.tar.gz", tmp_path / "t", progress=False)
    assert [f.read_bytes() for f in files] == [b"hello"]
    parts = inria_7z_parts(tmp_path / "parts", b"inner zip bytes" * 1000, parts=3)
    files = dl.safe_extract(parts[0], tmp_path / "s", progress=False)
    assert [f.name for f in files] == ["NEW2-AerialImageDataset.zip"]
    assert files[0].read_bytes() == b"inner zip bytes" * 1000
