"""Is an address one a service may connect to on a caller's behalf? (SSRF guard)

Shared by the downloader (image URLs) and the gateway (a manifest job's `https://`
source and its `notify_url`): services never import each other. `check_address`
refuses every address that is not public unicast (loopback, private, link-local,
multicast, reserved, IPv4 hidden in IPv6 forms ...) unless an allowlist CIDR covers it;
`resolve_vetted` resolves a host and vets every answer. A caller that connects only to
addresses that passed (the downloader pins them, see its fetch.PinnedResolver) cannot
be pointed at an internal host by a DNS answer that changes in between (rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence

from tagpipe_common.errors import ErrorCode, PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# Hosts made only of digits, dots and hex markers are IPv4 in some spelling
# (2130706433, 0177.0.0.1, 0x7f.1): resolvers accept them, so we must too.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def checked_cidr_list(v: str) -> str:
    """A settings validator's check of a comma-separated CIDR allowlist."""
    try:
        parse_cidrs(v.split(","))
    except ValueError as exc:
        raise ValueError(f"not a list of CIDRs: {exc}") from None
    return v


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names directly, in any spelling resolvers accept."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            packed = socket.inet_aton(host.rstrip("."))
        except OSError:
            raise PermanentError(ErrorCode.INVALID_URL, f"malformed IP address {host!r}") from None
        return ipaddress.IPv4Address(packed)
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4 hidden in an IPv6 form that routes to the IPv4 host."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 0xFFFF):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")


def blocked_reason(ip: IPAddress) -> str | None:
    """Why an address is not a public unicast one, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            return f"{reason} (embedded in {ip})" if reason else None
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"{ip} is {name}"
    return None


def check_address(ip: IPAddress, allow: Sequence[IPNetwork] = ()) -> None:
    """Raise PermanentError(blocked_address) unless `ip` is public or allowlisted."""
    if any(ip.version == net.version and ip in net for net in allow):
        return
    reason = blocked_reason(ip)
    if reason is not None:
        raise PermanentError(ErrorCode.BLOCKED_ADDRESS, reason)


async def resolve_vetted(
    host: str, port: int, allow: Sequence[IPNetwork] = (), timeout_s: float = 5.0
) -> list[IPAddress]:
    """Resolve with the loop's getaddrinfo; every answer must pass `check_address`.

    All answers are checked, not just the first: a host that resolves to one
    public and one private address is refused, since the connector might pick
    either.
    """
    literal = literal_ip(host)
    if literal is not None:
        check_address(literal, allow)
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise RetryableError(ErrorCode.DNS_ERROR, f"DNS lookup for {host} timed out") from None
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # SERVFAIL and friends: may well work next time
            raise RetryableError(ErrorCode.DNS_ERROR, f"cannot resolve {host}: {exc}") from None
        raise PermanentError(ErrorCode.DNS_ERROR, f"cannot resolve {host}: {exc}") from None
    except UnicodeError as exc:
        raise PermanentError(ErrorCode.INVALID_URL, f"bad host name {host!r}: {exc}") from None
    addrs: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        check_address(ip, allow)
        if ip not in addrs:
            addrs.append(ip)
    if not addrs:
        raise PermanentError(ErrorCode.DNS_ERROR, f"{host} has no addresses")
    return addrs
