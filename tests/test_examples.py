"""examples/ws_client.py, run as a user runs it, against a live server on 127.0.0.1."""

from __future__ import annotations

import struct
import subprocess
import sys
import wave
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from server_helpers import free_port, live_server

pytestmark = pytest.mark.timeout(180)

CLIENT = Path(__file__).resolve().parents[1] / "examples" / "ws_client.py"


@pytest.fixture(scope="module")
def server():
    # one place: the capacity case fills it
    with live_server(max_sessions=1, idle_timeout_s=60.0) as (url, app):
        yield url, app


def ws_client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=timeout
    )


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes())
    return path


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str, code: int | None = None) -> None:
    """`code`: 2 for a mistake in what the run was given, as argparse's and streamgen's; else any but 0."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert code is None or r.returncode == code, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def saved_frames(out: Path) -> list[tuple[int, int]]:
    """(sequence, milliseconds) of the frames the client saved, in order."""
    return sorted(tuple(int(p) for p in f.stem.replace("ms", "").split("_")) for f in out.glob("*.jpg"))


def test_the_client_streams_a_wav_and_saves_the_frames_with_their_times(server, tmp_path):
    url, app = server
    out = tmp_path / "frames"
    r = ws_client(
        "--server", url, "--wav", str(write_wav(tmp_path / "a.wav", 1.0)), "--seconds", "2", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    frames = saved_frames(out)
    assert len(frames) >= 8 and f"{len(frames)} frames" in r.stdout
    # frames 40 ms apart (25 fps) from the first, in sequence
    assert [seq for seq, _ in frames] == list(range(frames[0][0], frames[0][0] + len(frames)))
    assert all(b[1] - a[1] == 40 for a, b in zip(frames, frames[1:]))
    assert app.state.registry.sessions == {}, "the client's stop ends its session"


def test_a_server_url_of_an_upper_case_scheme_streams(server, tmp_path):
    """HTTP://HOST made its session, then the socket's URL kept the scheme (websockets' InvalidURI traceback)."""
    url, app = server
    out = tmp_path / "frames"
    r = ws_client("--server", url.replace("http://", "HTTP://"), "--seconds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert saved_frames(out) and app.state.registry.sessions == {}


def test_a_wav_is_streamed_whole_with_its_last_frames(server, tmp_path):
    """Without --seconds the client streamed 5 s of any file, and saved 5 s of a longer one."""
    url, _ = server
    out = tmp_path / "frames"
    r = ws_client("--server", url, "--wav", str(write_wav(tmp_path / "a.wav", 6.0)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert saved_frames(out)[-1][1] >= 6000 - 40, r.stdout  # a frame of the file's last 40 ms


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_seconds_that_would_save_nothing_are_refused(server, tmp_path, seconds):
    """0, a negative and nan made a session, saved no frame and exited 0."""
    url, app = server
    r = ws_client("--server", url, "--seconds", seconds, "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--seconds" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert app.state.registry.sessions == {} and not (tmp_path / "f").exists()


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://127.0.0.1:8000", "http://[::1", "http://"])
def test_a_server_that_is_not_an_http_url_is_refused(tmp_path, url):
    """One without its scheme was "cannot reach ...: Request URL is missing an 'http://' ..." and exit
    1, the --out folder made; one httpx cannot parse was its InvalidURL traceback."""
    r = ws_client("--server", url, "--seconds", "1", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--server" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("wait", ["nan", "-1", "soon"])
def test_a_wait_that_is_not_a_time_to_wait_is_refused(server, tmp_path, wait):
    """--wait nan never ran out: a full server was asked again forever."""
    url, app = server
    r = ws_client("--server", url, "--wait", wait, "--seconds", "0.5", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--wait" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert app.state.registry.sessions == {} and not (tmp_path / "f").exists()


def test_the_client_asks_the_server_to_speak(server, tmp_path):
    url, _ = server
    # (a trailing slash went into the socket's URL: ws://host//v1/..., refused with a traceback)
    r = ws_client("--server", url + "/", "--say", "Hello there", "--seconds", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert '"speaking"' in r.stdout and saved_frames(tmp_path)


def test_a_say_the_server_refuses_is_one_line_after_what_was_saved(server, tmp_path):
    """A --say of which espeak-ng makes no sound was answered with an error, printed among the
    server's messages, and the run exited 0 with a silent avatar."""
    url, app = server
    r = ws_client("--server", url, "--say", "...", "--seconds", "1", "--out", str(tmp_path))
    assert_one_line_error(r, "the server did not speak --say", "nothing to speak")
    assert " frames (" in r.stdout and saved_frames(tmp_path), r.stdout
    assert app.state.registry.sessions == {}


def test_the_answer_to_say_is_waited_for_past_seconds(server, tmp_path, monkeypatch):
    """On a busy server the speech's synthesis took longer than a short run: the client ended
    without the answer (no "speaking", nothing said of the speech); a flaky test on a loaded CI."""
    import time

    from server import speech

    synthesize = speech.synthesize
    monkeypatch.setattr(speech, "synthesize", lambda *a: time.sleep(2.5) or synthesize(*a))
    url, _ = server
    r = ws_client("--server", url, "--say", "Hello there", "--seconds", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert '"speaking"' in r.stdout, r.stdout
    assert all(int(f.name.split("_")[1][:-6]) <= 1500 for f in tmp_path.glob("*.jpg"))  # (--seconds' frames)


def test_a_run_that_sends_no_audio_is_not_closed_as_idle(server, tmp_path, monkeypatch):
    """Without --wav the client sent nothing after its start (and its speak): the server closed
    the watch-only socket at its --idle-timeout (4408), a --say run of more than 60 s by default."""
    url, app = server
    monkeypatch.setattr(app.state.registry.config, "idle_timeout_s", 1.5)
    r = ws_client("--server", url, "--say", "hi", "--seconds", "4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert saved_frames(tmp_path)[-1][1] >= 3000 and '"pong"' not in r.stdout, r.stdout
    assert app.state.registry.sessions == {}


def test_a_ctrl_c_says_what_was_saved_and_ends_the_session(server, tmp_path):
    """A Ctrl-C was asyncio's KeyboardInterrupt traceback, what had been saved unsaid."""
    import os
    import signal
    import time

    url, app = server
    client = subprocess.Popen([sys.executable, str(CLIENT), "--server", url, "--seconds", "30", "--out", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # (its `ready` line as it comes) # fmt: skip
    try:
        assert client.stdout.readline().startswith("ready:")
        deadline = time.monotonic() + 30
        while not saved_frames(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert client.returncode == 130 and err.strip() == "interrupted", err
    assert " frames (" in out and saved_frames(tmp_path), out
    deadline = time.monotonic() + 10
    while app.state.registry.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.registry.sessions == {}


def test_an_out_that_is_a_file_is_one_line(server, tmp_path):
    """It was FileExistsError's traceback."""
    url, app = server
    (tmp_path / "afile").write_text("mine")
    assert_one_line_error(ws_client("--server", url, "--out", str(tmp_path / "afile")), "is a file", code=2)
    assert (tmp_path / "afile").read_text() == "mine" and app.state.registry.sessions == {}


def test_an_out_that_cannot_be_made_is_one_line(server, tmp_path):
    """A folder under a file (or one the user may not make) was mkdir's traceback."""
    url, app = server
    (tmp_path / "afile").write_text("mine")
    r = ws_client("--server", url, "--seconds", "0.5", "--out", str(tmp_path / "afile" / "frames"))
    assert_one_line_error(r, "--out", "cannot make the folder", code=2)
    assert app.state.registry.sessions == {}


def ws_client_that_cannot_write(names: str, *args: str) -> subprocess.CompletedProcess:
    """The client run with every file whose name matches `names` refused (PermissionError), as in a
    folder it may not write to or on a full disk (chmod does not refuse root, whom tests may run as)."""
    refuse = (
        "import fnmatch, pathlib, runpy, sys\n"
        "write = pathlib.Path.write_bytes\n"
        "def refused(path, data):\n"
        f"    if fnmatch.fnmatch(path.name, {names!r}):\n"
        "        raise PermissionError(13, 'Permission denied', str(path))\n"
        "    return write(path, data)\n"
        "pathlib.Path.write_bytes = refused\n"
        f"sys.argv = [{str(CLIENT)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", refuse, *args], capture_output=True, text=True, timeout=60)


def test_an_out_the_client_may_not_write_into_is_one_line_before_a_session(server, tmp_path):
    """A folder that is there but not this user's to write was the first frame's PermissionError
    traceback, after a session had been made."""
    url, app = server
    created = app.state.metrics.sessions_created._value.get()
    r = ws_client_that_cannot_write("*", "--server", url, "--seconds", "0.5", "--out", str(tmp_path))
    assert_one_line_error(r, "--out", "cannot write into the folder", "Permission denied", code=2)
    assert app.state.metrics.sessions_created._value.get() == created and list(tmp_path.iterdir()) == []


def test_a_frame_that_cannot_be_saved_is_one_line_after_what_was_saved(server, tmp_path):
    """A disk that fills up mid-stream was a traceback; the session is ended all the same."""
    url, app = server
    r = ws_client_that_cannot_write("*.jpg", "--server", url, "--seconds", "1", "--out", str(tmp_path))
    assert_one_line_error(r, "--out", "cannot save a frame", "Permission denied", code=2)
    assert "0 frames" in r.stdout and app.state.registry.sessions == {}


def test_an_out_holding_another_runs_frames_is_one_line(server, tmp_path):
    """A second run into the folder of a longer one left its last frames there, mixed with its own."""
    url, app = server
    (tmp_path / "000000_00000000ms.jpg").write_bytes(b"an earlier run's")
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(ws_client("--server", url, "--out", str(tmp_path)), "another run's frames", code=2)
    assert app.state.registry.sessions == {}
    (tmp_path / "000000_00000000ms.jpg").unlink()  # a folder with other files is fine
    r = ws_client("--server", url, "--seconds", "0.5", "--out", str(tmp_path))
    assert r.returncode == 0 and saved_frames(tmp_path), r.stderr


def wav_of(fmt: bytes, samples: bytes) -> bytes:
    """A WAV file of a format chunk and samples, written by hand (the wave module writes PCM alone)."""
    chunks = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples))
    return b"RIFF" + struct.pack("<I", len(chunks) + len(samples)) + chunks + samples


def extensible_fmt(sub_format: bytes, bits: int = 16, channels: int = 1) -> bytes:
    """WAVE_FORMAT_EXTENSIBLE's format chunk (40 bytes) of 16 kHz samples of `sub_format` (a GUID's 16 bytes)."""
    block = channels * bits // 8
    return struct.pack("<HHIIHHHHI", 0xFFFE, channels, 16000, 16000 * block, block, bits, 22, bits, 4) + sub_format


# KSDATAFORMAT_SUBTYPE_PCM and _IEEE_FLOAT (00000001- and 00000003-0000-0010-8000-00aa00389b71), as stored
PCM_GUID = bytes.fromhex("01000000000010008000" + "00aa00389b71")
FLOAT_GUID = bytes.fromhex("03000000000010008000" + "00aa00389b71")


def load_client():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ws_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("channels", [1, 3])
def test_a_wave_format_extensible_wav_of_pcm_is_read_as_a_plain_one(tmp_path, channels, capsys):
    """WAVE_FORMAT_EXTENSIBLE (what ffmpeg writes for more than 2 channels, sox and Windows for
    plain PCM) was refused as "holds WAVE_FORMAT_EXTENSIBLE" whatever its samples; of 16-bit PCM
    it is read as the plain WAV of the same samples (3 channels: refused as any other such)."""
    client = load_client()
    samples = (np.arange(1600 * channels) % 300 - 150).astype("<i2")
    plain, extensible = tmp_path / "plain.wav", tmp_path / "extensible.wav"
    with wave.open(str(plain), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(samples.tobytes())
    extensible.write_bytes(wav_of(extensible_fmt(PCM_GUID, channels=channels), samples.tobytes()))
    if channels == 1:
        assert np.array_equal(client.read_wav_16k(str(extensible)), samples)
        assert np.array_equal(client.read_wav_16k(str(plain)), samples)
        return
    for path in (plain, extensible):
        with pytest.raises(SystemExit) as refused:
            client.read_wav_16k(str(path))
        assert refused.value.code == 2
    assert capsys.readouterr().err.count("; this one is 16000 Hz 3 channels 16-bit\n") == 2


WAVS = ["missing", "8k", "not-a-wav", "float", "extensible-float", "extensible-other", "extensible-short"]


@pytest.mark.parametrize("wav", WAVS)
def test_a_bad_wav_is_one_line_and_makes_no_session(server, tmp_path, wav):
    url, app = server
    path = tmp_path / "in.wav"
    floats = np.zeros(1600, "<f4").tobytes()
    if wav == "8k":
        write_wav(path, 0.5, rate=8000)
    elif wav == "not-a-wav":
        path.write_bytes(b"RIFF but not really")
    elif wav == "float":  # (format 3, as scipy.io.wavfile writes a float array: "unknown format: 3")
        path.write_bytes(wav_of(struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32), floats))
    elif wav == "extensible-float":
        path.write_bytes(wav_of(extensible_fmt(FLOAT_GUID, bits=32), floats))
    elif wav == "extensible-other":  # (a sub-format outside the family of format codes)
        path.write_bytes(wav_of(extensible_fmt(bytes(range(16))), np.zeros(1600, "<i2").tobytes()))
    elif wav == "extensible-short":  # (its sub-format cut off)
        path.write_bytes(wav_of(extensible_fmt(PCM_GUID)[:18], np.zeros(1600, "<i2").tobytes()))
    r = ws_client("--server", url, "--wav", str(path), "--out", str(tmp_path / "f"))
    assert_one_line_error(r, str(path), code=2)
    said = {
        "8k": "this one is 8000 Hz mono 16-bit",
        "float": "holds float samples",
        "extensible-float": "holds float samples (WAVE_FORMAT_EXTENSIBLE)",
        "extensible-other": "holds WAVE_FORMAT_EXTENSIBLE of sub-format 03020100-0504-0706-0809-0a0b0c0d0e0f",
        "extensible-short": "holds WAVE_FORMAT_EXTENSIBLE with its sub-format cut off",
    }.get(wav)
    if said:
        assert "need 16 kHz mono 16-bit PCM" in r.stderr and said in r.stderr, r.stderr
    assert app.state.registry.sessions == {}


def test_a_say_too_long_to_speak_is_one_line_and_makes_no_session(server, tmp_path):
    """It was refused by the server, 4413, only once its session had been made and started."""
    url, app = server
    r = ws_client("--server", url, "--say", "a" * 1001, "--seconds", "0.5", "--out", str(tmp_path))
    assert_one_line_error(r, "--say of 1001 characters: a speak holds at most 1000", code=2)
    assert app.state.registry.sessions == {}


@pytest.mark.parametrize("option, value, status", [("--avatar", "nobody", 404), ("--seed", "-1", 422)])
def test_a_session_the_server_refuses_for_an_option_is_one_line_exit_2(server, tmp_path, option, value, status):
    """An unknown --avatar or a bad --seed exited 1, as the server's failures do; 2 is a run given what cannot be."""
    url, app = server
    r = ws_client("--server", url, option, value, "--seconds", "0.5", "--out", str(tmp_path))
    assert_one_line_error(r, f"session refused: {status}", code=2)
    assert app.state.registry.sessions == {}


def test_a_server_that_is_not_there_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = ws_client("--server", url, "--say", "hi", "--out", str(tmp_path))
    assert_one_line_error(r, f"cannot reach {url}")


def test_a_stream_the_server_closes_is_one_line_with_its_close_code(server, tmp_path):
    url, app = server
    # (a --say of spaces alone: one too long to speak is refused by the client itself, before a session)
    r = ws_client("--server", url, "--say", "   ", "--seconds", "3", "--out", str(tmp_path))
    assert_one_line_error(r, "4400", "speak: text is empty")
    assert app.state.registry.sessions == {}


def test_a_full_server_is_asked_again_until_wait_is_spent(server, tmp_path):
    import httpx

    url, app = server
    held = httpx.post(f"{url}/v1/sessions", json={"avatar": "sample"}).json()  # the one place
    try:
        r = ws_client("--server", url, "--say", "hi", "--wait", "0", "--out", str(tmp_path))
        assert_one_line_error(r, "session refused: 503", code=1)  # (the server's state, not the run's input)
    finally:
        httpx.delete(f"{url}{held['resource']}", headers={"Authorization": f"Bearer {held['token']}"})
    assert app.state.registry.sessions == {}


def test_a_client_waiting_on_a_full_server_gets_the_place_that_frees(server, tmp_path):
    """The place is freed once the client has said it waits (freed after a fixed second, it was
    at times free before a loaded machine's client had started: then it never waited)."""
    import httpx

    url, app = server
    held = httpx.post(f"{url}/v1/sessions", json={"avatar": "sample"}).json()
    argv = ["--server", url, "--say", "hi", "--wait", "30", "--seconds", "1", "--out", str(tmp_path)]
    client = subprocess.Popen([sys.executable, str(CLIENT), *argv], stdout=subprocess.PIPE, text=True)
    try:
        said = client.stdout.readline()  # the client's first answer: busy, or refused and gone
    finally:
        httpx.delete(f"{url}{held['resource']}", headers={"Authorization": f"Bearer {held['token']}"})
    out, _ = client.communicate(timeout=90)
    assert "server busy" in said and client.returncode == 0, said + out
    assert saved_frames(tmp_path)


def test_a_wait_as_long_as_retry_after_asks_again_at_its_end(server, tmp_path):
    """A --wait shorter than the server's Retry-After, or just as long, was refused at once."""
    import httpx

    url, app = server
    held = httpx.post(f"{url}/v1/sessions", json={"avatar": "sample"}).json()
    retry_after = httpx.post(f"{url}/v1/sessions", json={"avatar": "sample"}).headers["Retry-After"]
    argv = ["--server", url, "--wait", retry_after, "--seconds", "0.5", "--out", str(tmp_path)]
    client = subprocess.Popen([sys.executable, str(CLIENT), *argv], stdout=subprocess.PIPE, text=True)
    try:
        said = client.stdout.readline()  # the client's first answer: busy, or refused and gone
    finally:  # the place frees once the client waits for it
        httpx.delete(f"{url}{held['resource']}", headers={"Authorization": f"Bearer {held['token']}"})
    out, _ = client.communicate(timeout=60)
    assert "server busy" in said and client.returncode == 0, said + out
    assert saved_frames(tmp_path)


def test_a_stream_refused_at_the_connection_limit_is_opened_again_after_retry_after(tmp_path):
    """A server at --max-connections answers a WebSocket's upgrade 503 with Retry-After, as any request
    (docs/api.md): the client asked again for its session's POST, but gave up at once on its stream's
    ('cannot open the stream ...: HTTP 503'), the session it had made left to the unclaimed limit. It
    opens the stream again after each Retry-After until --wait is spent."""
    import socket

    with live_server(max_sessions=1, max_connections=2) as (url, app):
        # a connection the server counts (a request's head begun): the client's POST is the second,
        # its stream's upgrade a third, past the limit
        host, port = url.removeprefix("http://").split(":")
        hog = socket.create_connection((host, int(port)))
        hog.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        argv = ["--server", url, "--wait", "30", "--seconds", "1", "--out", str(tmp_path)]
        client = subprocess.Popen([sys.executable, str(CLIENT), *argv], stdout=subprocess.PIPE, text=True)
        try:
            said = client.stdout.readline()  # the client's first answer: busy, or refused and gone
        finally:  # the connection frees once the client waits for it
            hog.close()
        out, _ = client.communicate(timeout=90)
    assert "server busy" in said and "connections open" in said and client.returncode == 0, said + out
    assert saved_frames(tmp_path)


@contextmanager
def server_that(then: str):
    """A stand-in server on 127.0.0.1 that makes a session and then, as `then` says: "refuses" its
    stream (404: the session gone meanwhile), or opens it, sends `ready` and three frames, and
    "drops" the connection (no close frame, as a killed server) or "freezes" (reads nothing and
    answers nothing more, as a stopped or unplugged one); or opens it and is "mute" from then on."""
    import base64
    import contextlib
    import hashlib
    import json
    import socket
    import struct
    import threading

    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        return bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)) + payload

    def wait_for_pong(conn: socket.socket) -> None:
        """Read the client's frames (masked; the start message, audio) until a pong, 10 s at most."""
        conn.settimeout(10)
        data = b""

        def take(n: int) -> bytes:
            nonlocal data
            while len(data) < n:
                if not (more := conn.recv(65536)):
                    raise ConnectionError("the client is gone")
                data += more
            taken, data = data[:n], data[n:]
            return taken

        with contextlib.suppress(OSError):  # (the client gone, or 10 s: the reset all the same)
            while True:
                head = take(2)
                n = head[1] & 0x7F
                n = struct.unpack(">H", take(2))[0] if n == 126 else struct.unpack(">Q", take(8))[0] if n == 127 else n
                take(4 + n)  # the mask and the payload
                if head[0] & 0x0F == 0xA:  # the pong
                    return

    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        head = request.split(b"\r\n\r\n")[0].decode()
        if head.startswith("POST"):
            body = json.dumps({"stream": "/v1/sessions/s/ws", "token": "t", "resource": "/v1/sessions/s"})
            conn.sendall(f"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())  # fmt: skip
            conn.close()
            return
        if head.startswith("GET") and then == "refuses":
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        if head.startswith("GET"):
            key = next(
                h.split(":", 1)[1].strip()
                for h in head.split("\r\n")
                if h.lower().startswith("sec-websocket-key")
            )
            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            )
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
            if then == "mute":
                held.append(conn)
                return
            conn.sendall(frame(1, json.dumps({"type": "ready", "fps": 25.0}).encode()))
            for seq in range(3):
                conn.sendall(frame(2, struct.pack("<BBHIq", 2, 0, 0, seq, seq * 40000) + b"jpeg"))
            if then == "drops":
                # a ping, and the reset only once its pong is back: the client has taken the three
                # frames in by then (a reset throws away what the receiver has not read yet: under
                # load, the client saved fewer than three)
                conn.sendall(frame(9, b"p"))
                wait_for_pong(conn)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # a reset: no close frame
                return
        if then in ("drops", "refuses"):  # (the DELETE of the session: gone with it)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        held.append(conn)  # frozen: the stream's socket, and any DELETE, get no answer

    held: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


def test_a_server_that_drops_the_stream_is_one_line_after_what_was_saved(tmp_path):
    """A server killed mid-stream was "the server closed the stream: ?", the frames saved unsaid."""
    with server_that("drops") as url:
        r = ws_client("--server", url, "--seconds", "5", "--out", str(tmp_path))
    assert_one_line_error(r, "the connection to the server was lost")
    assert len(saved_frames(tmp_path)) == 3 and "3 frames (0.1 s of video)" in r.stdout, r.stdout


def test_a_server_that_stops_answering_holds_the_client_little_past_seconds(tmp_path):
    """A server that froze mid-stream held the client 40 s past --seconds: the socket's close
    waited 10 s for the server's, the session's DELETE 30 s for an answer."""
    import time

    with server_that("freezes") as url:
        start = time.monotonic()
        wav = str(write_wav(tmp_path / "a.wav", 3.0))
        r = ws_client("--server", url, "--wav", wav, "--seconds", "1", "--out", str(tmp_path / "f"))
        took = time.monotonic() - start
    assert r.returncode == 0 and len(saved_frames(tmp_path / "f")) == 3, r.stderr
    assert took < 1 + 10, took


def test_a_server_that_never_answers_the_start_is_one_line_little_past_seconds(tmp_path):
    """A stream opened that never brought its `ready` held the client for good (the run's timeout
    bounds it here: a client that waits for good fails the test, not the suite)."""
    with server_that("mute") as url:
        r = ws_client("--server", url, "--seconds", "1", "--out", str(tmp_path / "f"), timeout=60)
    assert_one_line_error(r, "did not answer the stream's start")


def test_a_stream_that_cannot_be_opened_is_one_line(tmp_path):
    """A session gone before its stream opened (or a proxy that takes no WebSocket) was
    websockets' InvalidStatus traceback."""
    with server_that("refuses") as url:
        r = ws_client("--server", url, "--seconds", "1", "--out", str(tmp_path))
    assert_one_line_error(r, f"cannot open the stream at {url.replace('http', 'ws')}/v1/sessions/s/ws", "404")
    assert "token=" not in r.stderr


def test_what_was_received_is_said_in_whole_words():
    """One frame was "1 frames"."""
    import runpy

    received = runpy.run_path(str(CLIENT))["Received"]()
    received.frames, received.audio_bytes = 1, 32000
    assert str(received) == "1 frame (0.0 s of video), 1.0 s of audio"
    received.frames = 3
    assert str(received).startswith("3 frames (0.1 s of video)")


def test_a_ctrl_c_as_a_frame_arrives_is_not_lost(tmp_path, monkeypatch):
    """asyncio.wait_for (Python 3.11) swallows its caller's cancellation when what it waits for
    is done by then: a Ctrl-C as a frame came in (25 a second) was lost, and the client streamed
    on to --seconds' end (a flaky test_a_ctrl_c_says_what_was_saved_and_ends_the_session)."""
    import argparse
    import asyncio
    import json

    ws_client = load_client()

    class Socket:  # a stream whose next frame the test hands over
        def __init__(self):
            self.answered_start, self.frame = False, None

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def send(self, data):
            pass

        async def recv(self):
            if not self.answered_start:
                self.answered_start = True
                return json.dumps({"type": "ready", "fps": 25.0})
            self.frame = asyncio.get_running_loop().create_future()
            return await self.frame

    async def run() -> bool:
        ws = Socket()

        async def connect(url, **kwargs):
            return ws

        monkeypatch.setattr(ws_client.websockets, "connect", connect)
        args = argparse.Namespace(seconds=30.0, say=None, wait=0.0)
        task = asyncio.ensure_future(ws_client.stream("ws://x", args, None, tmp_path, ws_client.Received()))
        for _ in range(100):
            if ws.frame is not None:
                break
            await asyncio.sleep(0)
        ws.frame.set_result(ws_client.HEADER.pack(ws_client.VIDEO_JPEG, 0, 0, 0, 0) + b"jpeg")
        task.cancel()  # (asyncio.run's answer to a Ctrl-C), as the frame comes
        for _ in range(100):
            if task.done():
                break
            await asyncio.sleep(0)
        cancelled = task.cancelled()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return cancelled

    assert asyncio.run(run()), "the Ctrl-C was lost: the client streams on"


def test_a_busy_server_s_retry_after_as_an_http_date_is_waited_for_not_a_traceback():
    """A 503's Retry-After may be an HTTP date (RFC 9110; a proxy in front of the server sends one):
    float() of it was a ValueError's traceback. A date is the seconds until it, anything else 1 s."""
    import asyncio
    import email.utils
    import time

    import httpx

    client = load_client()
    soon = email.utils.formatdate(time.time() + 3600, usegmt=True)

    class Busy:  # a server answering 503, with a date to come back at
        def __init__(self):
            self.asked = 0

        async def post(self, path, json):
            self.asked += 1
            return httpx.Response(503, json={"message": "at capacity"}, headers={"Retry-After": soon})

    server = Busy()
    with pytest.raises(SystemExit, match="^session refused: 503 at capacity$"):
        asyncio.run(client.create_session(server, {"avatar": "sample"}, 1.0))
    assert server.asked == 2  # (asked again at --wait's end, the date being later)
    assert 3500 < client.retry_after_seconds(soon) <= 3600
    assert client.retry_after_seconds(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0
    assert [client.retry_after_seconds(v) for v in ("2", "0.5", None, "soon", "-3")] == [2, 0.5, 1, 1, 0]
