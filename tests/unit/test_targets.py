"""Subscription targets: URLs parsed strictly and canonicalised, and the SSRF guard's address
rules (pure: literal addresses only; names that resolve are in the integration tests)."""

import asyncio

import pytest

from delivery.errors import BlockedTargetError, InputError
from delivery.targets import MAX_URL_CHARS, canonical_url, check_target, mask_url

# Every form an attacker has used to name an address inside the platform's own network.
BLOCKED = [
    ("http://127.0.0.1/h", "loopback"),
    ("http://2130706433/h", "loopback"),  # decimal
    ("http://0177.0.0.1/h", "loopback"),  # octal
    ("http://0x7f.1/h", "loopback"),  # hex, short
    ("http://0x7f000001/h", "loopback"),  # hex, whole
    ("http://127.1/h", "loopback"),  # short
    ("http://[::1]/h", "loopback"),
    ("http://[::ffff:127.0.0.1]/h", "IPv4-mapped"),
    ("http://[::ffff:8.8.8.8]/h", "IPv4-mapped"),  # mapped is refused whatever it maps
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://[fd00:ec2::254]/latest/", "unique-local"),  # AWS metadata over IPv6
    ("http://10.1.2.3/h", "private"),
    ("http://172.16.0.1/h", "private"),
    ("http://192.168.0.1:8080/h", "private"),
    ("http://[fc00::1]/h", "unique-local"),
    ("http://[fe80::1]/h", "link-local"),
    ("http://0.0.0.0/h", "unspecified"),
    ("http://0/h", "unspecified"),
    ("http://[::]/h", "unspecified"),
    ("http://224.0.0.1/h", "multicast"),
    ("http://[ff02::1]/h", "multicast"),
    ("http://100.64.0.1/h", "not globally routable"),  # carrier-grade NAT
    ("http://[64:ff9b::7f00:1]/h", "embeds 127.0.0.1"),  # NAT64
    ("http://[2002:7f00:1::]/h", "embeds 127.0.0.1"),  # 6to4
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
    ("http://METADATA.google.internal./x", "cloud metadata host"),
]


@pytest.mark.parametrize(("url", "reason"), BLOCKED)
def test_private_and_special_addresses_are_refused_naming_the_url(url, reason):
    canonical = canonical_url(url)
    with pytest.raises(BlockedTargetError) as info:
        asyncio.run(check_target(canonical))
    message = str(info.value)
    assert message.startswith(f"url: {canonical!r} is refused") and reason in message
    assert "\n" not in message


def test_a_public_address_is_accepted():
    asyncio.run(check_target(canonical_url("https://93.184.216.34/hook")))
    asyncio.run(check_target(canonical_url("http://[2606:4700::1111]:8443/hook")))


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("HTTPS://Example.COM:443/a?b=c", "https://example.com/a?b=c"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com:80/x", "http://example.com/x"),
        ("http://example.com.:8080/x", "http://example.com:8080/x"),
        ("http://münchen.de/x", "http://xn--mnchen-3ya.de/x"),
        ("http://2130706433/x", "http://127.0.0.1/x"),
        ("http://0x7f.1/x", "http://127.0.0.1/x"),
        ("http://[::FFFF:127.0.0.1]/x", "http://[::ffff:7f00:1]/x"),
        ("https://hooks.example.com/a%20b?x=1&y=%2F", "https://hooks.example.com/a%20b?x=1&y=%2F"),
    ],
)
def test_urls_are_canonicalised(given, canonical):
    assert canonical_url(given) == canonical
    assert canonical_url(canonical) == canonical  # stable


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not-a-url", "is not an http(s) URL with a host"),
        ("ftp://example.com/x", "is not an http(s) URL"),
        ("http:///x", "is not an http(s) URL"),
        ("http://exa mple.com/", "control characters"),
        ("http://example.com/\x00", "control characters"),
        ("http://example.com/a\r\nX-Injected: 1", "control characters"),
        ("http://example.com/\x85", "control characters"),
        ("http://example.com\\@evil.com/", "backslashes"),
        ("http://example.com/#frag", "fragment"),
        ("http://example.com:99999/", "invalid port"),
        ("http://example.com:0/", "invalid port"),
        ("http://example.com:8o/", "invalid port"),
        ("http://ex_ample.com/", "not a valid domain name"),
        ("http://-bad.example.com/", "not a valid domain name"),
        ("http://1.2.3.4.5/", "malformed IPv4"),
        ("http://256.1.1.1/", "malformed IPv4"),
        ("http://[::1/", "not a valid URL"),
        ("http://[fe80::1%25eth0]/", "malformed IPv6"),
        ("http://example.com/é", "non-ASCII"),
        ("http://example.com/" + "a" * MAX_URL_CHARS, "longer than 2048"),
    ],
)
def test_bad_urls_are_one_line_naming_the_field(url, message):
    with pytest.raises(InputError) as info:
        canonical_url(url)
    assert str(info.value).startswith("url: ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["http://user:s3cret@example.com/h", "https://:s3cret@example.com/", "http://tok:s3cret@h@x/"],
)
def test_credentials_are_refused_and_never_shown(url):
    with pytest.raises(InputError) as info:
        canonical_url(url)
    assert "credentials" in str(info.value) and "s3cret" not in str(info.value)
    assert "s3cret" not in mask_url(url) and "***@" in mask_url(url)
