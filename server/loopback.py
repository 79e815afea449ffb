"""Same-machine WebRTC: make aioice offer 127.0.0.1 as its host address.

aioice leaves loopback out of its host candidates, so a server and a client on
one machine would connect through another interface (or not at all where there
is none). Tests, benchmarks and `streamgen serve --loopback` patch the address
list for the whole process.
"""

from __future__ import annotations


def use_loopback_ice() -> None:
    import aioice.ice

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = get_host_addresses
