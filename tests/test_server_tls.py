"""`streamgen serve --ssl-certfile/--ssl-keyfile`: HTTPS and WSS with the operator's certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import signal
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from server_helpers import answer_until_closed, live_server, serve_on_a_free_port

from server.protocol import MsgType

pytestmark = pytest.mark.timeout(120)


def self_signed(tmp_path, name: str = "127.0.0.1", passphrase: bytes | None = None,
                valid_from_days: float = 0) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=valid_from_days)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--model", "debug", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.timeout(300)
async def test_https_and_wss_with_the_given_certificate(tmp_path):
    """A `streamgen serve` of its own: it imports torch and the server, loads the model and warms
    it up before it is ready, 58 s measured at load 16 on the 2-core CI machine, and its stop (the
    SIGINT) took 15 s there: the bounds are 180 s and 60 s."""
    cert, key = self_signed(tmp_path)
    proc, base = serve_on_a_free_port(tmp_path / "serve.log", "--model", "debug", "--ssl-certfile", cert,
                                      "--ssl-keyfile", key)  # fmt: skip
    port = int(base.rsplit(":", 1)[1])
    assert base == f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=cert)
    try:
        async with httpx.AsyncClient(base_url=base, verify=trust, timeout=10) as http:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()  # (not ready)
                await asyncio.sleep(0.2)
            s = (await http.post("/v1/sessions", json={})).json()
            url = f"wss://127.0.0.1:{port}{s['stream']}?token={s['token']}"
            async with websockets.connect(url, ssl=trust) as ws:
                await ws.send(json.dumps({"type": "start", "format": "rgb"}))
                while not isinstance(frame := await ws.recv(), bytes) or frame[0] != MsgType.VIDEO_RGB:
                    pass
            async with httpx.AsyncClient(timeout=5) as plain:  # plain HTTP on the TLS port is not served
                refused = await plain.get(f"http://127.0.0.1:{port}/readyz")
            assert refused.status_code == 400 and refused.json()["error"] == "https_required", refused.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:  # (a server that did not stop is killed: the test's own failure is the one said)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("case", ["key alone", "missing file", "key of another certificate", "encrypted key"])
def test_a_certificate_that_cannot_serve_is_refused_before_starting(tmp_path, capsys, case):
    """An encrypted key (openssl req without -nodes) was a traceback without a terminal, and its
    passphrase asked twice on one (here, then by uvicorn). That case is the command's own process
    (what it asks on which terminal); the others are its `main` in this one (a process of its own
    imported torch and the server again, ~20 s a case on a loaded 2-core machine)."""
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "127.0.0.2")
    (tmp_path / "locked").mkdir()
    locked_cert, locked_key = self_signed(tmp_path / "locked", passphrase=b"secret")
    args = {
        "key alone": ["--ssl-keyfile", key],
        "missing file": ["--ssl-certfile", str(tmp_path / "none.crt"), "--ssl-keyfile", key],
        "key of another certificate": ["--ssl-certfile", cert, "--ssl-keyfile", other_key],
        "encrypted key": ["--ssl-certfile", locked_cert, "--ssl-keyfile", locked_key],
    }[case]
    if case == "encrypted key":
        proc = serve("--port", "0", *args)
        out, _ = proc.communicate(timeout=60)
        code = proc.returncode
    else:
        from streamgen.cli import main

        code = main(["serve", "--port", "0", "--model", "debug", *args])
        out = capsys.readouterr().err
    assert code == 2, out
    assert out.strip().splitlines()[-1].startswith("streamgen serve: error: "), out
    assert "Traceback" not in out
    if case == "encrypted key":
        assert f"--ssl-keyfile {locked_key} is encrypted: give it decrypted" in out


@pytest.mark.parametrize("case", ["swapped", "empty certificate", "certificate for the key"])
def test_a_file_without_its_pem_block_is_named_with_what_it_holds(tmp_path, capsys, case):
    """OpenSSL says "[SSL] PEM lib (_ssl.c:3905)" of all three, naming neither file nor cause."""
    from streamgen.cli import main

    cert, key = self_signed(tmp_path)
    (tmp_path / "empty.pem").write_text("")
    args, says = {
        "swapped": ([key, cert], f"--ssl-certfile {key} holds a private key and no certificate (are "
                    "--ssl-certfile and --ssl-keyfile swapped?)"),
        "empty certificate": ([str(tmp_path / "empty.pem"), key], "holds nothing: it takes a certificate"),
        "certificate for the key": ([cert, cert], f"--ssl-keyfile {cert} holds a certificate and no private key"),
    }[case]  # fmt: skip
    assert main(["serve", "--port", "0", "--model", "debug", "--ssl-certfile", args[0], "--ssl-keyfile", args[1]]) == 2
    err = capsys.readouterr().err
    assert says in err and "PEM lib" not in err, err


@pytest.mark.parametrize("valid_from_days, says", [(-3, "the certificate expired on "),
                                                    (3, "the certificate is not valid before ")])  # fmt: skip
def test_a_certificate_out_of_its_dates_is_a_warning_at_the_start(tmp_path, monkeypatch, caplog, valid_from_days, says):
    """OpenSSL loads an expired certificate without a word: the server started, and every page
    and player failed to connect to it with nothing in the log."""
    import server.app
    from streamgen.cli import main

    cert, key = self_signed(tmp_path, valid_from_days=valid_from_days)
    monkeypatch.setattr(server.app, "create_app", lambda config: None)
    # as if it had served until stopped
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    args = ["--ssl-certfile", cert, "--ssl-keyfile", key]
    with caplog.at_level("WARNING", logger="streamgen.server"):
        assert main(["serve", "--port", "0", "--model", "debug", *args]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and cert in r.getMessage()]
    assert len(warned) == 1 and says in warned[0], warned


HEADER_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module", params=[("httptools", "uvloop"), ("h11", "asyncio")], ids=["httptools", "h11"])
def tls_server(request, tmp_path_factory):
    """(each parser on a loop of its own: uvloop's TLS and asyncio's)"""
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    http, loop = request.param
    with live_server(http=http, loop=loop, tls=(cert, key), header_timeout_s=HEADER_TIMEOUT_S) as (url, app):
        yield url, cert


def client_hello() -> bytes:
    """A TLS client's first flight to 127.0.0.1."""
    hello = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return hello.read()


def closed_by_the_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (within the socket's timeout), sending nothing."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("sends", ["nothing", "half a ClientHello"])
def test_a_tls_handshake_that_does_not_end_is_cut_at_the_heads_deadline(tls_server, sends):
    """The loop's TLS gave a handshake 60 s of its own: a client that connected and sent no
    ClientHello, or half of one, held its socket for a minute whatever --header-timeout said."""
    url, cert = tls_server
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        if sends != "nothing":
            hello = client_hello()
            sock.sendall(hello[: len(hello) // 2])
        assert closed_by_the_server(sock)  # (a timeout here: held past 10 s)
    trust = ssl.create_default_context(cafile=cert)
    with httpx.Client(base_url=url, verify=trust, timeout=10) as http:  # (a client that finishes it is served)
        assert http.get("/healthz").status_code == 200
        made = http.post("/v1/sessions", json={})
        assert made.status_code == 201 and made.json()["stream"].startswith("/v1/sessions/"), made.text


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_plain_http_request_to_the_https_port_is_a_400_saying_to_use_https(tls_server, method):
    """The loop's TLS closed the connection without a word: curl said 'Empty reply from server', a
    browser that the connection was reset."""
    url, cert = tls_server
    answer = httpx.request(method, url.replace("https://", "http://") + "/v1/sessions", json={}, timeout=10)
    assert answer.status_code == 400 and answer.headers["connection"] == "close", answer.text
    assert answer.json() == {"error": "https_required",
                             "message": "this port speaks HTTPS: send the request to https://, not http://"}  # fmt: skip
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"\x00\x01 neither TLS nor HTTP\r\n\r\n")
        assert closed_by_the_server(sock)


def test_a_plain_head_request_to_the_https_port_is_refused_without_a_body(tls_server):
    """RFC 9110 9.3.2: no content answers a HEAD; its 400 had the JSON body of a GET's."""
    with socket.create_connection(("127.0.0.1", int(tls_server[0].rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"HEAD /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-length: " in head and body == b"", (head, body)


def test_a_client_that_never_answers_the_servers_close_notify_is_not_held_for_long(tls_server):
    """A TLS connection the server closed (here after its 408) waited for the client's close_notify
    for the loop's 30 s, holding its socket and its place among --max-connections."""
    url, cert = tls_server
    ours, theirs = ssl.MemoryBIO(), ssl.MemoryBIO()  # (TLS by hand: a socket's would answer the close_notify)
    client = ssl.create_default_context(cafile=cert).wrap_bio(theirs, ours, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:

        def pump(step) -> bytes:
            """`step` run until it needs no more of the server's bytes; the server's TCP close as b''."""
            while True:
                try:
                    return step()
                except ssl.SSLWantReadError:
                    sock.sendall(ours.read())
                    if not (data := sock.recv(65536)):
                        return b""
                    theirs.write(data)

        pump(client.do_handshake)
        sock.sendall(ours.read())
        client.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # (answered 408, then closed)
        answer = b""
        while True:  # (up to the server's close_notify, not answered)
            try:
                if not (part := pump(lambda: client.read(65536))):
                    break
            except ssl.SSLZeroReturnError:
                break
            answer += part
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        while sock.recv(65536):  # (a timeout here: held for the close_notify)
            pass


def test_a_tls_handshake_under_way_counts_against_the_connection_limit(tmp_path):
    """Until its handshake was done the HTTP protocol did not know of a TLS connection: any number
    of clients that never sent a ClientHello were held beside max_connections' others."""
    cert, key = self_signed(tmp_path)
    with live_server(tls=(cert, key), header_timeout_s=30, max_connections=MAX_CONNECTIONS) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        trust = ssl.create_default_context(cafile=cert)
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as past:  # past the bound: cut soon
                assert closed_by_the_server(past)  # (a timeout here: held for the handshake's whole time)
            answer = httpx.get(f"{url}/healthz", verify=trust, timeout=10)
            assert answer.status_code == 503 and answer.json()["error"] == "unavailable", answer.text
        finally:
            for sock in held:
                sock.close()
        for _ in range(200):  # (the server sees the held ones closed soon after: their places are free)
            if httpx.get(f"{url}/healthz", verify=trust, timeout=10).status_code == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("requests were refused after the handshakes under way were given up")


@pytest.mark.parametrize("http, loop", [("httptools", "uvloop"), ("h11", "asyncio")], ids=["httptools", "h11"])
def test_a_loop_whose_tls_protocol_cannot_be_built_serves_https_with_its_own_handshake_limit(
    tmp_path, monkeypatch, caplog, http, loop
):
    """TlsHandshake builds the loop's own TLS protocol (asyncio's sslproto, uvloop's SSLProtocol),
    classes whose arguments are no public API: an asyncio or uvloop that changed them would have
    left a TLS server answering no one. It serves with the loop's TLS then, and says so."""
    import server.tls_handshake as tls_handshake

    class Changed:
        def __init__(self, loop, app_protocol, context, waiter, server_side=False):  # (no handshake timeout)
            raise AssertionError("not built")

    monkeypatch.setattr(tls_handshake, "tls_protocol_class", lambda loop: Changed)
    cert, key = self_signed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="streamgen.server"):
        with live_server(http=http, loop=loop, tls=(cert, key)) as (url, app):
            trust = ssl.create_default_context(cafile=cert)
            assert httpx.get(f"{url}/healthz", verify=trust, timeout=10).status_code == 200
    assert any("TLS handshakes keep the event loop's own time limit" in r.getMessage() for r in caplog.records)
