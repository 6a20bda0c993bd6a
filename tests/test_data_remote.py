"""Streamed shards: http:// and pipe: specs read like local files, through a server in the test (127.0.0.1)
that cuts connections mid-shard, answers 503 / 500 / 404, with and without Range support; sizes.json
fetched from beside the shards; retries that continue where they stopped; clear errors."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import read_tar_samples
from test_data_pipeline import _cfg, make_shards

from inti_adapters.data import build_dataloader, write_shards
from inti_adapters.data.remote import RemoteOptions, ShardStream, ShardUnavailable
from inti_adapters.data.sizes import sizes_location
from inti_adapters.train.evaluate import evaluate

FAST = dict(retries=3, retry_backoff_s=0.01, read_timeout_s=5.0)


@dataclass
class Faults:
    """What the server does wrong. ``cut[name]``: byte counts after which successive answers are cut;
    ``status[name]``: HTTP statuses answered (one per request) before the file is served."""

    files: dict[str, bytes]
    ranges: bool = True
    cut: dict[str, list[int]] = field(default_factory=dict)
    status: dict[str, list[int]] = field(default_factory=dict)
    always: int | None = None  # answer every request with this status
    log: list[tuple[str, str | None, int]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None


class _Handler(BaseHTTPRequestHandler):
    faults: Faults

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        f, name = self.faults, self.path.lstrip("/")
        queued = f.status.get(name) or []
        code = f.always or (queued.pop(0) if queued else None) or (200 if name in f.files else 404)
        rng = self.headers.get("Range")
        if code != 200:
            f.log.append((name, rng, code))
            self.send_error(code)
            return
        data, start = f.files[name], 0
        if f.ranges and rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            code = 206
        f.log.append((name, rng, code))
        self.send_response(code)
        self.send_header("Content-Length", str(len(data) - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cuts = f.cut.get(name) or []
        body = data[start:start + cuts.pop(0)] if cuts else data[start:]
        self.wfile.write(body)
        self.wfile.flush()
        if len(body) < len(data) - start:  # cut the connection mid-shard
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


@pytest.fixture
def serve():
    servers = []

    def start(folder: Path, **faults) -> tuple[str, Faults]:
        state = Faults({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, **faults)
        handler = type("Handler", (_Handler,), {"faults": state})
        server = state.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", state

    yield start
    for server in servers:
        if server.socket.fileno() != -1:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("served"), [6, 6, 6])


def _urls(base: str, local: list[str]) -> str:
    return base + "/part-{000000..000002}.tar"


def _batches(loader) -> list[tuple]:
    return [(v.clone(), y.clone(), list(k)) for v, y, k in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x[0].equal(y[0]) and x[1].equal(y[1]) and x[2] == y[2] for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("ranges", [True, False])
def test_cut_connections_and_503_give_the_same_batches_as_local_files(local, serve, ranges, caplog):
    base, faults = serve(Path(local[0]).parent, ranges=ranges)
    size = len(faults.files["part-000001.tar"])
    faults.cut = {"part-000000.tar": [size // 3, size // 4], "part-000001.tar": [size // 2]}
    faults.status = {"part-000001.tar": [503], "part-000002.tar": [503, 500]}
    for train in (True, False):
        reference = _batches(build_dataloader(_cfg(local, **FAST), train=train, with_keys=True))
        remote = build_dataloader(_cfg(_urls(base, local), **FAST), train=train, with_keys=True)
        assert remote.shard_sizes == [6, 6, 6]  # from the sizes.json beside the shards
        with caplog.at_level(logging.INFO, logger="inti_adapters.data"):
            got = _batches(remote)
        assert _same(got, reference) and remote.damaged_shards == 0
        faults.cut = {"part-000000.tar": [size // 3]}
    # continued with a Range request where the server supports it; else read again from the start
    codes = [code for name, asked, code in faults.log if name == "part-000000.tar" and asked]
    assert codes and set(codes) == ({206} if ranges else {200}) and "retry 1 of 3" in caplog.text


def test_dataloader_workers_read_remote_shards(local, serve):
    base, faults = serve(Path(local[0]).parent, ranges=False)
    faults.cut = {"part-000002.tar": [7000]}
    cfg = dict(num_workers=2, batch_size=3, **FAST)
    reference = _batches(build_dataloader(_cfg(local, **cfg), train=True, with_keys=True, rank=1, world_size=2))
    got = _batches(build_dataloader(_cfg(_urls(base, local), **cfg), train=True, with_keys=True, rank=1, world_size=2))
    assert _same(got, reference) and len(got) == 2
    assert faults.cut["part-000002.tar"] == []  # the cut happened (in a worker), and it was read again


def test_retries_exhausted_warn_in_training_and_fail_evaluation(local, serve, caplog):
    base, faults = serve(Path(local[0]).parent)
    faults.status = {"part-000001.tar": [503] * 100}
    loader = build_dataloader(_cfg(_urls(base, local), batch_size=2, shuffle_buffer=0, **FAST), train=True,
                              with_keys=True)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        keys = [k for _, _, ks in loader for k in ks]
    url = f"{base}/part-000001.tar"
    assert f"shard {url} could not be read after 0 samples: HTTP 503" in caplog.text
    assert "4 tries in a row failed" in caplog.text and "the data itself may be intact" in caplog.text
    assert "rewrite" not in caplog.text  # a server failure is not reported as a damaged shard
    assert loader.damaged_shards >= 1 and not any(k in keys for k in ("k00006", "k00011"))
    with pytest.raises(RuntimeError, match=f"evaluation cannot read shard {url} after 0 samples: HTTP 503"):
        list(build_dataloader(_cfg(_urls(base, local), **FAST), train=False))
    faults.status = {n: [503] * 100 for n in faults.files if n.endswith(".tar")}  # the server is down for shards:
    # training stops instead of warning about every shard
    with pytest.raises(RuntimeError, match=r"3 shards in a row could not be read \(the last, .*HTTP 503.*\): the shard "
                                           "server or the network is down"):
        list(build_dataloader(_cfg(_urls(base, local), **{**FAST, "retries": 0}), train=True))


@pytest.mark.parametrize("death", ["500", "gone"])
def test_a_server_that_dies_mid_read_is_named_and_not_called_damaged(local, serve, death):
    base, faults = serve(Path(local[0]).parent, cut={"part-000000.tar": [2000]})
    stream = ShardStream(f"{base}/part-000000.tar", RemoteOptions(retries=2, backoff_s=0.01, timeout_s=2))
    first = stream.read(1000)
    if death == "500":
        faults.always = 500
    else:  # the server process is gone: connections are refused
        faults.server.shutdown()
        faults.server.server_close()
    start = time.monotonic()
    reason = "HTTP 500 Internal Server Error" if death == "500" else "URLError: .*Connection refused"
    with pytest.raises(ShardUnavailable, match=rf"{reason}; 3 tries in a row failed at byte 2000 .*data itself may be "
                                               "intact") as e:
        while stream.read(4096):
            pass
    assert time.monotonic() - start < 5 and len(first) == 1000  # no 60 s stall in a hidden retry loop
    assert not e.value.permanent and "rewrite" not in str(e.value)
    stream.close()


def test_404_and_failing_pipe_commands_are_clear_errors(serve, tmp_path):
    base, _ = serve(tmp_path)  # an empty folder: no shard, no sizes.json
    with pytest.raises(RuntimeError, match=rf"cannot read shard {base}/nope\.tar after 0 samples: HTTP 404"):
        list(build_dataloader(_cfg(f"{base}/nope.tar", train_samples=4, **FAST), train=True))
    bad = "pipe:cat /nonexistent/x.tar; exit 3"
    with pytest.raises(RuntimeError, match=r"evaluation cannot read shard pipe:cat /nonexistent/x\.tar; exit 3 after 0 "
                                           r"samples: exited with status 3 \(its stderr: cat: /nonexistent/x\.tar"):
        list(build_dataloader(_cfg(bad, retries=1, retry_backoff_s=0.01), train=False))


def test_pipe_shards_read_like_local_ones_with_their_sizes(local):
    spec = [f"pipe:cat {p}" for p in local]
    assert sizes_location(spec[0]) == (f"pipe:cat {Path(local[0]).parent}/sizes.json", "part-000000.tar")
    loader = build_dataloader(_cfg(spec), train=False, with_keys=True)
    assert loader.shard_sizes == [6, 6, 6]
    assert _same(_batches(loader), _batches(build_dataloader(_cfg(local), train=False, with_keys=True)))


def test_remote_sizes_json_that_disagrees_or_is_corrupt(local, serve, tmp_path, caplog):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in local:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    (folder / "sizes.json").write_text(json.dumps({"part-000000.tar": 6, "part-000001.tar": 7, "part-000002.tar": 6}))
    base, faults = serve(folder)
    # listed vs read in remote evaluation (one sample fewer than listed)
    loader = build_dataloader(_cfg(_urls(base, local)), train=False)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"), \
            pytest.raises(RuntimeError, match="evaluation read 18 samples but sizes.json lists 19"):
        evaluate(lambda x: torch.zeros(x.shape[0], 30), loader)
    assert f"shard {base}/part-000001.tar: read 6 samples, sizes.json lists 7" in caplog.text
    faults.files["sizes.json"] = json.dumps({"part-000000.tar": 6}).encode()
    with pytest.raises(ValueError, match=rf"{base}/sizes.json does not list the shard part-000001.tar"):
        build_dataloader(_cfg(_urls(base, local)), train=False)
    faults.files["sizes.json"] = b"{not json"
    with pytest.raises(ValueError, match=rf"{base}/sizes.json is not valid JSON"):
        build_dataloader(_cfg(_urls(base, local)), train=False)
    faults.status = {"sizes.json": [500] * 10}
    with pytest.raises(RuntimeError, match=rf"cannot read {base}/sizes.json \(the sample counts .*\): HTTP 500"):
        build_dataloader(_cfg(_urls(base, local), retries=1, retry_backoff_s=0.01), train=False)
    faults.status = {}
    del faults.files["sizes.json"]  # no sizes.json: training needs train_samples
    with pytest.raises(ValueError, match="no sizes.json; set DataConfig.train_samples"):
        build_dataloader(_cfg(_urls(base, local)), train=True)


def test_inti_shards_converts_remote_video_shards(local, serve, tmp_path):
    base, faults = serve(Path(local[0]).parent)
    faults.cut = {"part-000001.tar": [5000]}
    opts = dict(samples_per_shard=7, store="frames", frames_per_video=3, progress=False)
    remote = write_shards(source=_urls(base, local), output=str(tmp_path / "r"), **opts)
    reference = write_shards(source=str(Path(local[0]).parent), output=str(tmp_path / "l"), **opts)
    assert remote.written == reference.written == 18 and not (tmp_path / "r" / ".inti-shards-source").exists()

    def content(shards):
        out = []
        for s in read_tar_samples(shards):
            meta = json.loads(s.pop("json"))
            out.append((s.pop("__key__"), sorted(s.items()), meta.pop("path").rsplit("/", 1)[1], meta))
        return out

    assert content(remote.shards) == content(reference.shards)  # the same, but for where the source was
    assert json.loads((tmp_path / "r" / "sizes.json").read_text()) == {"shard-000000.tar": 7, "shard-000001.tar": 7,
                                                                       "shard-000002.tar": 4}
    with pytest.raises(ValueError, match=rf"cannot fetch source shard {base}/gone\.tar: HTTP 404"):
        write_shards(source=f"{base}/gone.tar", output=str(tmp_path / "x"), **opts)


def test_a_pipe_command_that_hangs_times_out_and_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    stream = ShardStream(f"pipe:sh -c 'echo $$ > {marker}; sleep 30'", RemoteOptions(retries=0, timeout_s=0.5))
    start = time.monotonic()
    with pytest.raises(ShardUnavailable, match=r"no data for 0.5 s; one try failed at byte 0"):
        stream.read(10)
    stream.close()
    child = int(marker.read_text())
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # reaped by init after the kill
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


@pytest.mark.parametrize("ranges", [True, False])
def test_a_shard_that_changes_between_requests_is_refused(local, serve, ranges):
    base, faults = serve(Path(local[0]).parent, ranges=ranges, cut={"part-000000.tar": [3000]})
    stream = ShardStream(f"{base}/part-000000.tar", RemoteOptions(retries=2, backoff_s=0.01, timeout_s=2))
    size = len(faults.files["part-000000.tar"])
    assert len(stream.read(2000)) == 2000
    faults.files["part-000000.tar"] += b"\0" * 512  # rewritten on the server while being read
    with pytest.raises(ShardUnavailable, match=f"its size changed from {size} to {size + 512} bytes") as e:
        while stream.read(4096):
            pass
    assert e.value.permanent
    stream.close()
