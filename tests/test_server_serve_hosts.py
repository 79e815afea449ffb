"""`serve --host`: IPv6 loopback however it is named, a port taken there, an address family this
machine lacks, and a host given with a port, a scheme or spaces."""

from __future__ import annotations

import socket

import pytest


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


def resolving(monkeypatch, name: str, *addresses: str) -> None:
    """`name` resolves to `addresses` (as /etc/hosts may have it: `::1 ip6-localhost`), as getaddrinfo would."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, kind=0, proto=0, flags=0):
        if host != name:
            return real(host, port, family, kind, proto, flags)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def serve_on(host: str, port: int, monkeypatch) -> tuple[int, list]:
    """`serve --host HOST --port PORT` up to uvicorn's start: its exit code and the (host, loopback) it served with.
    serve binds its listeners before uvicorn's run: PORT 0, where any will do (one from free_port,
    let go, could be taken by another test process meanwhile, and serve refused it: exit 2)."""
    import server.app
    from streamgen.cli import main

    served = []
    monkeypatch.setattr(server.app, "create_app", lambda config: config)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run",
                        lambda s: (served.append((s.config.host, s.config.app.loopback)), setattr(s, "started", True)))  # fmt: skip
    return main(["serve", "--model", "debug", "--host", host, "--port", str(port)]), served


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]", "ip6-localhost"])
def test_serve_listens_on_ipv6_loopback_however_it_is_named(host, monkeypatch):
    """'[::1]', as a URL writes it, and a name of ::1 alone ('ip6-localhost') were refused as
    'Name or service not known' (the name was looked up for IPv4 only)."""
    resolving(monkeypatch, "ip6-localhost", "::1")
    assert serve_on(host, 0, monkeypatch) == (0, [(host.strip("[]"), True)])


@needs_ipv6
@pytest.mark.parametrize("host, names_it", [("::1", "[::1]:{port}"), ("[::1]", "[::1]:{port}"),
                                            ("ip6-localhost", "ip6-localhost:{port} ([::1]:{port})"),
                                            ("dual-localhost", "dual-localhost:{port} ([::1]:{port})")])  # fmt: skip
def test_a_port_taken_on_ipv6_loopback_is_refused_before_the_model_loads(host, names_it, capsys, monkeypatch):
    """A name of 127.0.0.1 and ::1 was checked on 127.0.0.1 alone: a server holding the port on ::1
    was found by uvicorn once the model had loaded (exit 3); and ::1's port read as `::1:8000`."""
    resolving(monkeypatch, "ip6-localhost", "::1")
    resolving(monkeypatch, "dual-localhost", "127.0.0.1", "::1")
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_on(host, port, monkeypatch) == (2, [])
    said = capsys.readouterr().err
    assert said == f"streamgen serve: error: cannot listen on {names_it.format(port=port)}: Address already in use\n"


def test_an_address_of_a_family_this_machine_lacks_is_skipped_as_uvicorn_skips_it(monkeypatch):
    """A name of 127.0.0.1 and of an address no socket can be made for here (IPv6 switched off in the
    kernel) was a traceback: asyncio's create_server, uvicorn's, listens on the others."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, kind=0, proto=0, flags=0):
        if host != "odd-localhost":
            return real(host, port, family, kind, proto, flags)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 254, "", ("::1", port, 0, 0))]  # (254: no such protocol)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(OSError):  # (as this kernel answers the family, here made of a protocol)
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 254)
    assert serve_on("odd-localhost", 0, monkeypatch) == (0, [("odd-localhost", True)])


@pytest.mark.parametrize("host, says", [
    ("127.0.0.1:8123", "holds a port: give --host 127.0.0.1 --port 8123"),
    ("[::1]:8123", "holds a port: give --host ::1 --port 8123"),
    ("http://127.0.0.1", "is a URL: give its host alone (e.g. 127.0.0.1), and its port as --port"),
    ("127.0.0.1 ", "holds spaces: give the address or name alone"),
])  # fmt: skip
def test_a_host_with_a_port_a_scheme_or_spaces_is_refused_in_words(host, says, capsys, monkeypatch):
    """They were 'cannot listen on [127.0.0.1:8123]:8000: Name or service not known'."""
    assert serve_on(host, 0, monkeypatch) == (2, [])
    assert capsys.readouterr().err == f"streamgen serve: error: --host {host!r} {says}\n"
