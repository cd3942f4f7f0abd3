"""Downloading images from http(s) URLs, safely.

- The host is resolved once, every address is checked (private, loopback, link-local,
  cloud metadata and other non-public addresses are refused unless allowed), and the
  request goes to the checked address (Host header and TLS SNI keep the name), so DNS
  cannot be switched between check and use. Every redirect is checked the same way.
- Timeouts for connect and read; the size limit is enforced while streaming.
- Retries with exponential backoff on transient failures only (timeouts, connection
  errors, 5xx, 429); never on other 4xx, bad content types or oversize bodies.
- One shared connection pool with a bounded number of connections.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import tenacity

from imgembed.errors import FetchError, ImageTooLargeError, SourceNotAllowedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
MAX_REDIRECTS = 5
# Servers label images loosely; these are refused as clearly not images.
_NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/javascript")


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


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
        attempts: int = 3,
        retry_delay: float = 1.0,
        max_connections: int = 8,
        address_allowed: AddressPolicy = is_public,
        resolve: Callable[[str, int], list[str]] | None = None,
    ):
        self.max_bytes = max_bytes
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.address_allowed = address_allowed
        self._resolve = resolve or _resolve
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
            headers={"User-Agent": "imgembed", "Accept": "image/*"},
        )

    def fetch(self, url: str) -> bytes:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.retry_delay, max=30),
            retry=tenacity.retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._fetch_once(url)
        except _Transient as transient:
            error = transient.error
            raise FetchError(
                f"{error.args[0]} (after {self.attempts} attempts)", url, error.status
            ) from transient
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._client.close()

    def _fetch_once(self, url: str) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            target, host = self._pinned(current, url)
            try:
                with self._client.stream(
                    "GET",
                    target,
                    headers={"Host": host},
                    extensions={"sni_hostname": _hostname(current)},
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    return self._body(response, url)
            except httpx.InvalidURL as exc:
                raise FetchError(f"invalid URL {current}: {exc}", url) from exc
            except httpx.TimeoutException as exc:
                raise _Transient(FetchError(f"timed out ({type(exc).__name__})", url)) from exc
            except httpx.TransportError as exc:
                raise _Transient(FetchError(f"connection failed: {exc}", url)) from exc
        raise FetchError(f"more than {MAX_REDIRECTS} redirects", url)

    def _pinned(self, current: str, original: str) -> tuple[str, str]:
        """The URL with its host replaced by a checked address, and the Host header."""
        try:
            parts = urlsplit(current)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # e.g. a port out of range
            raise FetchError(f"invalid URL {current}: {exc}", original) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"not an http(s) URL: {current}", original)
        try:
            resolved = self._resolve(parts.hostname, port)
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

    def _body(self, response: httpx.Response, url: str) -> bytes:
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
        for chunk in response.iter_bytes():
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageTooLargeError(
                    f"download passed the limit of {self.max_bytes:,} bytes (max_file_size)", url
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _hostname(url: str) -> str:
    return urlsplit(url).hostname or ""


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))
