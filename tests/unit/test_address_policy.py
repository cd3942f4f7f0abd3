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
]  # fmt: skip
ALLOWED = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert is_public(ipaddress.ip_address(address))
