"""The one outbound network policy: addresses, literal URLs at the API, resolution of every address."""

from __future__ import annotations

import ipaddress

import pytest

from services.common.netpolicy import NetPolicy, Refused, Unreachable

STRICT = NetPolicy()
LISTED = NetPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::5", "fd00:ec2::254",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "2002:7f00:1::1", "ff02::1", "fe80::1%lo",
    "not-an-ip"])
def test_non_public_addresses_are_refused(ip: str) -> None:
    assert not STRICT.address_allowed(ip)


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert STRICT.address_allowed(ip)


def test_allow_private_never_opens_unspecified_or_multicast() -> None:
    loose = NetPolicy(allow_private=True)
    assert loose.address_allowed("127.0.0.1") and loose.address_allowed("10.0.0.1")
    assert not loose.address_allowed("0.0.0.0") and not loose.address_allowed("ff02::1")


def test_listed_networks_open_only_themselves() -> None:
    assert LISTED.address_allowed("127.0.0.2") and LISTED.address_allowed("::ffff:127.0.0.2")
    assert not LISTED.address_allowed("127.0.0.1") and not LISTED.address_allowed("::1")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8010/internal/replay", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://2130706433/", "http://0x7f000001/",
    "http://localhost:9/", "http://app.localhost/", "http://user:pw@example.com/", "file:///etc/passwd",
    "gopher://example.com/", "http:///nohost", "http://example.com:99999/"])
def test_literal_refusals(url: str) -> None:
    assert STRICT.literal_refusal(url)


@pytest.mark.parametrize("url", ["https://app.example.com/hook", "http://93.184.216.34:8080/x"])
def test_literal_acceptable(url: str) -> None:
    assert STRICT.literal_refusal(url) is None


def test_literal_listed_network_is_acceptable() -> None:
    assert LISTED.literal_refusal("http://127.0.0.2:9000/") is None
    assert LISTED.literal_refusal("http://127.0.0.1:9000/")


def _resolving(*addresses: str) -> NetPolicy:
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return NetPolicy(resolver=resolver)


async def test_every_resolved_address_must_be_allowed() -> None:
    assert await _resolving("93.184.216.34").resolve("example.com", 80) == "93.184.216.34"
    with pytest.raises(Refused):
        await _resolving("93.184.216.34", "127.0.0.1").resolve("rebind.example", 80)
    with pytest.raises(Unreachable):
        await _resolving().resolve("nothing.example", 80)


async def test_system_resolver_refuses_localhost() -> None:
    with pytest.raises(Refused):
        await STRICT.resolve("localhost", 80)
    assert await NetPolicy(allow_private=True).resolve("localhost", 80) in ("127.0.0.1", "::1")
