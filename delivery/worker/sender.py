"""One HTTP attempt: POST the signed body, return what happened. No retries here: the caller
turns the result into an outcome with the pure policy in ``delivery.worker.retry``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import yarl

from delivery.errors import BlockedTargetError, InputError
from delivery.targets import refuse_addresses
from delivery.text import safe_text
from delivery.version import USER_AGENT
from delivery.worker.resolver import GuardedResolver, names_an_address
from delivery.worker.retry import parse_retry_after_s

# Errors met before anything was sent that the same request would meet again (a URL aiohttp
# cannot send to, a stored secret that cannot sign, a value that cannot be encoded): no retry
# can help, so the attempt is a permanent failure. Anything a reply provokes is retried.
_PERMANENT_ERRORS = (aiohttp.InvalidURL, InputError, ValueError, TypeError, UnicodeError)
_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status: int | None  # None: no HTTP answer (network error, timeout)
    error: str | None
    duration_s: float
    retry_after_s: float | None = None
    excerpt: str | None = None
    permanent: bool = False  # no HTTP answer, and none will ever come (a blocked target)


def _raw_host(url: str) -> str:
    """The host as aiohttp reads it (``""`` if it cannot: aiohttp then refuses the URL)."""
    try:
        return yarl.URL(url).raw_host or ""
    except ValueError:
        return ""


class Sender:
    """Owns one aiohttp session, so connections to each subscriber are reused."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        timeout_s: float,
        excerpt_bytes: int,
        allow_private_targets: bool = False,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._guarded = not allow_private_targets
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._excerpt_bytes = excerpt_bytes
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sender:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
            resolver=GuardedResolver() if self._guarded else None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # identity: we store an excerpt of the reply and never decode it, so we do not
            # invite gzip (aiohttp would otherwise advertise what it can decompress).
            headers={"user-agent": self._user_agent, "accept-encoding": "identity"},
            # Subscribers get exactly our bytes; no cookies carried between subscribers.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self, url: str, headers: dict[str, str], body: bytes, *, timeout_s: float | None = None
    ) -> AttemptResult:
        assert self._session is not None, "use Sender as an async context manager"
        started = time.perf_counter()
        timeout = (
            self._timeout
            if timeout_s is None
            else aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._timeout.sock_connect)
        )
        try:
            if self._guarded:
                host = _raw_host(url)
                if names_an_address(host):  # aiohttp connects to it without resolving it
                    refuse_addresses(host, [host])
            async with self._session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                excerpt = await response.content.read(self._excerpt_bytes)
                return AttemptResult(
                    status=response.status,
                    error=None,
                    duration_s=time.perf_counter() - started,
                    retry_after_s=parse_retry_after_s(response.headers.get("retry-after")),
                    excerpt=describe_body(
                        excerpt,
                        response.headers.get("content-encoding"),
                        limit_chars=self._excerpt_bytes,
                    ),
                )
        except BlockedTargetError as exc:
            return AttemptResult(
                status=None,
                error=f"blocked target: {exc}",
                duration_s=time.perf_counter() - started,
                permanent=True,
            )
        except TimeoutError:
            error = f"timeout after {timeout.total}s"
        except aiohttp.InvalidURL as exc:  # a ClientError, but no retry can fix the URL
            return failed_attempt(exc, time.perf_counter() - started)
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except Exception as exc:  # anything else a reply provokes: a failed attempt, retried
            error = f"{type(exc).__name__}: {exc}"
        return AttemptResult(
            status=None,
            error=safe_text(error, limit_chars=_ERROR_CHARS),
            duration_s=time.perf_counter() - started,
        )


def failed_attempt(exc: Exception, duration_s: float) -> AttemptResult:
    """An exception met while attempting, as the attempt's result: permanent when the same
    request would meet it again, retryable otherwise."""
    return AttemptResult(
        status=None,
        error=safe_text(f"{type(exc).__name__}: {exc}", limit_chars=_ERROR_CHARS),
        duration_s=duration_s,
        permanent=isinstance(exc, _PERMANENT_ERRORS),
    )


def describe_body(raw: bytes, content_encoding: str | None, *, limit_chars: int) -> str | None:
    """The excerpt of a reply body; a compressed one is named, not decoded (we ask for identity,
    and decoding an untrusted stream costs memory a subscriber chooses)."""
    if not raw:
        return None
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        note = f"[{safe_text(encoding, limit_chars=40)}-encoded body, not decoded] "
        return safe_text(note.encode() + raw, limit_chars=limit_chars)
    return safe_text(raw, limit_chars=limit_chars)
