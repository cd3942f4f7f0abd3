"""Which addresses a URL may resolve to by default."""

import ipaddress

import pytest

from imgembed.intake.fetch import is_public

REFUSED = [
    "10.0.0.1", "172.16.5.4", "192.168.1.1",  # private
    "127.0.0.1", "::1",  # loopback
    "169.254.169.254", "fd00:ec2::254",  # cloud metadata (AWS IPv4 / IPv6)
    "fe80::1",  # link-local
    "::ffff:127.0.0.1", "::ffff:10.0.0.1",  # IPv4-mapped IPv6
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0", "::",  # unspecified
    "224.0.0.1", "ff02::1",  # multicast
    "198.18.0.1", "240.0.0.1",  # benchmarking, reserved
    # IPv6 forms that carry a private IPv4 address, refused by that address:
    "::ffff:169.254.169.254", "::ffff:7f00:1",  # IPv4-mapped, also in hex
    "64:ff9b::7f00:1", "64:ff9b::10.0.0.1", "64:ff9b::169.254.169.254",  # NAT64 (RFC 6052)
    "2002:7f00:1::1", "2002:a00:1::", "2002:a9fe:a9fe::1",  # 6to4: 127.0.0.1, 10.0.0.1, metadata
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo (not globally reachable at all)
    "2001:0:a00:1::f7f7:f7f7",  # Teredo, server 10.0.0.1
    "2600:1f18::5efe:a00:1", "2600:1f18::200:5efe:7f00:1",  # ISATAP to 10.0.0.1, 127.0.0.1
    # forms refused whatever they carry:
    "::127.0.0.1", "::10.0.0.1", "::8.8.8.8",  # IPv4-compatible (deprecated)
    "::ffff:0:a00:1", "::ffff:0:808:808",  # IPv4-translated (SIIT, obsolete)
    "64:ff9b:1::a00:1", "64:ff9b:1::808:808",  # local-use NAT64: a private translator
]  # fmt: skip
ALLOWED = [
    "8.8.8.8", "93.184.216.34", "2606:4700:4700::1111",
    "::ffff:8.8.8.8",  # IPv4-mapped: the socket connects to 8.8.8.8 itself
    "64:ff9b::808:808", "64:ff9b::8.8.4.4",  # NAT64 to a public address
    "2002:808:808::1",  # 6to4 relay at a public address
    "2600:1f18::5efe:808:808",  # ISATAP with a public address
]  # fmt: skip


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert is_public(ipaddress.ip_address(address))
