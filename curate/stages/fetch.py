"""Guarded fetch: what stands between a crawl table written by strangers and our network.

img2dataset's fetch (urllib, one read timeout, no size limit, any address) is replaced by this step;
img2dataset still decodes, resizes, hashes and writes the shard. For each URL the fetcher

- resolves the host once and connects to the address it checked (no second DNS lookup), refusing
  addresses that are not globally routable unless the host is in `download.allow_hosts`; every
  redirect hop is checked the same way, and there are at most `max_redirects` of them;
- honours robots.txt (fetched through the same guard, once per host per worker) and X-Robots-Tag
  opt-outs, read from the response headers before the body, never retried;
- streams the body to a file under a byte cap and a whole-request deadline, then reads the image's
  declared size from its header to refuse decompression bombs before anything decodes them;
- retries transient failures (timeouts, connection errors, 5xx, 408, 429) with exponential backoff,
  honouring Retry-After up to a bound, and caps concurrent requests per host.

Every expected failure ends as a `FetchFailure` with a ledger reason code; anything else is a bug.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import http.cookiejar
import ipaddress
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx
from PIL import Image
from protego import Protego

from curate.config import DownloadConfig
from curate.ledger import Status

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DROPPED_REASONS = frozenset({"blocked_address", "opt_out", "robots_txt"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
ROBOTS_MAX_BYTES = 512 * 1024  # what RFC 9309 asks crawlers to parse at least
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
HOST_STRIPES = 4096
ROBOTS_CACHE_SIZE = 4096


class FetchError(Exception):
    """An expected way for one URL to fail; `reason` is its ledger code."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        requested: bool = True,
    ) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.retryable, self.retry_after = retryable, retry_after
        self.requested = requested  # False: refused before any request was sent

    @property
    def status(self) -> Status:
        return Status.DROPPED if self.reason in DROPPED_REASONS else Status.FAILED


@dataclass(frozen=True)
class Fetched:
    path: Path
    final_url: str
    size: int
    attempts: int


@dataclass(frozen=True)
class FetchFailure:
    status: Status
    reason: str
    detail: str
    attempts: int


FetchOutcome = Fetched | FetchFailure


# --- the address guard -----------------------------------------------------------------------------


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (not loopback, private, CGNAT, link-local, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return is_public_address(inner)
        if ip.is_site_local:
            return False
    # is_global alone lets multicast (224/4, ff00::/8) and parts of ::/8 through
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_private
    )


def address_kind(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        return f"stands for {inner}, {address_kind(inner)}"
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    return "not globally routable"


class AddressGuard:
    """Resolves a host once and returns an address that may be contacted, or raises blocked_address."""

    def __init__(self, allow_hosts: list[str]) -> None:
        self.allowed = {normalize_host_entry(entry) for entry in allow_hosts}

    def is_allowed_host(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return host in self.allowed or f"{host}:{port}" in self.allowed

    def resolve(self, host: str, port: int) -> str:
        candidates = resolve_host(host, port)
        if self.is_allowed_host(host, port):
            return str(candidates[0])
        for ip in candidates:
            if is_public_address(ip):
                return str(ip)
        first = candidates[0]
        named = host if str(first) == host.strip("[]") else f"{host} resolves to {first}, which"
        raise FetchError("blocked_address", f"{named} is not a public address ({address_kind(first)})", requested=False)


def normalize_host_entry(entry: str) -> str:
    """'Example.COM' -> 'example.com'; '[::1]:8080' -> '::1:8080' (the form `is_allowed_host` builds)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host + rest
    return entry


def resolve_host(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError(
            "connection_error",
            f"cannot resolve {host}: {err.strerror}",
            retryable=err.errno == socket.EAI_AGAIN,
            requested=False,
        ) from None
    except UnicodeError:
        raise FetchError("invalid_url", f"host {host!r} is not a valid name", requested=False) from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not addresses:
        raise FetchError("connection_error", f"{host} has no address", requested=False)
    return addresses


# --- opt-outs ----------------------------------------------------------------------------------------


def opt_out_directive(headers: httpx.Headers, user_agent_token: str | None, directives: set[str]) -> str | None:
    """The X-Robots-Tag value that opts out (img2dataset's semantics: an optional 'token:' prefix
    restricts a value to that user agent), or None."""
    token = user_agent_token.strip().lower() if user_agent_token else None
    for value in headers.get_list("x-robots-tag"):
        scope, _, listed = value.partition(":") if ":" in value else ("", "", value)
        scope = scope.strip().lower()
        if scope and scope != token:
            continue
        if any(directive.strip().lower() in directives for directive in listed.split(",")):
            return value
    return None


class RobotsRules:
    """robots.txt of one origin: parsed rules, 'allow everything', or the fetch failure to repeat.

    Protego implements RFC 9309's matching: `*` and `$` in paths, the longest matching rule wins
    (Allow on a tie), and the group whose user-agent line best matches our product token applies.
    """

    def __init__(self, parser: Protego | None, failure: FetchError | None = None) -> None:
        self.parser, self.failure = parser, failure

    def check(self, url: str, robots_agent: str) -> None:
        if self.failure is not None:
            raise FetchError(self.failure.reason, self.failure.detail, requested=False)
        if self.parser is not None and not self.parser.can_fetch(url, robots_agent):
            raise FetchError("robots_txt", "disallowed by robots.txt for our user agent", requested=False)


def parse_robots(status_code: int, body: bytes) -> RobotsRules:
    """RFC 9309: 2xx -> the rules; 4xx -> no rules; 5xx (and 429) -> assume complete disallow."""
    if 200 <= status_code < 300:
        return RobotsRules(Protego.parse(body.decode("utf-8-sig", errors="replace")))  # -sig: drop a BOM
    if 400 <= status_code < 500 and status_code != 429:
        return RobotsRules(None)
    return RobotsRules(None, FetchError("robots_txt", f"robots.txt answered HTTP {status_code}: assuming disallow"))


# --- deadlines, retries, image headers ---------------------------------------------------------------


class Deadline:
    """A whole-request time budget, started when the first request of a row actually goes out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started_at: float | None = None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def remaining(self) -> float:
        if self.started_at is None:
            return self.seconds
        return self.seconds - (time.monotonic() - self.started_at)

    def check(self, slack: float = 0.0) -> None:
        if self.remaining() <= slack:
            raise FetchError("timeout", f"no complete response within the {self.seconds:g} s deadline", retryable=True)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_declared_pixels(path: Path, max_pixels: int) -> None:
    """Refuse an image whose header declares more than `max_pixels`; reads the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:  # not an OSError: Pillow's own, larger limit
        raise FetchError("decompression_bomb", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return  # not a header Pillow can read: img2dataset's decoder gives the verdict
    if width * height > max_pixels:
        raise FetchError(
            "decompression_bomb", f"declares {width}x{height} = {width * height} pixels, over max_pixels {max_pixels}"
        )


@contextlib.contextmanager
def httpx_errors_as_fetch_errors() -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as err:
        raise FetchError("timeout", f"timed out ({type(err).__name__})", retryable=True) from None
    except httpx.ConnectError as err:
        if "SSL" in str(err) or "certificate" in str(err):
            raise FetchError("ssl_error", str(err)) from None
        raise FetchError("connection_error", str(err) or type(err).__name__, retryable=True) from None
    except (httpx.NetworkError, httpx.RemoteProtocolError) as err:
        raise FetchError("connection_error", str(err) or type(err).__name__, retryable=True) from None
    except httpx.LocalProtocolError as err:
        raise FetchError("invalid_url", str(err)) from None
    except httpx.DecodingError as err:
        raise FetchError("decode_error", f"cannot decode the response body: {err}") from None


def parse_url(raw: str) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError, TypeError) as err:
        raise FetchError("invalid_url", f"cannot parse {raw!r}: {err}", requested=False) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchError("invalid_url", f"not an http(s) URL with a host: {raw!r}", requested=False)
    return url


def default_port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def no_cookies() -> http.cookiejar.CookieJar:
    """A crawler keeps no state between requests; a shared jar would also grow without bound."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


# --- connecting to the checked address --------------------------------------------------------------


class PinnedBackend(httpcore.SyncBackend):
    """Opens connections only to the address the guard checked for this thread's request: no second DNS
    lookup (DNS rebinding), while URLs keep their host name, so the Host header, TLS SNI, certificate
    checks and the keep-alive pool (keyed by name) all work as usual. Its connections also hold every
    read and write to the deadline of the request using them."""

    def __init__(self) -> None:
        self._scope = threading.local()

    @contextlib.contextmanager
    def request_scope(self, host: str, port: int, address: str, deadline: Deadline) -> Iterator[None]:
        self._scope.target, self._scope.deadline = (host, port, address), deadline
        try:
            yield
        finally:
            self._scope.target = self._scope.deadline = None

    def current_deadline(self) -> Deadline | None:
        return getattr(self._scope, "deadline", None)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        target = getattr(self._scope, "target", None)
        if target is None or target[:2] != (host, port):
            raise httpcore.ConnectError(f"refusing to connect to {host}:{port}: no checked address")
        stream = super().connect_tcp(target[2], port, timeout, local_address, socket_options)
        return DeadlineStream(stream, self)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the deadline of the request using it (the pool
    hands kept-alive connections to later requests), so a server that drips its headers a byte at a
    time is cut off too, not only one that drips its body."""

    def __init__(self, stream: httpcore.NetworkStream, backend: PinnedBackend) -> None:
        self.stream, self.backend = stream, backend

    def _bounded(self, timeout: float | None) -> float | None:
        deadline = self.backend.current_deadline()
        if deadline is None:
            return timeout
        deadline.check()
        return deadline.remaining() if timeout is None else min(timeout, deadline.remaining())

    @contextlib.contextmanager
    def _deadline_named(self) -> Iterator[None]:
        """A socket timeout that fired because the deadline ran out is reported as the deadline."""
        try:
            yield
        except httpcore.TimeoutException:
            deadline = self.backend.current_deadline()
            if deadline is not None:
                deadline.check(slack=0.05)  # the socket timeout was set to what remained
            raise

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with self._deadline_named():
            return self.stream.read(max_bytes, self._bounded(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with self._deadline_named():
            self.stream.write(buffer, self._bounded(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, self._bounded(timeout)), self.backend)

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport, with its connection pool connecting through a `PinnedBackend`."""

    def __init__(self, backend: PinnedBackend, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx takes no network backend, so its pool is replaced; fail loudly if that pool moved
        assert isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool), "httpx internals changed"
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


# --- the fetcher -------------------------------------------------------------------------------------


class GuardedFetcher:
    """Thread-safe: one per worker process, shared by the fetch threads of every shard it downloads."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self.guard = AddressGuard(cfg.allow_hosts)
        self.user_agent = user_agent_string(cfg)
        self.robots_agent = robots_agent(cfg)
        self.directives = {d.strip().lower() for d in cfg.disallowed_header_directives}
        self.backend = PinnedBackend()
        self.client = httpx.Client(
            headers={"User-Agent": self.user_agent, "Accept-Encoding": "identity"},
            cookies=no_cookies(),
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would bypass the address guard
            transport=PinnedTransport(
                self.backend, httpx.Limits(max_connections=None, max_keepalive_connections=cfg.threads)
            ),
        )
        # A worker meets millions of hosts over a run, so per-host state is bounded: hosts share slots and
        # robots.txt fetch locks by hash stripe (a collision only makes the cap stricter), and robots.txt
        # answers live in an LRU cache.
        self._lock = threading.Lock()
        self._host_slots = [threading.BoundedSemaphore(cfg.per_host_connections) for _ in range(HOST_STRIPES)]
        self._robots_locks = [threading.Lock() for _ in range(HOST_STRIPES)]
        self._robots: collections.OrderedDict[str, RobotsRules] = collections.OrderedDict()

    def close(self) -> None:
        self.client.close()

    def fetch_to_file(self, url: str, dest: Path) -> FetchOutcome:
        """Fetch `url` into `dest`; a failure leaves no file behind and says why, with the attempts made."""
        deadline = Deadline(self.cfg.deadline_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                final_url, size = self._fetch_once(url, dest, deadline)
                check_declared_pixels(dest, self.cfg.max_pixels)
                return Fetched(dest, final_url, size, attempt)
            except FetchError as err:
                dest.unlink(missing_ok=True)
                delay = self._retry_delay(err, attempt, deadline)
                if delay is None:
                    return failure_of(err, attempt)
                time.sleep(delay)

    def fetch_bytes(self, url: str, max_bytes: int) -> tuple[int, bytes]:
        """One small document (robots.txt): (status code, body), any status accepted, no robots check."""
        current = parse_url(url)
        deadline = Deadline(self.cfg.deadline_s)
        for _ in range(self.cfg.max_redirects + 1):
            with self._request(current, deadline, check_robots=False) as response:
                location = redirect_target(response, current)
                if location is None:
                    return response.status_code, read_capped(response, max_bytes, deadline)
            current = location
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _fetch_once(self, url: str, dest: Path, deadline: Deadline) -> tuple[str, int]:
        current = parse_url(url)
        for hop in range(self.cfg.max_redirects + 1):
            try:
                with self._request(current, deadline, check_robots=self.cfg.respect_robots_txt) as response:
                    location = redirect_target(response, current)
                    if location is None:
                        self._check_response(response)
                        return str(current), write_capped(response, dest, self.cfg.max_bytes, deadline)
            except FetchError as err:
                if hop and not err.requested:
                    err.detail, err.requested = f"redirected to {current}: {err.detail}", True
                raise
            current = location
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    @contextlib.contextmanager
    def _request(self, url: httpx.URL, deadline: Deadline, check_robots: bool) -> Iterator[httpx.Response]:
        """GET one hop: guard the address, obey robots.txt, hold a host slot, connect to the checked address."""
        host, port = url.host, default_port(url)
        address = self.guard.resolve(host, port)
        if check_robots:
            self._robots_rules(url).check(str(url), self.robots_agent)
        with (
            self._host_slot(f"{host}:{port}"),
            self.backend.request_scope(url.raw_host.decode("ascii"), port, address, deadline),
            httpx_errors_as_fetch_errors(),
        ):
            deadline.start()
            deadline.check()
            per_read = min(self.cfg.timeout, deadline.remaining())
            with self.client.stream("GET", url, timeout=httpx.Timeout(per_read)) as response:
                yield response

    def _check_response(self, response: httpx.Response) -> None:
        """Status and headers, before any of the body is read."""
        code = response.status_code
        if code in RETRYABLE_CLIENT_STATUSES or code >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after")) if code == 429 else None
            raise FetchError(f"http_{code}", http_detail(response), retryable=True, retry_after=retry_after)
        if not 200 <= code < 300:
            raise FetchError(f"http_{code}", http_detail(response))
        if self.directives:
            value = opt_out_directive(response.headers, self.cfg.user_agent_token, self.directives)
            if value is not None:
                raise FetchError("opt_out", f"X-Robots-Tag: {value}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_bytes:
            raise FetchError("too_large", f"Content-Length {declared} is over max_bytes {self.cfg.max_bytes}")

    def _retry_delay(self, err: FetchError, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if not err.retryable or attempt > self.cfg.retries:
            return None
        delay = self.cfg.backoff_s * 2 ** (attempt - 1)
        if err.retry_after is not None:
            if err.retry_after > self.cfg.max_retry_after_s:
                err.detail += f" (Retry-After {err.retry_after:g} s is over max_retry_after_s)"
                return None
            delay = err.retry_after
        if delay >= deadline.remaining():
            return None
        return delay

    @contextlib.contextmanager
    def _host_slot(self, host: str) -> Iterator[None]:
        with self._host_slots[stripe(host)]:
            yield

    def _robots_rules(self, url: httpx.URL) -> RobotsRules:
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        rules = self._cached_robots(origin)
        if rules is not None:
            return rules
        with self._robots_locks[stripe(origin)]:  # one fetch per origin; the other threads wait for its answer
            rules = self._cached_robots(origin)
            if rules is None:
                rules = self._fetch_robots(origin)
                with self._lock:
                    self._robots[origin] = rules
                    if len(self._robots) > ROBOTS_CACHE_SIZE:
                        self._robots.popitem(last=False)
            return rules

    def _cached_robots(self, origin: str) -> RobotsRules | None:
        with self._lock:
            rules = self._robots.get(origin)
            if rules is not None:
                self._robots.move_to_end(origin)
            return rules

    def _fetch_robots(self, origin: str) -> RobotsRules:
        try:
            status_code, body = self.fetch_bytes(f"{origin}/robots.txt", ROBOTS_MAX_BYTES)
        except FetchError as err:
            if err.reason == "too_large":  # RFC 9309: parse what we could read; we keep it simple and allow
                return RobotsRules(None)
            log.debug("robots.txt of %s: %s", origin, err.detail)
            return RobotsRules(None, FetchError(err.reason, f"robots.txt: {err.detail}"))
        return parse_robots(status_code, body)


def stripe(key: str) -> int:
    return zlib.crc32(key.encode()) % HOST_STRIPES


def user_agent_string(cfg: DownloadConfig) -> str:
    token = (cfg.user_agent_token or "").strip()
    if token and token.lower() not in cfg.user_agent.lower():
        return f"{cfg.user_agent} (compatible; {token})"
    return cfg.user_agent


def robots_agent(cfg: DownloadConfig) -> str:
    """The product tokens robots.txt groups are matched against: user_agent_token, then the User-Agent's
    product name ("curate" of "curate/0.1 (...)"); never the comment, whose words are not ours to match."""
    product = cfg.user_agent.split("/", 1)[0].split()[0] if cfg.user_agent.strip() else ""
    tokens = [(cfg.user_agent_token or "").strip().lower(), product.lower()]
    return " ".join(dict.fromkeys(token for token in tokens if token))


def redirect_target(response: httpx.Response, current: httpx.URL) -> httpx.URL | None:
    """The next hop, relative to the URL we were asked for (the request itself went to an address)."""
    location = response.headers.get("location")
    if response.status_code not in REDIRECT_STATUSES or not location:
        return None
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError) as err:
        raise FetchError("invalid_url", f"redirect to an unusable location {location!r}: {err}") from None
    return parse_url(str(target))


def http_detail(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def capped_chunks(response: httpx.Response, max_bytes: int, deadline: Deadline, too_large: str) -> Iterator[bytes]:
    """The body's chunks, stopping with FetchError at the byte cap (`too_large` is the detail) or the deadline."""
    size = 0
    with httpx_errors_as_fetch_errors():
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", too_large)
            deadline.check()
            yield chunk


def read_capped(response: httpx.Response, max_bytes: int, deadline: Deadline) -> bytes:
    return b"".join(capped_chunks(response, max_bytes, deadline, f"body over {max_bytes} bytes"))


def write_capped(response: httpx.Response, dest: Path, max_bytes: int, deadline: Deadline) -> int:
    """Stream the body into `dest`, stopping at the byte cap or the deadline; returns the size."""
    size = 0
    with open(dest, "wb") as sink:
        for chunk in capped_chunks(response, max_bytes, deadline, f"body over max_bytes {max_bytes} (stopped reading)"):
            size += len(chunk)
            sink.write(chunk)
    return size


def failure_of(err: FetchError, attempts: int) -> FetchFailure:
    if not err.requested and attempts == 1:
        return FetchFailure(err.status, err.reason, err.detail, 0)
    plural = "" if attempts == 1 else "s"
    return FetchFailure(err.status, err.reason, f"{err.detail} after {attempts} attempt{plural}", attempts)
