"""serve's options: a port, host, token, CORS origin, log level or step schedule it cannot serve with
is refused at start, before the model loads."""

from __future__ import annotations

import pytest
from cli_helpers import refused

pytestmark = pytest.mark.timeout(120)


def server_never_starts(monkeypatch) -> None:
    """`serve`'s server fails the test if it starts (it would serve until stopped): for what serve
    must refuse before it."""

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)


def configs_served(monkeypatch) -> list:
    """The ServerConfig each `serve` makes its app of, the app not made and the server ended as it
    starts."""
    import server.app

    def run(server):
        server.started = True

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", run)
    return configs


@pytest.mark.parametrize("host, says", [("127.0.0.1", "Address already in use"), ("no-such-host.invalid", "")])
def test_a_port_in_use_or_an_unknown_host_is_refused_before_the_model_loads(host, says, capsys, monkeypatch):
    """A port in use or a host that does not resolve was uvicorn's own error (exit 3), after the
    model had loaded, warmed and measured its capacity: minutes for a large one."""
    import socket

    from streamgen.cli import main

    server_never_starts(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "debug", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on {host}:{port}: " in err and says in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_empty_host_is_refused_not_taken_for_every_interface(capsys, monkeypatch):
    """`--host "$UNSET"` listened on every interface (0.0.0.0 and ::, uvicorn's reading of ""),
    serving the network where the default serves this machine alone."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    assert main(["serve", "--model", "debug", "--host", "", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "streamgen serve: error: --host '' names no address: give 127.0.0.1 (this machine only, " \
        "the default) or 0.0.0.0 (every interface)\n", err


@pytest.mark.parametrize("no_color, colours", [("1", False), ("", None)])
def test_no_color_turns_off_the_colours_of_the_servers_log(no_color, colours, monkeypatch):
    """uvicorn coloured its log lines on a terminal whatever NO_COLOR said (None: where a terminal)."""
    from streamgen.cli import main

    used = []
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda server: used.append(server.config.use_colors))
    monkeypatch.setenv("NO_COLOR", no_color)
    main(["serve", "--model", "debug", "--port", "0"])  # (2: "did not start", not having run)
    assert used == [colours]


# another process's bind of 127.0.0.1:PORT with SO_REUSEADDR, as uvicorn binds (another serve):
# prints "bound" or the errno's name
BIND_ELSEWHERE = """
import errno, socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
        print("bound")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""


def test_serve_holds_its_port_from_its_check_until_uvicorn_listens(monkeypatch):
    """serve checked its port by binding it, then let it go, and uvicorn bound it again only after
    the app's start-up (~60 s under load): anything could take it meanwhile (in CI another test's
    free_port()), and serve ended with uvicorn's own error. Another process binds it here while the
    server starts (its run stands for uvicorn's start-up)."""
    import subprocess
    import sys

    import server.app
    from streamgen.cli import main

    seen = []

    def start(served):
        served.started = True
        port = served.config.port
        bind = subprocess.run([sys.executable, "-c", BIND_ELSEWHERE, str(port)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        seen.append((bind.stdout.strip() or bind.stderr, [s.getsockname() for s in served.listeners], port))

    monkeypatch.setattr(server.app, "create_app", lambda config: None)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", start)
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    [(bind, listeners, port)] = seen
    assert (bind, listeners) == ("EADDRINUSE", [("127.0.0.1", port)])


def test_port_0_serves_on_a_port_the_system_picks(monkeypatch):
    """--port 0 was refused ('is not a TCP port'): a test or a script had to pick a port and let it
    go before serve listened, and anything could take it meanwhile. Now the system picks it, every
    address on the one port, and uvicorn (its "running on" line) is told which."""
    import server.app
    from streamgen.cli import main

    served = []

    def start(server):
        server.started = True
        served.append(([s.getsockname()[:2] for s in server.listeners], server.config.port))

    monkeypatch.setattr(server.app, "create_app", lambda config: None)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", start)
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    [(addresses, port)] = served
    assert port > 0 and addresses == [("127.0.0.1", port)]


def test_port_0_holds_every_address_of_a_host_on_one_port(monkeypatch):
    """A host of an IPv4 and an IPv6 address (here 127.0.0.1 and ::1): each bound on port 0 alone
    got a port of its own, two ports for one server."""
    import socket

    import server.cli

    def both(host, port):
        found = [socket.getaddrinfo(a, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
                 for a in ("127.0.0.1", "::1")]  # fmt: skip
        return found[0] + found[1]

    monkeypatch.setattr(server.cli, "_listen_addresses", both)
    held = server.cli._check_address("loopback-both", 0, keep=True)
    try:
        [(v4, port), (v6, port_6)] = [s.getsockname()[:2] for s in held]
    finally:
        for sock in held:
            sock.close()
    assert (v4, v6) == ("127.0.0.1", "::1") and port == port_6 > 0


def test_port_0_picks_another_port_where_the_one_picked_is_taken_on_another_address(monkeypatch):
    """Port 0 on a host of two addresses: the system picks a port free on the first, which another
    server may hold on the second. That was 'cannot listen on loopback-both:0 (::1:PORT): Address
    already in use', for a port the user never asked for: another is picked instead."""
    import errno
    import socket

    import server.cli

    def both(host, port):
        found = [socket.getaddrinfo(a, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
                 for a in ("127.0.0.1", "::1")]  # fmt: skip
        return found[0] + found[1]

    taken_on_6 = []

    class TakenOnceOnIpv6(socket.socket):
        def bind(self, address):
            if self.family == socket.AF_INET6 and address[1] and not taken_on_6:
                taken_on_6.append(address[1])  # (its first port picked: another server's there)
                raise OSError(errno.EADDRINUSE, "Address already in use")
            return super().bind(address)

    monkeypatch.setattr(server.cli, "_listen_addresses", both)
    monkeypatch.setattr(socket, "socket", TakenOnceOnIpv6)
    held = server.cli._check_address("loopback-both", 0, keep=True)
    try:
        [(v4, port), (v6, port_6)] = [s.getsockname()[:2] for s in held]
    finally:
        for sock in held:
            sock.close()
    assert (v4, v6) == ("127.0.0.1", "::1") and port == port_6 > 0 and taken_on_6


def test_a_host_of_no_address_this_machine_can_listen_on_is_refused(monkeypatch):
    """A socket of every address of the host refused (IPv6 switched off, `--host ::1`): each was
    skipped, as asyncio skips them, and none was left. The sockets held for uvicorn were none, and
    it served on none of them: "running on" said, nothing listening, every client refused."""
    import socket

    import server.cli
    from streamgen.cli import UserError

    def no_such_family(*args, **kwargs):
        raise OSError(97, "Address family not supported by protocol")

    monkeypatch.setattr(socket, "socket", no_such_family)
    for keep in (True, False):
        with pytest.raises(UserError, match=r"^cannot listen on 127\.0\.0\.1:8000: Address family not supported"):
            server.cli._check_address("127.0.0.1", 8000, keep=keep)


def test_an_sp_follower_rank_does_not_check_the_port_rank_0_listens_on(capsys, monkeypatch):
    """Under `serve --sp N` only rank 0 listens. A follower that checked the address raced rank
    0's listening socket: on a loaded machine it got there after rank 0 listened, said 'Address
    already in use' and stopped every rank (CI, test_serve_with_sp_streams_and_shuts_down)."""
    import socket

    import server.sp_host
    from streamgen.cli import main

    followed = []
    monkeypatch.setattr(server.sp_host, "follow", lambda *args: followed.append(args) or 0)
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as rank_0:  # rank 0's server, listening already
        rank_0.bind(("127.0.0.1", 0))
        rank_0.listen()
        port = rank_0.getsockname()[1]
        assert main(["serve", "--sp", "2", "--model", "debug", "--port", str(port)]) == 0, capsys.readouterr().err
    assert len(followed) == 1


@pytest.mark.parametrize("token", ["", " sekrit", "se krit", "sekr\u00eft", "sekrit\n"])
def test_a_server_token_no_request_can_carry_is_refused_at_start(token, capsys, monkeypatch):
    """`--token ""` (an unset variable: `--token "$TOKEN"`) started a server no session could be
    made on: an empty bearer counts as none (401 for every request), and a token with white space
    or a character outside ASCII cannot be sent in `Authorization: Bearer` as it is. Refused in
    one line before the model loads."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "debug", "--token", token]) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "printable ASCII" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("token", ["ab+c/d=", "a&b", "a#b", "a%2Bb", "a?b"])
def test_a_server_token_a_url_would_change_is_refused_at_start(token, capsys, monkeypatch):
    """The web page and WHEP players send it as ?token=, where '+' reads as a space (openssl rand
    -base64 makes them): every such request was a 403 "wrong server token"."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "debug", "--token", token]) == 2
    err = capsys.readouterr().err
    assert "changes meaning in a URL's ?token=" in err and len(err.strip().splitlines()) == 1, err


def test_a_ctrl_c_ends_serve_with_130_as_any_command(monkeypatch, capsys):
    """uvicorn shuts down on a Ctrl-C and then raises it again: serve took that for a clean end
    (exit code 0), where a SIGTERM, raised again as the signal, ended it with 143."""
    from streamgen.cli import main

    def interrupted(server):
        server.started = True
        raise KeyboardInterrupt

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", interrupted)
    assert main(["serve", "--model", "debug", "--port", "0"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("token, problem", [("a b", "printable ASCII"), ("ab+c", "changes meaning in a URL")])
def test_a_bad_token_from_the_environment_is_said_to_come_from_it(token, problem, capsys, monkeypatch):
    """It was said to be --token's, which the command line did not have."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    monkeypatch.setenv("STREAMGEN_TOKEN", token)
    assert main(["serve", "--port", "0", "--model", "debug"]) == 2
    err = capsys.readouterr().err
    assert "error: $STREAMGEN_TOKEN" in err and problem in err and "--token" not in err, err


def test_cors_origin_must_be_an_origin():
    from streamgen.cli import main

    assert main(["serve", "--port", "0", "--cors-origin", "app.example.org/path"]) == 2


@pytest.mark.parametrize("level", ["bogus", "trace"])
def test_a_log_level_that_logging_does_not_know_is_refused_by_the_parser(level, capsys):
    """It was `logging.basicConfig`'s ValueError traceback, after every other check had passed."""
    err = refused(capsys, "serve", "--model", "debug", "--port", "0", "--log-level", level)
    assert "argument --log-level: invalid choice" in err, err


def test_the_server_token_may_come_from_the_environment(monkeypatch):
    """Given only as --token it was in the command line, which any user of the machine reads (ps)."""
    from streamgen.cli import main

    configs = configs_served(monkeypatch)
    monkeypatch.setenv("STREAMGEN_TOKEN", "from-the-environment")
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    assert main(["serve", "--model", "debug", "--port", "0", "--token", "given"]) == 0
    monkeypatch.setenv("STREAMGEN_TOKEN", "")  # (an empty variable: no token, as without it)
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    assert [c.token for c in configs] == ["from-the-environment", "given", None]


def test_a_host_of_this_machine_alone_makes_webrtc_offer_loopback(monkeypatch):
    """Only 127.0.0.1 did: `--host localhost` served the page, and WebRTC offered only the other
    interfaces, where a container without a network has none."""
    from streamgen.cli import main

    configs, checked = configs_served(monkeypatch), []
    # (the port check binds its host: a test binds loopback only, never 0.0.0.0's every interface)
    monkeypatch.setattr("server.cli._check_address", lambda host, port, keep=False: [] if keep else checked.append(host))
    hosts = ("127.0.0.1", "localhost", "127.0.0.2", "0.0.0.0")
    for host in hosts:
        assert main(["serve", "--model", "debug", "--host", host, "--port", "0"]) == 0
    assert [c.loopback for c in configs] == [True, True, True, False]
    assert checked == list(hosts)


@pytest.mark.parametrize("origin", ["https://app.example.org:99999", "http://app.example.org:http"])
def test_a_cors_origin_with_a_port_no_page_can_have_is_refused(origin, capsys, monkeypatch):
    """It was taken, and matched no page's Origin header: each page's calls were blocked."""
    from streamgen.cli import main

    configs_served(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "debug", "--cors-origin", origin]) == 2
    assert f"--cors-origin {origin!r}: an origin is scheme://host[:port]" in capsys.readouterr().err


@pytest.mark.parametrize("origin", ["https://*.example.org", "http://app.*.example.org:8080"])
def test_a_cors_origin_with_a_wildcard_in_it_is_refused_not_taken_for_a_host(origin, capsys, monkeypatch):
    """It was taken for a host of that name, which no page's Origin is: every page's calls were blocked."""
    from streamgen.cli import main

    configs_served(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "debug", "--cors-origin", origin]) == 2
    assert capsys.readouterr().err == (f"streamgen serve: error: --cors-origin {origin!r}: a '*' in an origin "
                                       "matches nothing: give each origin (--cors-origin is repeatable), or '*' alone for any\n")


def test_serve_refuses_steps_off_the_students_schedule(capsys, monkeypatch):
    """--steps 3 of the 4-step tiny-avatar was taken (generate refused it): every session then ran
    noise levels the student never learned."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "tiny-avatar", "--steps", "3"]) == 2
    assert capsys.readouterr().err == (
        "streamgen serve: error: --steps 3: tiny-avatar runs 1, 2 or 4 steps, the levels of the 4-step "
        "schedule it was distilled for (a teacher takes any number)\n"
    )


def test_a_model_timeout_without_a_model_process_is_refused_not_ignored(capsys, monkeypatch):
    """docs/serving.md: --model-timeout is "with --model-process"; without it, it was taken and timed nothing."""
    from streamgen.cli import main

    configs = configs_served(monkeypatch)
    assert main(["serve", "--port", "0", "--model", "debug", "--model-timeout", "30"]) == 2
    assert capsys.readouterr().err == (
        "streamgen serve: error: --model-timeout 30 applies with --model-process or --sp only (a model in this "
        "process cannot be killed apart from the server): add one or leave it out\n"
    )
    assert main(["serve", "--port", "0", "--model", "debug"]) == 0
    argv = ["serve", "--port", "0", "--model", "debug", "--model-process", "--model-timeout", "5"]
    assert main(argv) == 0
    assert [(c.inference_process, c.model_timeout_s) for c in configs] == [(False, 60.0), (True, 5.0)]


@pytest.mark.parametrize(
    "variable, value, says",
    [
        ("STREAMGEN_ATTENTION", "nosuch", "$STREAMGEN_ATTENTION: unknown attention backend 'nosuch'"),
        ("STREAMGEN_DTYPE", "float16", "$STREAMGEN_DTYPE: dtype must be one of"),
        ("STREAMGEN_FP8", "maybe", "$STREAMGEN_FP8: 'maybe' is neither on"),
        ("STREAMGEN_CACHE_FROM", "x", "$STREAMGEN_CACHE_FROM: cache_from must be one of"),
        ("STREAMGEN_COMPILE", "nosuch", "$STREAMGEN_COMPILE: Invalid backend: 'nosuch'"),
    ],
)
def test_a_model_variable_of_the_environment_serve_cannot_take_is_refused_before_the_server_starts(
    variable, value, says, capsys, monkeypatch
):
    """They were checked only as the model loaded, in the started server: its log printed the
    error's traceback, between uvicorn's lines, before serve ended with it; an option of the same
    value was refused in one line before anything started."""
    from streamgen.cli import main

    server_never_starts(monkeypatch)
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--port", "0", "--model", "debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamgen serve: error: {says}") and err.count("\n") == 1
