"""Fetch a URL someone else chose: http(s) only, public addresses only, bounded in time and size.

A URL list in a downloaded dataset (or a redirect from a server it names) may point anywhere: at this
machine (``127.0.0.1``), the private network, or a cloud metadata service (``169.254.169.254``). Every hop
is checked here before a connection is made: the scheme, the port, and every address the host name resolves
to; the connection then goes to the address that was checked (no second lookup an attacker's DNS could
answer differently). Redirects are followed by hand, each one checked the same way. The whole request,
headers and body, has one deadline, so a server that trickles a byte every few seconds cannot hold a worker.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

REDIRECTS = (301, 302, 303, 307, 308)


class Unfetchable(ValueError):
    """A URL that no retry can fetch: malformed, not http(s), a refused address, too large, or refused for
    good by the server (HTTP 4xx)."""


class FetchTimeout(TimeoutError):
    """The request as a whole ran past its deadline (worth another try later)."""


class RetryableHTTPError(OSError):
    """HTTP 5xx, 408 or 429: the server may answer another time."""


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may reach. ``allow_private_addresses`` lifts the address rule (a local mirror, tests)."""

    timeout: float = 20.0           # seconds for each connect and each read
    deadline: float = 60.0          # seconds for the whole request, redirects included
    max_bytes: int = 50 * 2**20
    max_redirects: int = 5
    allow_private_addresses: bool = False
    user_agent: str = "textbind-image-downloader/0.2 (research dataset preparation)"


def check_url(url: object) -> tuple[str, str, int, str]:
    """(scheme, host, port, path-and-query) of an http(s) URL, or :class:`Unfetchable` saying what is wrong."""
    if not isinstance(url, str):
        raise Unfetchable(f"a URL must be a string, not {type(url).__name__} {url!r:.60}")
    if not url or any(ord(char) < 33 or ord(char) == 127 for char in url):
        raise Unfetchable(f"URL {url[:80]!r} is empty or holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:  # http://[::1 , http://host:99999
        raise Unfetchable(f"URL {url[:80]!r} is malformed: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Unfetchable(f"only http(s) URLs are fetched, not {url[:60]!r}")
    if not parts.hostname:
        raise Unfetchable(f"URL {url[:80]!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise Unfetchable(f"URL {url[:80]!r} carries credentials; refused")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


def resolve(host: str, port: int, policy: FetchPolicy) -> str:
    """One address for ``host``, after checking every address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise OSError(f"cannot resolve {host!r}: {error}") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise OSError(f"{host!r} resolves to no address")
    if not policy.allow_private_addresses:
        refused = [address for address in addresses if not is_public(address)]
        if refused:
            raise Unfetchable(f"{host} resolves to {refused[0]}, a loopback, private, link-local, multicast or "
                              "reserved address; refused (pass --allow-private-addresses for a local mirror)")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self.raw_socket = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:  # the checked address, the certificate checked against the host name
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.raw_socket = self._context.wrap_socket(sock, server_hostname=self.host)


class _Deadline:
    """Closes the connection when the request's time is up, wherever it is blocked (headers or body)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise FetchTimeout("the request ran past its deadline")
        return left

    def check(self) -> None:
        if self.expired:
            raise FetchTimeout("the request ran past its deadline")

    def watch(self, connection: http.client.HTTPConnection) -> None:
        def expire() -> None:
            self.expired = True
            # the connection's own ``sock`` is None once a response that closes the connection has begun
            # (http.client hands the socket to the response); the socket we opened is still the one read
            sock = getattr(connection, "raw_socket", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        self.cancel()
        self._timer = threading.Timer(self.remaining(), expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def fetch(url: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """The body at ``url`` under ``policy``. Raises :class:`Unfetchable` (retrying will not help),
    :class:`FetchTimeout` or another ``OSError`` (it might)."""
    deadline = _Deadline(policy.deadline)
    scheme, host, port, path = check_url(url)
    for hop in range(policy.max_redirects + 1):
        address = resolve(host, port, policy)
        kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = kind(host, port, address, timeout=min(policy.timeout, deadline.remaining()))
        try:
            deadline.watch(connection)
            connection.request("GET", path, headers={"User-Agent": policy.user_agent, "Accept": "image/*",
                                                     "Connection": "close"})
            response = connection.getresponse()
            deadline.check()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise Unfetchable(f"HTTP {response.status} without a Location")
                target = urljoin(f"{scheme}://{host}:{port}{path}", location)
                next_scheme, next_host, next_port, next_path = check_url(target)
                if next_port != port and next_port not in (80, 443) and not policy.allow_private_addresses:
                    raise Unfetchable(f"redirect to port {next_port} ({target[:80]!r}) refused: a redirect may "
                                      "change the port only to 80 or 443")
                scheme, host, port, path = next_scheme, next_host, next_port, next_path
                continue
            if 400 <= response.status < 500 and response.status not in (408, 429):
                raise Unfetchable(f"HTTP {response.status} {response.reason}")
            if response.status >= 400 or response.status in (408, 429):
                raise RetryableHTTPError(f"HTTP {response.status} {response.reason}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise Unfetchable(f"Content-Length {int(length):,} is more than {policy.max_bytes:,} bytes")
            chunks, total = [], 0
            while True:
                chunk = response.read(min(65536, policy.max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > policy.max_bytes:
                    raise Unfetchable(f"more than {policy.max_bytes:,} bytes")
                deadline.remaining()
            deadline.check()  # a connection the deadline closed ends like a short body: not a success
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as error:
            if deadline.expired:
                raise FetchTimeout(f"no complete answer within {policy.deadline:g} s") from None
            if isinstance(error, (Unfetchable, FetchTimeout, RetryableHTTPError)):
                raise
            if isinstance(error, http.client.HTTPException):
                raise OSError(f"{type(error).__name__}: {error}") from None
            raise
        finally:
            deadline.cancel()
            connection.close()
    raise Unfetchable(f"more than {policy.max_redirects} redirects")
