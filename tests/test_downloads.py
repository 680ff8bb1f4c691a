"""Downloads of both corpora through a real HTTP server on 127.0.0.1: good, wrong checksum, truncated, refused."""

import hashlib
import http.server
import io
import socket
import threading
import zipfile

import pytest

from grassjax import data
from grassjax.data import wikitext
from grassjax.data import DataError
from tests.conftest import generated_text

TEXT = generated_text(300).encode()


def wikitext_zip(extra_name=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(wikitext.WIKITEXT_FILES.values()):
            zf.writestr(f"{wikitext.WIKITEXT_DIR}/{name}", f" = Title {i} = \n\n {generated_text(200, seed=i)}")
        if extra_name:
            zf.writestr(extra_name, "not for us")
    return buf.getvalue()


ARCHIVE = wikitext_zip("../outside.txt")


class Handler(http.server.BaseHTTPRequestHandler):
    routes = {"/input.txt": TEXT, "/wikitext-2-raw-v1.zip": ARCHIVE}

    def do_GET(self):
        body = self.routes.get(self.path.replace("/truncated", ""))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # /truncated/...: the connection closes halfway through the promised body
        self.wfile.write(body[: len(body) // 2] if self.path.startswith("/truncated") else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def refused_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file"  # nothing listens there any more


def only_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_tiny_shakespeare_download_good_wrong_truncated_refused(server, refused_url, tmp_path):
    sha = hashlib.sha256(TEXT).hexdigest()
    assert data.load_text(tmp_path / "good", url=f"{server}/input.txt", sha256=sha) == TEXT.decode()
    assert (tmp_path / "good" / "tinyshakespeare" / "input.txt").read_bytes() == TEXT

    cases = [("wrong", f"{server}/input.txt", "0" * 64, "was not saved"),
             ("truncated", f"{server}/truncated/input.txt", sha, "IncompleteRead"),
             ("refused", refused_url, sha, "Connection refused")]
    for name, url, digest, reason in cases:
        with pytest.raises(DataError) as err:
            data.load_text(tmp_path / name, url=url, sha256=digest)
        message = only_line(err)
        assert reason in message and "--data_dir" in message, message
        assert not (tmp_path / name / "tinyshakespeare").exists() or \
            not any((tmp_path / name / "tinyshakespeare").iterdir())  # nothing kept


def test_wikitext_download_tries_addresses_in_order_and_unpacks_atomically(server, refused_url, tmp_path,
                                                                          monkeypatch):
    sha = hashlib.sha256(ARCHIVE).hexdigest()
    monkeypatch.setattr(wikitext, "WIKITEXT_URLS", (refused_url, f"{server}/wikitext-2-raw-v1.zip"))
    monkeypatch.setattr(wikitext, "WIKITEXT_ARCHIVE_SHA256", sha)
    raw, folder = wikitext.load_wikitext2_text(tmp_path / "data")  # the first address refuses: the second serves
    assert sorted(p.name for p in folder.iterdir()) == sorted(wikitext.WIKITEXT_FILES.values())
    assert raw["val"].startswith(b" = Title 1 = ")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [wikitext.WIKITEXT_DIR]  # no temp folder left
    assert not (tmp_path / "outside.txt").exists()  # a path outside the folder in the archive is ignored


@pytest.mark.parametrize("path, digest, reason", [
    ("/wikitext-2-raw-v1.zip", "0" * 64, "sha256"),
    ("/truncated/wikitext-2-raw-v1.zip", None, "IncompleteRead"),
    (None, None, "Connection refused"),
])
def test_wikitext_failed_downloads_keep_nothing_and_name_data_dir(server, refused_url, tmp_path, path, digest,
                                                                  reason):
    url = f"{server}{path}" if path else refused_url
    with pytest.raises(DataError) as err:
        wikitext.download_wikitext2(tmp_path, urls=[url], sha256=digest or hashlib.sha256(ARCHIVE).hexdigest())
    message = only_line(err)
    assert reason in message and "--data_dir" in message and url in message, message
    assert list(tmp_path.iterdir()) == []  # nothing kept, no temporary folder


def test_hugging_face_route_is_skipped_when_datasets_was_imported_online(monkeypatch, tmp_path):
    """Its offline switch is read at import: a module imported online might download, so it is not asked."""
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(config=types.SimpleNamespace(HF_DATASETS_OFFLINE=False),
                                 load_dataset=lambda *a, **k: calls.append(a))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert wikitext._load_from_hf_cache() is None and calls == []
