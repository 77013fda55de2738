"""Download over loopback HTTP: success, resume, checksum mismatch, and a malicious archive."""
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data


class Server:
    """Serves one archive on 127.0.0.1 with Range support; `cut_first` bytes of the first
    response only, to simulate a dropped connection. Records the Range headers it saw."""

    def __init__(self, payload, cut_first=None):
        self.payload, self.cut_first, self.ranges = payload, cut_first, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header:
                    start = int(header.split("=")[1].split("-")[0])
                body = outer.payload[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_first is not None:
                    body, outer.cut_first = body[:outer.cut_first], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.close()  # drop mid-transfer
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/mvtec.tar.xz"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def archive_of(folder, extra=()):
    """tar.xz of folder's content, plus extra (TarInfo, bytes) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(folder, arcname=folder.name)
        for info, content in extra:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


@pytest.fixture
def payload(tmp_path):
    src = tmp_path / "src"
    data.make_synthetic_category(src, "toy", size=16, n_train=3, n_good_test=1, n_defect_test=1)
    return archive_of(src / "toy")


def sha(b):
    return hashlib.sha256(b).hexdigest()


def test_download_verifies_extracts_and_loads(tmp_path, payload):
    root = tmp_path / "root"
    with Server(payload) as url:
        cat = data.ensure_category(root, "toy", download=True, url=url, sha256=sha(payload))
    assert cat == root / "toy"
    assert len(data.load_split(root, "toy", "test", 16)) == 2
    assert (root / data.MVTEC_ARCHIVE).is_file() and not list(root.glob("*.part"))


def test_interrupted_download_resumes_with_a_range_request(tmp_path, payload):
    root = tmp_path / "root"
    half = len(payload) // 2
    server = Server(payload, cut_first=half)
    with server as url:
        with pytest.raises(data.DatasetError, match="run again to resume"):
            data.ensure_category(root, "toy", download=True, url=url, sha256=sha(payload))
        assert (root / f"{data.MVTEC_ARCHIVE}.part").stat().st_size == half
        data.ensure_category(root, "toy", download=True, url=url, sha256=sha(payload))
    assert server.ranges == [None, f"bytes={half}-"]
    assert (root / "toy" / "train" / "good").is_dir()


def test_resume_sends_the_partial_size_as_range(tmp_path, payload):
    root = tmp_path / "root"
    root.mkdir()
    (root / f"{data.MVTEC_ARCHIVE}.part").write_bytes(payload[:100])
    server = Server(payload)
    with server as url:
        data.ensure_category(root, "toy", download=True, url=url, sha256=sha(payload))
    assert server.ranges == ["bytes=100-"]


def test_checksum_mismatch_deletes_the_download(tmp_path, payload):
    root = tmp_path / "root"
    with Server(payload) as url:
        with pytest.raises(data.DatasetError, match="checksum mismatch"):
            data.ensure_category(root, "toy", download=True, url=url, sha256="0" * 64)
    assert not list(root.glob("*.part")) and not (root / data.MVTEC_ARCHIVE).exists()


def test_malicious_members_are_never_written_outside_the_root(tmp_path):
    src = tmp_path / "src"
    data.make_synthetic_category(src, "toy", size=16, n_train=2, n_good_test=1, n_defect_test=1)
    outside = tmp_path / "outside"
    outside.mkdir()

    def file(name):
        info = tarfile.TarInfo(name)
        info.size = 4
        return info, b"evil"

    link = tarfile.TarInfo("toy/train/link")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside / "target")
    payload = archive_of(src / "toy", extra=[
        file("../evil.txt"), file("toy/../../evil2.txt"), file(str(outside / "abs.txt")),
        (link, None)])
    root = tmp_path / "deep" / "root"
    with Server(payload) as url:
        data.ensure_category(root, "toy", download=True, url=url, sha256=sha(payload))
    assert sorted(p.name for p in outside.iterdir()) == []
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil2.txt").exists()
    assert not (root / "toy" / "train" / "link").exists()
    assert (root / "toy" / "train" / "good").is_dir()  # the good members still arrive


def test_unreachable_server_is_one_clear_error(tmp_path):
    with pytest.raises(data.DatasetError, match="download of .* failed") as err:
        data.download_file("http://127.0.0.1:9/none.tar.xz", tmp_path / "a.tar.xz", "0" * 64)
    assert "\n" not in str(err.value)


def test_missing_category_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DatasetError, match="--download"):
        data.ensure_category(tmp_path, "bottle")
