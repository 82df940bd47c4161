"""What a subscription may target: its URL parsed strictly and canonicalised, and the SSRF
guard that refuses hosts inside the platform's own network.

Pure except ``check_target``, which resolves the host (create time). The worker asks the same
question at connect time (``delivery.worker.resolver``), so a name that resolves to a public
address when the subscription is made and to a private one later (DNS rebinding) is still
refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from urllib.parse import urlsplit, urlunsplit

from delivery.errors import BlockedTargetError, InputError

MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services by name; by address they are link-local (169.254.169.254) or
# unique-local (fd00:ec2::254), which the address rules below refuse anyway.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_AUTHORITY = re.compile(r"^(?P<scheme>[^:/?#]*://)(?P<authority>[^/?#]*)(?P<rest>.*)$", re.DOTALL)


def blocked_reason(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused (``"loopback"``...), or ``None`` if public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "IPv4-mapped"
        # Addresses that carry an IPv4 address inside: refused when that one would be.
        embedded = address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        )
        if embedded is not None and blocked_reason(embedded) is not None:
            return f"embeds {embedded}"
    for reason, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unique-local" if address.version == 6 else "private", address.is_private),
    ):
        if hit:
            return reason
    return None if address.is_global else "not globally routable"


def _canonical_host(host: str, shown: str) -> str:
    """Lower case, IDNA, no trailing dot; IPv4 in any legacy form (``2130706433``, ``0x7f.1``,
    ``0177.0.0.1``, ``127.1``) as the dotted quad a resolver would turn it into."""
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            address = None
        # A zone id (%eth0) names an interface of this machine, never a subscriber.
        if address is None or address.scope_id is not None:
            raise InputError(f"url: {shown} has a malformed IPv6 address")
        return f"[{address}]"
    host = host.rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError(f"url: {shown} has a host that is not a valid domain name") from None
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):  # ends in a number: an IPv4 address, as browsers say
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise InputError(f"url: {shown} has a malformed IPv4 address") from None
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InputError(f"url: {shown} has a host that is not a valid domain name")
    return host


def mask_url(url: str) -> str:
    """The URL for messages: any credentials replaced by ``***``, so no output shows them."""
    match = _AUTHORITY.match(url)
    if match is None or "@" not in match["authority"]:
        return url
    host = match["authority"].rsplit("@", 1)[1]
    return f"{match['scheme']}***@{host}{match['rest']}"


def canonical_url(url: str) -> str:
    """The URL as stored and requested; ``InputError`` naming it unless it is a plain
    http(s) URL of at most 2 kB with a host, no credentials, no fragment and no control
    characters."""
    if len(url) > MAX_URL_CHARS:
        raise InputError(f"url: longer than {MAX_URL_CHARS} characters")
    shown = repr(mask_url(url))
    if any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F for c in url) or "\\" in url:
        raise InputError(f"url: {shown} contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        raise InputError(f"url: {shown} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"url: {shown} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise InputError(f"url: {shown} contains credentials; a subscriber authenticates us by "
                         "the webhook signature")
    if parts.fragment or url.endswith("#"):
        raise InputError(f"url: {shown} has a fragment, which is never sent")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"url: {shown} has an invalid port") from None
    netloc = parts.netloc
    raw_host = netloc.rpartition(":")[0] if ":" in netloc and not netloc.endswith("]") else netloc
    if not raw_host:
        raise InputError(f"url: {shown} is not an http(s) URL with a host")
    host = _canonical_host(raw_host, shown)
    if port == 0:
        raise InputError(f"url: {shown} has an invalid port")
    default = 80 if scheme == "http" else 443
    netloc = host if port in (None, default) else f"{host}:{port}"
    path = parts.path or "/"
    if not (path + parts.query).isascii():
        raise InputError(f"url: {shown} has non-ASCII characters in its path; percent-encode "
                         "them")
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def host_of(url: str) -> str:
    """The host of a canonical URL, without IPv6 brackets."""
    return (urlsplit(url).hostname or "").strip("[]")


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def refuse_addresses(host: str, addresses: list[str]) -> None:
    """``BlockedTargetError`` unless ``host`` is a public name and every address is public:
    one private answer among public ones is how rebinding gets in, so it fails the host."""
    if host.rstrip(".").lower() in METADATA_HOSTS:
        raise BlockedTargetError(f"{host} is a cloud metadata host")
    for text in addresses:
        address = literal_address(text.split("%", 1)[0])
        reason = "not an IP address" if address is None else blocked_reason(address)
        if reason is not None:
            shown = host if text == host else f"{host} resolves to {text}"
            raise BlockedTargetError(f"{shown} ({reason})")


async def check_target(url: str) -> None:
    """Create time: ``BlockedTargetError`` naming ``url`` if its host is, or resolves to, an
    address the guard refuses (or does not resolve: what cannot be checked is not accepted)."""
    host = host_of(url)
    try:
        if literal_address(host) is not None:
            refuse_addresses(host, [host])
            return
        refuse_addresses(host, [])  # metadata names, before any lookup
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise BlockedTargetError(f"{host} does not resolve ({exc.strerror})") from None
        refuse_addresses(host, [str(info[4][0]) for info in infos])
    except BlockedTargetError as exc:
        raise BlockedTargetError(
            f"url: {mask_url(url)!r} is refused: {exc} "
            "(DELIVERY_ALLOW_PRIVATE_TARGETS=true allows private targets)"
        ) from None
