"""examples/ws_client.py, run as a user runs it, against a live server on 127.0.0.1 (against servers
that fail it: test_examples_failing_servers.py). Its command line in a process of its own where the
process is what is tested (the first test's run, a Ctrl-C, a client waiting as the test frees a place),
its main in the test's process elsewhere (ws_client_here: no interpreter to start and import into)."""

from __future__ import annotations

import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
from server_helpers import (
    WS_CLIENT,
    assert_one_line_error,
    live_server,
    load_ws_client,
    saved_frames,
    write_wav,
    ws_client,
    ws_client_here,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server():
    # one place: the capacity case fills it
    with live_server(max_sessions=1, idle_timeout_s=60.0) as (url, app):
        yield url, app


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
    r = ws_client_here("--server", url.replace("http://", "HTTP://"), "--seconds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert saved_frames(out) and app.state.registry.sessions == {}


def test_a_wav_is_streamed_whole_with_its_last_frames(server, tmp_path):
    """Without --seconds the client streamed 5 s of any file, and saved 5 s of a longer one."""
    url, _ = server
    out = tmp_path / "frames"
    r = ws_client_here("--server", url, "--wav", str(write_wav(tmp_path / "a.wav", 6.0)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert saved_frames(out)[-1][1] >= 6000 - 40, r.stdout  # a frame of the file's last 40 ms


def test_seconds_of_video_are_saved_from_a_server_slower_than_real_time(server, tmp_path, monkeypatch):
    """The client read for --seconds of its own clock: a server whose chunks came slower than they
    play (a loaded machine's) had sent part of the video by then, and the run saved that part (3.2 s
    of a 6 s WAV's run under load). Its chunks are slowed here, each taking 0.6 s more than its 0.32 s."""
    import time

    from server.session import Session

    generate = Session.generate
    monkeypatch.setattr(Session, "generate", lambda self, *a: time.sleep(0.6) or generate(self, *a))
    url, app = server
    out = tmp_path / "frames"
    r = ws_client_here("--server", url, "--seconds", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    times = [ms for _, ms in saved_frames(out)]
    assert times[-1] == 2000 - 40 and f"{len(times)} frames" in r.stdout, r.stdout  # --seconds' last frame, no later
    assert app.state.registry.sessions == {}


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_seconds_that_would_save_nothing_are_refused(server, tmp_path, seconds):
    """0, a negative and nan made a session, saved no frame and exited 0."""
    url, app = server
    r = ws_client_here("--server", url, "--seconds", seconds, "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--seconds" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert app.state.registry.sessions == {} and not (tmp_path / "f").exists()


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://127.0.0.1:8000", "http://[::1", "http://"])
def test_a_server_that_is_not_an_http_url_is_refused(tmp_path, url):
    """One without its scheme was "cannot reach ...: Request URL is missing an 'http://' ..." and exit
    1, the --out folder made; one httpx cannot parse was its InvalidURL traceback."""
    r = ws_client_here("--server", url, "--seconds", "1", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--server" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("wait", ["nan", "-1", "soon"])
def test_a_wait_that_is_not_a_time_to_wait_is_refused(server, tmp_path, wait):
    """--wait nan never ran out: a full server was asked again forever."""
    url, app = server
    r = ws_client_here("--server", url, "--wait", wait, "--seconds", "0.5", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--wait" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert app.state.registry.sessions == {} and not (tmp_path / "f").exists()


def test_the_client_asks_the_server_to_speak(server, tmp_path):
    url, _ = server
    # (a trailing slash went into the socket's URL: ws://host//v1/..., refused with a traceback)
    argv = ["--server", url + "/", "--say", "Hello there", "--seconds", "2", "--out", str(tmp_path)]
    r = ws_client_here(*argv)
    assert r.returncode == 0, r.stderr
    assert '"speaking"' in r.stdout and saved_frames(tmp_path)


def test_a_say_the_server_refuses_is_one_line_after_what_was_saved(server, tmp_path):
    """A --say of which espeak-ng makes no sound was answered with an error, printed among the
    server's messages, and the run exited 0 with a silent avatar."""
    url, app = server
    r = ws_client_here("--server", url, "--say", "...", "--seconds", "1", "--out", str(tmp_path))
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
    r = ws_client_here("--server", url, "--say", "Hello there", "--seconds", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert '"speaking"' in r.stdout, r.stdout
    assert all(int(f.name.split("_")[1][:-6]) <= 1500 for f in tmp_path.glob("*.jpg"))  # (--seconds' frames)


def test_a_run_that_sends_no_audio_is_not_closed_as_idle(server, tmp_path, monkeypatch):
    """Without --wav the client sent nothing after its start (and its speak): the server closed
    the watch-only socket at its --idle-timeout (4408), a --say run of more than 60 s by default."""
    url, app = server
    monkeypatch.setattr(app.state.registry.config, "idle_timeout_s", 1.5)
    # pings 6 to an idle limit, as the client's 1 s are to the server's 60 s: at 1 s against 1.5 s, a
    # ping that a loaded machine's client (its loop in this process, beside the server's) sent half
    # a second late found the session closed
    client = load_ws_client()
    client.KEEPALIVE_S = 0.25
    r = ws_client_here("--server", url, "--say", "hi", "--seconds", "4", "--out", str(tmp_path), client=client)
    assert r.returncode == 0, r.stderr
    assert saved_frames(tmp_path)[-1][1] >= 3000 and '"pong"' not in r.stdout, r.stdout
    assert app.state.registry.sessions == {}


def test_a_ctrl_c_says_what_was_saved_and_ends_the_session(server, tmp_path):
    """A Ctrl-C was asyncio's KeyboardInterrupt traceback, what had been saved unsaid."""
    import os
    import signal
    import time

    url, app = server
    client = subprocess.Popen([sys.executable, str(WS_CLIENT), "--server", url, "--seconds", "30", "--out", str(tmp_path)],
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
    r = ws_client_here("--server", url, "--out", str(tmp_path / "afile"))
    assert_one_line_error(r, "is a file", code=2)
    assert (tmp_path / "afile").read_text() == "mine" and app.state.registry.sessions == {}


def test_an_out_that_cannot_be_made_is_one_line(server, tmp_path):
    """A folder under a file (or one the user may not make) was mkdir's traceback."""
    url, app = server
    (tmp_path / "afile").write_text("mine")
    r = ws_client_here("--server", url, "--seconds", "0.5", "--out", str(tmp_path / "afile" / "frames"))
    assert_one_line_error(r, "--out", "cannot make the folder", code=2)
    assert app.state.registry.sessions == {}


def ws_client_that_cannot_write(names: str, *args: str) -> subprocess.CompletedProcess:
    """The client run with every file whose name matches `names` refused (PermissionError), as in a
    folder it may not write to or on a full disk (chmod does not refuse root, whom tests may run as)."""
    import fnmatch
    from pathlib import Path

    class RefusedPath(type(Path())):  # (the client's paths alone: the server's, in this process, write)
        def write_bytes(self, data):
            if fnmatch.fnmatch(self.name, names):
                raise PermissionError(13, "Permission denied", str(self))
            return super().write_bytes(data)

    client = load_ws_client()
    client.Path = RefusedPath
    return ws_client_here(*args, client=client)


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
    r = ws_client_here("--server", url, "--out", str(tmp_path))
    assert_one_line_error(r, "another run's frames", code=2)
    assert app.state.registry.sessions == {}
    (tmp_path / "000000_00000000ms.jpg").unlink()  # a folder with other files is fine
    r = ws_client_here("--server", url, "--seconds", "0.5", "--out", str(tmp_path))
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


@pytest.mark.parametrize("channels", [1, 3])
def test_a_wave_format_extensible_wav_of_pcm_is_read_as_a_plain_one(tmp_path, channels, capsys):
    """WAVE_FORMAT_EXTENSIBLE (what ffmpeg writes for more than 2 channels, sox and Windows for
    plain PCM) was refused as "holds WAVE_FORMAT_EXTENSIBLE" whatever its samples; of 16-bit PCM
    it is read as the plain WAV of the same samples (3 channels: refused as any other such)."""
    client = load_ws_client()
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
    r = ws_client_here("--server", url, "--wav", str(path), "--out", str(tmp_path / "f"))
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
    r = ws_client_here("--server", url, "--say", "a" * 1001, "--seconds", "0.5", "--out", str(tmp_path))
    assert_one_line_error(r, "--say of 1001 characters: a speak holds at most 1000", code=2)
    assert app.state.registry.sessions == {}


@pytest.mark.parametrize("option, value, status", [("--avatar", "nobody", 404), ("--seed", "-1", 422)])
def test_a_session_the_server_refuses_for_an_option_is_one_line_exit_2(server, tmp_path, option, value, status):
    """An unknown --avatar or a bad --seed exited 1, as the server's failures do; 2 is a run given what cannot be."""
    url, app = server
    r = ws_client_here("--server", url, option, value, "--seconds", "0.5", "--out", str(tmp_path))
    assert_one_line_error(r, f"session refused: {status}", code=2)
    assert app.state.registry.sessions == {}


def test_a_stream_the_server_closes_is_one_line_with_its_close_code(server, tmp_path):
    url, app = server
    # (a --say of spaces alone: one too long to speak is refused by the client itself, before a session)
    r = ws_client_here("--server", url, "--say", "   ", "--seconds", "3", "--out", str(tmp_path))
    assert_one_line_error(r, "4400", "speak: text is empty")
    assert app.state.registry.sessions == {}


def test_a_full_server_is_asked_again_until_wait_is_spent(server, tmp_path):
    import httpx

    url, app = server
    held = httpx.post(f"{url}/v1/sessions", json={"avatar": "sample"}).json()  # the one place
    try:
        r = ws_client_here("--server", url, "--say", "hi", "--wait", "0", "--out", str(tmp_path))
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
    client = subprocess.Popen([sys.executable, str(WS_CLIENT), *argv], stdout=subprocess.PIPE, text=True)
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
    client = subprocess.Popen([sys.executable, str(WS_CLIENT), *argv], stdout=subprocess.PIPE, text=True)
    try:
        said = client.stdout.readline()  # the client's first answer: busy, or refused and gone
    finally:  # the place frees once the client waits for it
        httpx.delete(f"{url}{held['resource']}", headers={"Authorization": f"Bearer {held['token']}"})
    out, _ = client.communicate(timeout=60)
    assert "server busy" in said and client.returncode == 0, said + out
    assert saved_frames(tmp_path)
