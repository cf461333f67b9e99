"""Filters of the link_shaping role: the rate parser and tbf options are testbed.lab's, not copies."""

from __future__ import annotations

from testbed.lab import parse_rate, tbf_options


def link_shaping_tbf(rate: str) -> list[str]:
    """tc's tbf options for `rate` (100mbit -> rate 100000000bit burst 125000 latency 50ms), at the
    rate tc keeps (whole bytes per second), so what tc reads back is what was asked."""
    return tbf_options(parse_rate(rate) // 8 * 8)


def link_shaping_rate_bytes(rate: str) -> int:
    """Bytes per second of a tc rate, as `tc -j qdisc show` reports a tbf's rate; a rate tc would
    not take fails with testbed.lab.parse_rate's message."""
    return parse_rate(rate) // 8


class FilterModule:
    def filters(self):
        return {
            "link_shaping_tbf": link_shaping_tbf,
            "link_shaping_rate_bytes": link_shaping_rate_bytes,
        }
