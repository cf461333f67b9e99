"""Filters the lab_host role validates and shapes with; the rules are testbed.lab's, not copies."""

from __future__ import annotations

import base64
import ipaddress

from testbed.lab import parse_rate


def lab_host_rate_bps(rate: str) -> int:
    """Bits per second of a tc rate (`100mbit` -> 100000000); fails on anything tc would not take."""
    return parse_rate(rate)


def lab_host_is_rate(rate: str) -> bool:
    """True when tc would take `rate` (e.g. 100mbit); for asserts that name the bad field."""
    try:
        parse_rate(rate)
    except ValueError:
        return False
    return True


def lab_host_in_network(address: str, network: str) -> bool:
    """True when `address` is a usable host address of `network` (not its network or broadcast)."""
    try:
        addr = ipaddress.ip_address(str(address))
    except ValueError:
        return False
    net = ipaddress.ip_network(str(network))
    return addr in net and addr not in (net.network_address, net.broadcast_address)


def lab_host_known_hosts(slurped: list[dict]) -> str:
    """The lab's known_hosts, `ADDRESS TYPE KEY` per host, from slurp results of the hosts' public
    host keys (looped over lab_host_specs): the controller's ssh, Ansible and paramiko check every
    lab host against it, so no connection trusts a key on first use."""
    lines = []
    for result in slurped:
        kind, key = base64.b64decode(result["content"]).decode().split()[:2]
        lines.append(f"{result['item']['address']} {kind} {key}")
    return "".join(f"{line}\n" for line in lines)


class FilterModule:
    def filters(self):
        return {
            "lab_host_rate_bps": lab_host_rate_bps,
            "lab_host_is_rate": lab_host_is_rate,
            "lab_host_in_network": lab_host_in_network,
            "lab_host_known_hosts": lab_host_known_hosts,
        }
