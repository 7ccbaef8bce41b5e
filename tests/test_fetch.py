"""The guarded fetch against a small loopback web with the faults a real crawl meets.

The public web is a server on 127.0.0.1 (reached through download.allow_hosts); an "internal" server on
127.0.0.2 stands for a metadata service and must never be contacted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import ipaddress
import itertools
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import DownloadConfig, validate_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.stages.fetch import (
    AddressGuard,
    Fetched,
    FetchError,
    FetchFailure,
    GuardedFetcher,
    PinnedTransport,
    check_declared_pixels,
    is_public_address,
    opt_out_directive,
    parse_retry_after,
    parse_robots,
    robots_agent,
)

GOOD_IMAGES = 200
HUGE_BYTES = 2 * 2**30
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit PNG declaring width x height pixels, ~110 KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


class _WebServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, host: str, handle: Callable[[BaseHTTPRequestHandler, str], None]) -> None:
        self.handle_path = handle
        self.hits: collections.Counter[str] = collections.Counter()
        self.hit_times: dict[str, list[float]] = collections.defaultdict(list)
        self.bytes_sent: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__((host, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up on a drip or a 2 GiB body are the point of the exercise

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: _WebServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits[self.path] += 1
            self.server.hit_times[self.path].append(time.monotonic())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.server.handle_path(self, self.path)

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def send(self, code: int, body: bytes = b"", content_type: str = "image/jpeg", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def stream_zeros(self, total: int, declare_length: bool) -> None:
        """`total` bytes of zeros, 1 MiB at a time, never held in memory at once."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declare_length:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        block = bytes(2**20)
        for _ in range(total // len(block)):
            self.wfile.write(block)
            with self.server.lock:
                self.server.bytes_sent[self.path] += len(block)


class LoopbackWeb:
    """The public test web: one server, every fault a path (see `expected_fates`)."""

    def __init__(self) -> None:
        self.images = small_jpegs(GOOD_IMAGES)
        self.bomb = png_bomb()
        self.internal = _WebServer("127.0.0.2", self._serve_internal)
        self.public = _WebServer("127.0.0.1", self._serve_public)
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for server in (self.internal, self.public)
        ]

    def __enter__(self) -> LoopbackWeb:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.public, self.internal):
            server.stopping.set()
            server.shutdown()
            server.server_close()

    @property
    def allow_entry(self) -> str:
        return self.public.base_url.removeprefix("http://")

    def _serve_internal(self, handler: _Handler, path: str) -> None:
        handler.send(200, self.images[0])

    def _serve_public(self, handler: _Handler, path: str) -> None:
        internal, public, hits = self.internal.base_url, self.public.base_url, self.public.hits[path]
        section = path.split("/")[1]
        if path == "/robots.txt":
            handler.send(200, ROBOTS_TXT, "text/plain")
        elif section in ("img", "private", "flaky", "limited-once", "optout", "optout-ua", "optout-otherbot"):
            image = self.images[int(path.rsplit("/", 1)[1].split(".")[0]) % len(self.images)]
            if section == "flaky" and hits == 1:
                handler.send(503, b"try again", "text/plain")
            elif section == "limited-once" and hits == 1:
                handler.send(429, b"slow down", "text/plain", Retry_After="1")
            else:
                robots_tag = {"optout": "noai", "optout-ua": "curate: noimageai", "optout-otherbot": "otherbot: noai"}
                extra = {"X_Robots_Tag": robots_tag[section]} if section in robots_tag else {}
                handler.send(200, image, **extra)
        elif section == "drip":
            handler.send_response(200)
            handler.send_header("Content-Length", "100000")
            handler.end_headers()
            while not self.public.stopping.wait(0.5):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
        elif section == "drip-headers":
            handler.wfile.write(b"HTTP/1.0 200 OK\r\nX-Padding: ")
            while not self.public.stopping.wait(0.5):
                handler.wfile.write(b"x")
                handler.wfile.flush()
        elif section == "hang":
            self.public.stopping.wait(30)
        elif section == "huge-declared":
            handler.stream_zeros(HUGE_BYTES, declare_length=True)
        elif section == "huge-stream":
            handler.stream_zeros(HUGE_BYTES, declare_length=False)
        elif section == "bomb.png":
            handler.send(200, self.bomb, "image/png")
        elif section == "redirect-internal":
            handler.send(302, Location=f"{internal}/secret.jpg")
        elif section == "redirect-localhost":
            handler.send(302, Location=public.replace("127.0.0.1", "localhost") + "/img/0.jpg")
        elif section == "redirect-good":
            handler.send(302, Location="/img/1.jpg")
        elif section == "loop":
            handler.send(302, Location=path)
        elif section == "limited-always":
            handler.send(429, b"slow down", "text/plain", Retry_After="1")
        elif section == "limited-long":
            handler.send(429, b"come back tomorrow", "text/plain", Retry_After="3600")
        elif section == "down":
            handler.send(503, b"down", "text/plain")
        else:
            handler.send(404, b"not found", "text/plain")

    def expected_fates(self) -> dict[str, tuple[str, str | None]]:
        """url -> (status, reason) the ledger must show."""
        public, internal = self.public.base_url, self.internal.base_url
        port = self.public.server_address[1]
        fates: dict[str, tuple[str, str | None]] = {
            f"{public}/img/{i}.jpg": ("kept", None) for i in range(2, GOOD_IMAGES)
        }
        fates |= {
            f"{public}/flaky/3.jpg": ("kept", None),
            f"{public}/limited-once/4.jpg": ("kept", None),
            f"{public}/redirect-good": ("kept", None),
            f"{public}/optout-otherbot/5.jpg": ("kept", None),
            f"{public}/optout/6.jpg": ("dropped", "opt_out"),
            f"{public}/optout/7.jpg": ("dropped", "opt_out"),
            f"{public}/optout-ua/8.jpg": ("dropped", "opt_out"),
            f"{public}/private/9.jpg": ("dropped", "robots_txt"),
            f"{public}/drip/a": ("failed", "timeout"),
            f"{public}/drip/b": ("failed", "timeout"),
            f"{public}/drip-headers": ("failed", "timeout"),
            f"{public}/hang/a": ("failed", "timeout"),
            f"{public}/huge-declared": ("failed", "too_large"),
            f"{public}/huge-stream": ("failed", "too_large"),
            f"{public}/bomb.png": ("failed", "decompression_bomb"),
            f"{public}/redirect-internal": ("dropped", "blocked_address"),
            f"{public}/redirect-localhost": ("dropped", "blocked_address"),
            f"{internal}/secret.jpg": ("dropped", "blocked_address"),
            f"{internal}/robots.txt": ("dropped", "blocked_address"),
            f"http://0.0.0.0:{self.internal.server_address[1]}/x.jpg": ("dropped", "blocked_address"),
            f"http://[::1]:{port}/img/0.jpg": ("dropped", "blocked_address"),
            f"{public}/loop": ("failed", "too_many_redirects"),
            f"{public}/limited-always": ("failed", "http_429"),
            f"{public}/limited-long": ("failed", "http_429"),
            f"{public}/down": ("failed", "http_503"),
            f"{public}/missing.jpg": ("failed", "http_404"),
        }
        return fates


@dataclass
class CrawlResult:
    web: LoopbackWeb
    ledger: pd.DataFrame
    run_dir: Path
    seconds: float
    rss_growth_mb: float


class PeakRss:
    """Samples this process's resident memory in a background thread."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return max(0, self.peak - self.baseline) / 2**20


def write_crawl(web: LoopbackWeb, path: Path) -> Path:
    urls = list(web.expected_fates())
    pd.DataFrame({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}).to_parquet(path)
    return path


def crawl_config(web: LoopbackWeb, tmp_path: Path, **download: Any):
    table = write_crawl(web, tmp_path / "crawl.parquet")
    settings = {
        "retries": 2,
        "timeout": 2,
        "deadline_s": 3,
        "backoff_s": 0.2,
        "allow_hosts": [web.allow_entry],
        "image_size": 64,
        "threads": 32,
        "processes": 1,
        **download,
    }
    raw = {
        "output": str(tmp_path / "run"),
        "stages": ["input", "download"],
        "input": {"path": str(table), "shard_size": 1000},
        "download": settings,
    }
    return validate_config(raw)


def warm_up_img2dataset() -> None:
    """Import img2dataset before measuring memory: its ~600 MB of imports are not what the crawl is judged on."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # as curate.stages.download does: no PyPI check on import
    import img2dataset.downloader  # noqa: F401


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrawlResult]:
    tmp_path = tmp_path_factory.mktemp("crawl")
    warm_up_img2dataset()

    with LoopbackWeb() as web:
        config = crawl_config(web, tmp_path)
        started = time.perf_counter()
        with PeakRss() as rss:
            result = run_pipeline(config)
        seconds = time.perf_counter() - started
        assert result.complete
        yield CrawlResult(web, read_ledger(tmp_path / "run"), tmp_path / "run", seconds, rss.growth_mb)


def test_the_crawl_finishes_well_under_a_minute(crawl: CrawlResult):
    assert crawl.seconds < 45, f"the crawl took {crawl.seconds:.1f} s"


def test_every_fault_has_its_reason_in_the_ledger(crawl: CrawlResult):
    expected = crawl.web.expected_fates()
    seen = {row.url: (row.status, None if pd.isna(row.reason) else row.reason) for row in crawl.ledger.itertuples()}
    wrong = {url: (seen.get(url), fate) for url, fate in expected.items() if seen.get(url) != fate}
    assert not wrong, "url: (seen, expected)\n" + "\n".join(f"{u}: {v}" for u, v in wrong.items())
    assert len(crawl.ledger) == len(expected)


def test_the_internal_address_is_never_contacted(crawl: CrawlResult):
    assert sum(crawl.web.internal.hits.values()) == 0, crawl.web.internal.hits
    detail = crawl.ledger.set_index("url").loc[f"{crawl.web.public.base_url}/redirect-internal", "detail"]
    assert "127.0.0.2" in detail and "loopback" in detail


def test_opt_outs_are_fetched_once_and_robots_txt_is_obeyed(crawl: CrawlResult):
    hits = crawl.web.public.hits
    for path in ("/optout/6.jpg", "/optout/7.jpg", "/optout-ua/8.jpg"):
        assert hits[path] == 1, f"{path} fetched {hits[path]} times"
    assert hits["/private/9.jpg"] == 0
    assert hits["/robots.txt"] == 1
    assert not any(path.startswith("/robots.txt") for path in crawl.web.internal.hits)


def test_retries_follow_the_policy_and_say_how_many_attempts(crawl: CrawlResult):
    web, hits = crawl.web, crawl.web.public.hits
    detail = crawl.ledger.set_index("url")["detail"]
    public = web.public.base_url
    assert hits["/flaky/3.jpg"] == 2 and detail[f"{public}/flaky/3.jpg"] == "fetched after 2 attempts"
    assert hits["/down"] == 3 and detail[f"{public}/down"].endswith("after 3 attempts")
    assert "HTTP 503" in detail[f"{public}/down"]
    assert hits["/missing.jpg"] == 1 and detail[f"{public}/missing.jpg"] == "HTTP 404 Not Found after 1 attempt"
    assert hits["/limited-long"] == 1 and "Retry-After" in detail[f"{public}/limited-long"]
    assert hits["/limited-always"] == 3
    for path in ("/limited-once/4.jpg", "/limited-always"):  # Retry-After: 1 was honoured
        times = web.public.hit_times[path]
        assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(times)), times


def test_slow_and_silent_servers_end_within_the_deadline(crawl: CrawlResult):
    detail = crawl.ledger.set_index("url")["detail"]
    public = crawl.web.public.base_url
    assert "deadline" in detail[f"{public}/drip/a"] and "deadline" in detail[f"{public}/drip-headers"]
    assert detail[f"{public}/hang/a"].endswith("deadline after 2 attempts")  # read timeout (2 s), retried


def test_bodies_are_capped_and_memory_stays_flat(crawl: CrawlResult):
    sent = crawl.web.public.bytes_sent
    max_bytes = DownloadConfig().max_bytes
    assert sent["/huge-declared"] < HUGE_BYTES / 8, "a declared 2 GiB body should be refused before reading"
    assert max_bytes <= sent["/huge-stream"] < HUGE_BYTES / 4, "an undeclared body is read up to the cap"
    assert crawl.rss_growth_mb < 600, f"resident memory grew by {crawl.rss_growth_mb:.0f} MB"


def test_good_images_are_kept_with_the_hash_of_the_served_bytes(crawl: CrawlResult):
    web, ledger = crawl.web, crawl.ledger.set_index("url")
    for i in range(2, GOOD_IMAGES):
        row = ledger.loc[f"{web.public.base_url}/img/{i}.jpg"]
        assert row["sha256"] == hashlib.sha256(web.images[i]).hexdigest()
        assert (row["width"], row["height"]) == (64, 48)
    assert ledger.loc[f"{web.public.base_url}/redirect-good", "sha256"] == hashlib.sha256(web.images[1]).hexdigest()


def test_shards_record_the_real_url_and_no_scratch_files_remain(crawl: CrawlResult):
    kept = crawl.ledger[crawl.ledger.status == "kept"]
    metas = []
    for tar_path in (crawl.run_dir / "download").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {m["uid"]: m["url"] for m in metas} == dict(zip(kept.uid, kept.url, strict=True))
    parquet = pq.read_table(next((crawl.run_dir / "download").glob("*.parquet"))).to_pandas()
    assert len(parquet) == len(crawl.ledger) and parquet["url"].str.startswith("http").all()
    failed = parquet[parquet.status != "success"]
    assert failed["error_message"].str.match(r"^[a-z_0-9]+: ").all()  # our reason, not img2dataset's placeholder
    stats = json.loads(next((crawl.run_dir / "download").glob("*_stats.json")).read_text())
    assert not any("curate-fetch-failed" in message for message in stats["status_dict"])
    leftovers = [p for p in (crawl.run_dir / "download").rglob("*") if "_fetched" in p.parts or p.suffix == ".arrow"]
    assert not leftovers


def test_without_the_guard_img2dataset_fetches_directly(tmp_path: Path):
    with LoopbackWeb() as web:
        urls = [f"{web.public.base_url}/img/{i}.jpg" for i in range(5)]
        table = tmp_path / "crawl.parquet"
        pd.DataFrame({"url": urls, "caption": ["x"] * 5}).to_parquet(table)
        raw = {
            "output": str(tmp_path / "run"),
            "stages": ["input", "download"],
            "input": {"path": str(table)},
            "download": {"guarded_fetch": False, "image_size": 64, "threads": 4, "processes": 1},
        }
        assert run_pipeline(validate_config(raw)).complete
        assert web.public.hits["/robots.txt"] == 0  # img2dataset's own fetch, no robots.txt
    ledger = read_ledger(tmp_path / "run")
    assert (ledger.status == "kept").all()
    assert set(ledger.sha256) == {hashlib.sha256(image).hexdigest() for image in web.images[:5]}


def test_the_connection_goes_to_the_address_that_was_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and to an internal one
    a moment later must still be fetched from the checked address."""
    real_getaddrinfo, answers = socket.getaddrinfo, iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])

    def rebinding_getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo(next(answers) if host == "rebind.test" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    with LoopbackWeb() as web:
        port = web.public.server_address[1]
        config = DownloadConfig(allow_hosts=[f"rebind.test:{port}"], respect_robots_txt=False)
        fetcher = GuardedFetcher(config)
        outcome = fetcher.fetch_to_file(f"http://rebind.test:{port}/img/3.jpg", tmp_path / "x")
        assert isinstance(outcome, Fetched) and (tmp_path / "x").read_bytes() == web.images[3]
        assert sum(web.internal.hits.values()) == 0
    with pytest.raises(httpcore.ConnectError, match="no checked address"):
        fetcher.backend.connect_tcp("127.0.0.1", port)  # nothing pinned in this thread: fail closed


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls_verifies_the_requested_name_and_never_shares_a_connection_between_names(tmp_path: Path):
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", "key.pem", "-out", "cert.pem"),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    names_sent: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    context.sni_callback = lambda _socket, name, _context: names_sent.append(name)
    server = _WebServer("127.0.0.1", lambda handler, path: handler.send(200, b"image bytes"))
    server.RequestHandlerClass = type("KeepAlive", (_Handler,), {"protocol_version": "HTTP/1.1"})
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        port = server.server_address[1]
        fetcher = GuardedFetcher(DownloadConfig(allow_hosts=["localhost", "127.0.0.1"], respect_robots_txt=False))
        trusted = ssl.create_default_context(cafile=tmp_path / "cert.pem")
        fetcher.client = httpx.Client(transport=PinnedTransport(fetcher.backend, httpx.Limits(), trusted))
        for name in ("a", "b"):
            assert isinstance(fetcher.fetch_to_file(f"https://localhost:{port}/{name}", tmp_path / name), Fetched)
        by_address = fetcher.fetch_to_file(f"https://127.0.0.1:{port}/c", tmp_path / "c")
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(by_address, FetchFailure) and by_address.reason == "ssl_error"  # the cert names localhost
    assert names_sent == ["localhost", None]  # one kept-alive connection for the name, a new one for the address


# --- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("224.0.0.1", False),
        ("::", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("fe80::1", False),
        ("fec0::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("::ffff:8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_only_globally_routable_addresses_are_public(address: str, public: bool):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_the_allow_list_takes_a_host_or_a_host_and_port():
    with_port = AddressGuard(["127.0.0.1:8765"])
    assert with_port.resolve("127.0.0.1", 8765) == "127.0.0.1"
    with pytest.raises(FetchError) as refused:
        with_port.resolve("127.0.0.1", 8766)
    assert refused.value.reason == "blocked_address" and not refused.value.requested
    any_port = AddressGuard(["LOCALHOST", "[::1]:8080"])
    assert any_port.resolve("localhost", 1234) == "127.0.0.1"
    assert any_port.is_allowed_host("::1", 8080) and not any_port.is_allowed_host("::1", 8081)
    for spelling in ("localhost", "2130706433", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"):
        with pytest.raises(FetchError, match="not a public address"):
            AddressGuard([]).resolve(spelling, 80)


def test_x_robots_tag_directives_follow_img2dataset_semantics():
    directives = {"noai", "noimageai"}
    opts_out = lambda *values: opt_out_directive(  # noqa: E731
        httpx.Headers([("X-Robots-Tag", v) for v in values]), "curate", directives
    )
    assert opts_out("noai")
    assert opts_out("noindex, NoImageAI")
    assert opts_out("curate: noai")
    assert not opts_out("otherbot: noai")
    assert not opts_out("noindex", "nofollow")
    assert opts_out("otherbot: noai", "noimageai")


def test_retry_after_is_read_as_seconds_or_a_date():
    assert parse_retry_after("7") == 7
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= parse_retry_after(later) <= 61  # type: ignore[operator]


def test_declared_pixels_are_checked_from_the_header(tmp_path: Path):
    bomb, small, junk = tmp_path / "bomb.png", tmp_path / "small.jpg", tmp_path / "junk.jpg"
    bomb.write_bytes(png_bomb())
    small.write_bytes(small_jpegs(1)[0])
    junk.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(FetchError) as refused:
        check_declared_pixels(bomb, max_pixels=100_000_000)
    assert refused.value.reason == "decompression_bomb"
    with pytest.raises(FetchError, match="64x48"):
        check_declared_pixels(small, max_pixels=1000)
    check_declared_pixels(small, max_pixels=64 * 48)
    check_declared_pixels(junk, max_pixels=1000)  # undecodable bytes are img2dataset's to judge


# --- robots.txt (RFC 9309, through protego) ----------------------------------------------------------

RFC_ROBOTS_TXT = b"""\
User-agent: *
Disallow: /*.jpg$
Disallow: /private/
Allow: /private/ok/

User-agent: otherbot
Disallow: /

User-agent: curate
Disallow: /not-for-curate/
Allow: /not-for-curate/but-this/
"""


def robots_allows(body: bytes, path: str, agent: str = "curate") -> bool:
    try:
        parse_robots(200, body).check(f"http://example.com{path}", agent)
    except FetchError as err:
        assert err.reason == "robots_txt" and not err.requested
        return False
    return True


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/a.jpg", False),  # `*` and `$`: any path ending in .jpg
        ("/deep/down/b.jpg", False),
        ("/a.jpg?x=1", True),  # `$` anchors the end of path and query: this one does not end in .jpg
        ("/a.jpeg", True),
        ("/private/x.png", False),
        ("/private/ok/x.png", True),  # the longer Allow wins over the shorter Disallow, whatever their order
        ("/private/ok/x.jpg", True),  # /private/ok/ (12 octets) is longer than /*.jpg$ (7)
    ],
)
def test_robots_wildcards_and_the_longest_match_for_other_agents(path: str, allowed: bool):
    assert robots_allows(RFC_ROBOTS_TXT, path, agent="somebot") is allowed


def test_robots_group_for_our_token_replaces_the_star_group():
    assert robots_allows(RFC_ROBOTS_TXT, "/a.jpg")  # our group has no /*.jpg$ rule
    assert not robots_allows(RFC_ROBOTS_TXT, "/not-for-curate/x.jpg")
    assert robots_allows(RFC_ROBOTS_TXT, "/not-for-curate/but-this/x.jpg")
    assert robots_allows(RFC_ROBOTS_TXT, "/not-for-curate/x.png", agent="somebot")
    assert not robots_allows(RFC_ROBOTS_TXT, "/anything", agent="otherbot")
    assert robots_allows(b"User-agent: CURATE\nDisallow: /x\n", "/y") and not robots_allows(
        b"User-agent: CURATE\nDisallow: /x\n", "/x"
    )  # user-agent lines match case-insensitively
    assert not robots_allows(b"\xef\xbb\xbfUser-agent: curate\nDisallow: /\n", "/x")  # a UTF-8 BOM is ignored


def test_robots_agent_is_our_product_tokens_not_the_header_comment():
    assert robots_agent(DownloadConfig()) == "curate"
    assert robots_agent(DownloadConfig(user_agent_token="curate-demo")) == "curate-demo curate"
    assert robots_agent(DownloadConfig(user_agent_token=None, user_agent="Acme/2.0 (dataset crawl)")) == "acme"
    # "dataset" is a word of our User-Agent's comment, not a product token: its group is not ours
    body = b"User-agent: dataset\nDisallow: /\n\nUser-agent: curate-demo\nDisallow: /demo/\n"
    agent = robots_agent(DownloadConfig(user_agent_token="curate-demo"))
    assert robots_allows(body, "/x", agent) and not robots_allows(body, "/demo/x", agent)


def test_the_fetcher_obeys_rfc_robots_rules_for_its_token(tmp_path: Path):
    image = small_jpegs(1)[0]
    robots = b"User-agent: *\nDisallow: /\n\nUser-agent: curate-test\nDisallow: /*.png$\nAllow: /\n"

    def serve(handler: _Handler, path: str) -> None:
        handler.send(200, robots, "text/plain") if path == "/robots.txt" else handler.send(200, image)

    server = _WebServer("127.0.0.1", serve)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        config = DownloadConfig(allow_hosts=[server.base_url.removeprefix("http://")], user_agent_token="curate-test")
        fetcher = GuardedFetcher(config)
        outcomes = {p: fetcher.fetch_to_file(f"{server.base_url}{p}", tmp_path / "x") for p in ("/a.jpg", "/b.png")}
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(outcomes["/a.jpg"], Fetched)
    refused = outcomes["/b.png"]
    assert isinstance(refused, FetchFailure) and (refused.status.value, refused.reason) == ("dropped", "robots_txt")
    assert server.hits == {"/robots.txt": 1, "/a.jpg": 1}


def test_at_most_per_host_connections_requests_reach_one_host_at_once(tmp_path: Path):
    image = small_jpegs(1)[0]
    in_flight, peak, lock = [0], [0], threading.Lock()

    def serve(handler: _Handler, path: str) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.15)  # long enough for the other fetch threads to pile up on the host
        with lock:
            in_flight[0] -= 1
        handler.send(200, image)

    server = _WebServer("127.0.0.1", serve)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        config = DownloadConfig(
            allow_hosts=[server.base_url.removeprefix("http://")], respect_robots_txt=False, per_host_connections=2
        )
        fetcher = GuardedFetcher(config)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(
                pool.map(lambda i: fetcher.fetch_to_file(f"{server.base_url}/{i}.jpg", tmp_path / f"{i}"), range(12))
            )
    finally:
        server.shutdown()
        server.server_close()
    assert all(isinstance(outcome, Fetched) for outcome in outcomes)
    assert peak[0] == 2  # 8 threads, 12 images: never more than 2 at once, and 2 were


def test_connection_errors_and_408_are_retried_with_doubling_delays_and_the_user_agent_names_the_tool(
    tmp_path: Path,
):
    image = small_jpegs(1)[0]
    agents: list[str | None] = []

    def serve(handler: _Handler, path: str) -> None:
        agents.append(handler.headers.get("User-Agent"))
        if path == "/busy.jpg" and handler.server.hits[path] <= 2:
            handler.send(408, b"request timeout", "text/plain")
        elif path == "/forbidden.jpg":
            handler.send(403, b"no", "text/plain")
        else:
            handler.send(200, image)

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    server = _WebServer("127.0.0.1", serve)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        allow = [server.base_url.removeprefix("http://"), f"127.0.0.1:{closed_port}"]
        config = DownloadConfig(allow_hosts=allow, respect_robots_txt=False, retries=2, backoff_s=0.2)
        fetcher = GuardedFetcher(config)
        busy = fetcher.fetch_to_file(f"{server.base_url}/busy.jpg", tmp_path / "a")
        refused = fetcher.fetch_to_file(f"http://127.0.0.1:{closed_port}/x.jpg", tmp_path / "b")
        forbidden = fetcher.fetch_to_file(f"{server.base_url}/forbidden.jpg", tmp_path / "c")
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(busy, Fetched) and busy.attempts == 3  # 408 is retried
    first, second = (later - earlier for earlier, later in itertools.pairwise(server.hit_times["/busy.jpg"]))
    assert first >= 0.19 and second >= 0.39, (first, second)  # backoff_s, then twice that
    assert isinstance(refused, FetchFailure) and refused.status.value == "failed"
    assert refused.reason == "connection_error" and refused.attempts == 3
    assert refused.detail.endswith("after 3 attempts")
    assert isinstance(forbidden, FetchFailure) and forbidden.reason == "http_403" and forbidden.attempts == 1
    assert server.hits["/forbidden.jpg"] == 1  # a 4xx other than 408/429 is not retried
    default = DownloadConfig().user_agent
    assert default.startswith("curate/") and "+https://" in default  # the tool, and a contact
    assert set(agents) == {default}


def test_img2dataset_size_checks_are_reasons_and_fetched_bytes_stay_in_the_temp_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tempfile

    def jpeg(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
        return buffer.getvalue()

    sizes = {"/ok.jpg": (64, 48), "/tiny.jpg": (16, 40), "/wide.jpg": (200, 25), "/big.jpg": (200, 200)}
    served = {path: jpeg(*size) for path, size in sizes.items()}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    seen_during_fetch: list[list[str]] = []

    def serve(handler: _Handler, path: str) -> None:
        seen_during_fetch.append([p.name for p in scratch.iterdir()])
        handler.send(200, served[path])

    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    server = _WebServer("127.0.0.1", serve)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        table = tmp_path / "crawl.parquet"
        urls = [f"{server.base_url}{path}" for path in served]
        pd.DataFrame({"url": urls, "caption": ["x"] * len(urls)}).to_parquet(table)
        download = {"image_size": 64, "threads": 4, "processes": 1, "respect_robots_txt": False}
        download |= {"allow_hosts": [server.base_url.removeprefix("http://")]}
        download |= {"min_image_size": 20, "max_aspect_ratio": 3, "max_image_area": 30_000}
        raw = {"output": str(tmp_path / "run"), "stages": ["input", "download"], "input": {"path": str(table)}}
        assert run_pipeline(validate_config({**raw, "download": download})).complete
    finally:
        server.shutdown()
        server.server_close()
    ledger = read_ledger(tmp_path / "run")
    fates = {
        row.url.rsplit("/", 1)[1]: (row.status, None if pd.isna(row.reason) else row.reason)
        for row in ledger.itertuples()
    }
    assert fates == {
        "ok.jpg": ("kept", None),
        "tiny.jpg": ("dropped", "min_side"),
        "wide.jpg": ("dropped", "max_aspect_ratio"),
        "big.jpg": ("dropped", "max_image_area"),
    }
    assert len(seen_during_fetch) == 4  # each fetch wrote into a curate-fetch-* folder of the temp directory
    assert all(any(name.startswith("curate-fetch-") for name in names) for names in seen_during_fetch)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("curate-")]  # removed when the shard was done
