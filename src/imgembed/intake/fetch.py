"""Downloading images from http(s) URLs, safely.

- The host is resolved once, every address is checked (private, loopback, link-local,
  cloud metadata and other non-public addresses are refused unless allowed; so is every
  IPv6 form that carries an IPv4 address, by that address), and the request goes to the
  checked address (Host header and TLS SNI keep the name), so DNS cannot be switched between
  check and use. Every redirect is checked the same way.
- One deadline bounds a whole download: DNS, connecting, redirects, headers, body and the
  retries with their back-off. A per-read timeout alone cannot stop a server that trickles a
  byte at a time, so downloads run as tasks on one event-loop thread, where the deadline
  cancels whatever is in progress. Retries happen only within the deadline.
- At most `max_connections` downloads run at once; a download's deadline starts when it gets
  its turn, so waiting behind slow downloads never counts against a fast one.
- The size limit is enforced while streaming. Retries with exponential back-off on transient
  failures only (timeouts, connection errors, 5xx, 429); never on other 4xx, bad content types
  or oversize bodies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
import threading
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import tenacity

from imgembed.errors import (
    FetchError,
    ImageTooLargeError,
    InvalidSourceError,
    SourceNotAllowedError,
)
from imgembed.loop_thread import LoopThread

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
MAX_REDIRECTS = 5
# Servers label images loosely; these are refused as clearly not images.
_NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/javascript")

# IPv6 ranges that carry an IPv4 address a translator or relay would deliver to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_IPV4_CARRIERS_REFUSED = (
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated; some stacks still route it)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, obsolete)
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64: a private translator, any layout
)


def is_public(address: IPAddress) -> bool:
    """A globally reachable unicast address. An IPv6 address that carries an IPv4 address is
    judged by it: IPv4-mapped ones by the IPv4 address alone (the socket connects to it);
    NAT64, 6to4, Teredo and ISATAP ones only if the IPv4 address is public and the IPv6
    address is itself allowed; forms without a public use are refused outright."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return is_public(address.ipv4_mapped)
        if any(address in network for network in _IPV4_CARRIERS_REFUSED):
            return False
        if not all(is_public(inner) for inner in _embedded_ipv4(address)):
            return False
    return address.is_global and not address.is_multicast


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded = []
    if address in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour:
        embedded.append(address.sixtofour)
    if address.teredo:
        embedded.extend(address.teredo)  # server and (de-obfuscated) client
    if (int(address) >> 32) & 0xFDFFFFFF == 0x5EFE:  # ISATAP interface id (::0:5efe, ::200:5efe)
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return embedded


def allow_all(address: IPAddress) -> bool:
    return True


class _Transient(Exception):
    """A failure worth retrying; carries the error to raise if retries run out."""

    def __init__(self, error: FetchError):
        super().__init__(str(error))
        self.error = error


class Fetcher:
    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float = 30.0,
        deadline: float | None = None,
        attempts: int = 3,
        retry_delay: float = 1.0,
        max_connections: int = 8,
        address_allowed: AddressPolicy = is_public,
        resolve: Callable[[str, int], list[str]] | None = None,
    ):
        """`timeout` bounds each network wait (connect, each read); `deadline` (default:
        `timeout`) the whole download, retries included."""
        self.max_bytes = max_bytes
        self.deadline = deadline or timeout
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.address_allowed = address_allowed
        self._resolve = resolve or _resolve
        self._turns = threading.BoundedSemaphore(max_connections)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
            headers={"User-Agent": "imgembed", "Accept": "image/*"},
        )
        self._loop = LoopThread("imgembed-fetch")

    def fetch(self, url: str) -> bytes:
        """The body of `url`; called from any thread (not from the fetch loop itself)."""
        with self._turns:  # waiting for a turn is not part of the deadline
            download = self._loop.submit(self._fetch(url))
            if download is None:
                raise FetchError("not downloaded: the service is stopping", url)
            try:
                return download.result()
            except concurrent.futures.CancelledError as exc:
                raise FetchError("not downloaded: the service stopped meanwhile", url) from exc

    def close(self) -> None:
        """Stop: downloads still running end at once with FetchError (a thread waiting on
        one would otherwise keep the process from exiting)."""
        self._loop.close(self._client.aclose)

    async def _fetch(self, url: str) -> bytes:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_before_delay(self.deadline),  # never back off past the deadline
            wait=tenacity.wait_exponential(multiplier=self.retry_delay, max=30),
            retry=tenacity.retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            async with asyncio.timeout(self.deadline):
                return await retrying(self._fetch_once, url)
        except TimeoutError as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise FetchError(
                f"not downloaded within the deadline of {self.deadline:g} s "
                f"(fetch_deadline; {_attempts(attempts)})",
                url,
            ) from exc
        except _Transient as transient:
            error = transient.error
            attempts = retrying.statistics.get("attempt_number", self.attempts)
            raise FetchError(
                f"{error.args[0]} (after {_attempts(attempts)})", url, error.status
            ) from transient

    async def _fetch_once(self, url: str) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            target, host = await self._pinned(current, url)
            try:
                async with self._client.stream(
                    "GET",
                    target,
                    headers={"Host": host},
                    extensions={"sni_hostname": _hostname(current)},
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    return await self._body(response, url)
            except httpx.InvalidURL as exc:
                raise FetchError(f"invalid URL {current}: {exc}", url) from exc
            except httpx.TimeoutException as exc:
                raise _Transient(FetchError(f"timed out ({type(exc).__name__})", url)) from exc
            except httpx.TransportError as exc:
                raise _Transient(FetchError(f"connection failed: {exc}", url)) from exc
        raise FetchError(f"more than {MAX_REDIRECTS} redirects", url)

    async def _pinned(self, current: str, original: str) -> tuple[str, str]:
        """The URL with its host replaced by a checked address, and the Host header."""
        # the URL given is the caller's mistake; one a server redirected to is the server's
        invalid = InvalidSourceError if current == original else FetchError
        try:
            parts = urlsplit(current)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # e.g. a port out of range
            raise invalid(f"invalid URL {current}: {exc}", original) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid(f"not an http(s) URL with a host: {current}", original)
        try:
            # In a worker thread: the deadline can abandon a lookup that hangs.
            resolved = await asyncio.to_thread(self._resolve, parts.hostname, port)
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
        except OSError as exc:
            raise _Transient(
                FetchError(f"cannot resolve {parts.hostname}: {exc}", original)
            ) from exc
        refused = [a for a in addresses if not self.address_allowed(a)]
        if refused or not addresses:
            shown = refused[0] if refused else "none"
            raise SourceNotAllowedError(
                f"{parts.hostname} resolves to a non-public address ({shown}); "
                "set IMGEMBED_ALLOW_PRIVATE_URLS=true to allow private addresses",
                original,
            )
        address = addresses[0]
        netloc = f"[{address}]" if address.version == 6 else str(address)
        if parts.port:
            netloc += f":{parts.port}"
        host = parts.netloc.rpartition("@")[2]  # never forward credentials in the Host header
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host

    async def _body(self, response: httpx.Response, url: str) -> bytes:
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Transient(FetchError(f"server answered {status}", url, status))
        if status >= 400:
            raise FetchError(f"server answered {status}", url, status)
        if status != 200:
            raise FetchError(f"unexpected status {status}", url, status)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.startswith(_NOT_IMAGE_TYPES):
            raise FetchError(f"content type {content_type} is not an image", url, status)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLargeError(
                f"{int(declared):,} bytes announced, over the limit of {self.max_bytes:,} "
                "(max_file_size)",
                url,
            )
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageTooLargeError(
                    f"download passed the limit of {self.max_bytes:,} bytes (max_file_size)", url
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _attempts(count: int) -> str:
    return f"{count} attempt" + ("s" if count != 1 else "")


def _hostname(url: str) -> str:
    return urlsplit(url).hostname or ""


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))
