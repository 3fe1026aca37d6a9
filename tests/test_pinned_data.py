"""Pinned training files (comol/data/pinned.py): fetched once from a local HTTP server on 127.0.0.1, verified by
their git blob id before they are cached, nothing left behind by a bad or broken download, one sentence offline.
The real URLs are never contacted: every spec here points at the local server (or a closed local port)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
from omegaconf import OmegaConf

from comol.config import compose
from comol.data import dataset_splits
from comol.data.pinned import fetch_pinned, git_blob_id, train_source
from comol.errors import DataError

ROWS = [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"{i} + {i} = {2 * i}. The answer is {2 * i}.",
         "answer": str(2 * i)} for i in range(50)]
BODY = json.dumps(ROWS, indent=1).encode()


def git_hash_object(data: bytes) -> str:
    """The blob id as git itself computes it (an independent implementation)."""
    return subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True).stdout.decode().strip()


class Server:
    """A bounded HTTP server on 127.0.0.1: ``files`` maps a path to (bytes, mode); mode 'ok' serves the bytes,
    'cut' announces them all and closes the connection after half. Counts requests per path."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self):  # noqa: N802 - http.server API
                outer.requests[self.path] = outer.requests.get(self.path, 0) + 1
                if self.path not in outer.files:
                    self.send_error(404)
                    return
                data, mode = outer.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.stopper = threading.Timer(120, self.httpd.shutdown)   # stops by itself, whatever the test does

    def __enter__(self):
        self.thread.start()
        self.stopper.start()
        return self

    def __exit__(self, *exc):
        self.stopper.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    with Server() as s:
        yield s


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("COMOL_CACHE", str(root))
    return root / "datasets"


def spec_for(server: Server, path: str, served: bytes, blob: str | None = None, mode: str = "ok") -> dict:
    server.files[path] = (served, mode)
    return {"url": server.url + path, "git_blob": blob or git_hash_object(served), "env": "COMOL_TOYPIN"}


def leftovers(cache) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_git_blob_id_matches_git():
    for data in (b"", b"x", BODY, bytes(range(256)) * 1000):
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            assert git_blob_id(f.name) == git_hash_object(data)


def test_right_file_is_cached_once_and_reused(server, cache):
    spec = spec_for(server, "/ft-training_set/toy_14k.json", BODY)
    first = fetch_pinned(spec)
    assert first == cache / spec["git_blob"] / "toy_14k.json" and first.read_bytes() == BODY
    again = fetch_pinned(spec)
    assert again == first and server.requests == {"/ft-training_set/toy_14k.json": 1}
    assert leftovers(cache) == [spec["git_blob"], f"{spec['git_blob']}/toy_14k.json"]   # no temp file


def test_dataset_train_pinned_reads_the_verified_rows_before_training(server, cache):
    spec = spec_for(server, "/toy.json", BODY)
    ds = {"name": "toy_pinned", "source": "files", "train": "pinned", "pinned": spec}
    assert dataset_splits(ds)["train"] == ROWS
    assert dataset_splits(ds)["train"] == ROWS and server.requests == {"/toy.json": 1}


@pytest.mark.parametrize("served", [BODY.replace(b"The answer", b"The answre", 1), BODY[:-100]],
                         ids=["tampered", "truncated"])
def test_wrong_file_is_refused_and_not_cached(server, cache, served):
    spec = spec_for(server, "/math_14k.json", served, blob=git_hash_object(BODY))
    with pytest.raises(DataError) as err:
        fetch_pinned(spec)
    msg = str(err.value)
    assert "\n" not in msg and "math_14k.json" in msg
    assert f"expected {git_hash_object(BODY)}, got {git_hash_object(served)}" in msg
    assert leftovers(cache) == []
    server.files["/math_14k.json"] = (BODY, "ok")                 # the right file afterwards is accepted
    assert fetch_pinned(spec).read_bytes() == BODY


def test_download_cut_halfway_leaves_nothing(server, cache):
    spec = spec_for(server, "/big.json", BODY * 20, mode="cut")
    with pytest.raises(DataError, match=r"download of http://127\.0\.0\.1:\d+/big\.json was interrupted after \d+ "):
        fetch_pinned(spec)
    assert leftovers(cache) == []


def test_a_corrupted_cached_copy_is_downloaded_again(server, cache):
    spec = spec_for(server, "/toy.json", BODY)
    path = fetch_pinned(spec)
    path.write_bytes(b"[]")
    assert fetch_pinned(spec).read_bytes() == BODY and server.requests == {"/toy.json": 2}


def test_offline_gives_one_sentence_with_url_env_var_and_train_key(cache):
    with socket.socket() as s:       # a local port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"url": f"http://127.0.0.1:{port}/math_14k.json", "git_blob": git_hash_object(BODY), "env": "COMOL_MATH14K"}
    with pytest.raises(DataError) as err:
        fetch_pinned(spec, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not download {spec['url']} (")
    assert "offline, fetch that file" in msg and "COMOL_MATH14K=<file>" in msg and "dataset.train=<file>" in msg
    assert spec["git_blob"] in msg and leftovers(cache) == []


def test_env_var_and_local_copy_win_without_a_download(server, cache, tmp_path, monkeypatch):
    spec = spec_for(server, "/math_14k.json", BODY)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(ROWS[:3]))
    monkeypatch.setenv("COMOL_MATH14K", str(mine))
    ds = OmegaConf.to_container(compose(["dataset=math14k"]).dataset, resolve=True)
    assert ds["train"] == str(mine) and dataset_splits({**ds, "pinned": spec})["train"] == ROWS[:3]
    monkeypatch.delenv("COMOL_MATH14K")
    data_dir = tmp_path / "data"
    (data_dir / "train").mkdir(parents=True)
    (data_dir / "train" / "math_14k.json").write_bytes(BODY)
    ds = OmegaConf.to_container(compose(["dataset=math14k", f"paths.data_dir={data_dir}"]).dataset, resolve=True)
    assert ds["train"] == "pinned" and ds["pinned"]["local"] == str(data_dir / "train" / "math_14k.json")
    assert train_source({**ds, "pinned": {**spec, "local": ds["pinned"]["local"]}}) == ds["pinned"]["local"]
    assert server.requests == {} and leftovers(cache) == []


@pytest.mark.parametrize("entry,file,blob", [
    ("math14k", "math_14k.json", "7dc3a2312d83bd5cd6388ecd5d530f2ff6ed1ad6"),
    ("commonsense15k", "commonsense_15k.json", "3716afef6d384c475dba13f88a5a96c8032dafe2"),
    ("commonsense170k", "commonsense_170k.json", "529e426b33d4cdb1d0c4a275a1a7245ad081fd91"),
])
def test_presets_pin_the_papers_files(entry, file, blob, monkeypatch):
    """The presets name LLM-Adapters' public files on branch main by their git blob ids (read, not fetched)."""
    for var in ("COMOL_MATH14K", "COMOL_COMMONSENSE15K", "COMOL_COMMONSENSE170K"):
        monkeypatch.delenv(var, raising=False)
    ds = OmegaConf.to_container(compose([f"dataset={entry}"]).dataset, resolve=True)
    assert ds["train"] == "pinned" and ds["pinned"]["git_blob"] == blob
    assert ds["pinned"]["url"] == f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/ft-training_set/{file}"
    assert ds["pinned"]["local"].endswith(f"/train/{file}") and ds["val"].endswith("_validation.json")


def test_rows_equal_to_validation_rows_are_dropped_and_counted(tmp_path, data_dir, caplog):
    val_file = data_dir / "train" / "codealpaca20k_validation.json"
    val = json.loads(val_file.read_text())
    other = [{"instruction": f"Write code {i}", "input": "", "output": f"print({i})"} for i in range(30)]
    train = other[:10] + val[:7] + other[10:] + [{**val[9], "output": val[9]["output"] + "\n"}]  # whitespace only
    path = tmp_path / "code_alpaca_20k.json"
    path.write_text(json.dumps(train))
    ds = OmegaConf.to_container(compose(["dataset=codealpaca20k", f"dataset.train={path}",
                                         f"paths.data_dir={data_dir}"]).dataset, resolve=True)
    assert ds["drop_val_rows"] is True
    with caplog.at_level(logging.INFO, logger="comol.data.loading"):
        splits = dataset_splits(ds)
    assert splits["train"] == other and len(splits["val"]) == len(val) == 2017
    assert f"dataset=codealpaca20k: dropped 8 of 38 training rows equal to one of the 2017 validation rows" in caplog.text
    with pytest.raises(DataError, match="every one of the 3 training rows is also a validation row"):
        path.write_text(json.dumps(val[:3]))
        dataset_splits(ds)


def test_hub_dataset_offline_gives_one_sentence(monkeypatch):
    """codealpaca20k's default is a hub id read through ``datasets`` (its own cache); offline it says what to do."""
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'sahil2801/CodeAlpaca-20k' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("COMOL_CODEALPACA20K", raising=False)
    ds = OmegaConf.to_container(compose(["dataset=codealpaca20k"]).dataset, resolve=True)
    with pytest.raises(DataError) as err:
        dataset_splits(ds)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("dataset 'sahil2801/CodeAlpaca-20k' (split 'train') could not be loaded")
    assert "https://huggingface.co/datasets/sahil2801/CodeAlpaca-20k" in msg and "dataset.train=<file>" in msg
    assert "COMOL_CODEALPACA20K=<file>" in msg
