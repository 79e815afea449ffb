"""The set of live sessions: admission control, creation, limits and teardown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
from collections import OrderedDict
from typing import NoReturn

import numpy as np

from .batching import group_mates, join_schedule, lane_dues, playout_delay
from .config import ServerConfig
from .metrics import ServerMetrics
from .model_host import HostDown, HostStopped
from .scheduler import InferenceWorker, LaneDown, WorkerBusy, total_capacity
from .session import Session
from .stop_event import StopBegun, waker

log = logging.getLogger("streamgen.server")


ABANDONED = "abandoned"  # a request key whose client left while its session was made
# seconds the server's stop waits for its sessions' teardowns (their transports closed, their streams
# freed on their lanes): a chunk that never ends (a hung GPU) held the stop for ever, each stream's
# close queued behind it. The sessions are closed, their reasons said, before the wait
STOP_WAIT_S = 10.0
# seconds a create waits for closed sessions' streams to be freed on other lanes (`_closing_streams_ended`)
# before it is refused as busy. A close queued on a lane runs after the batch in progress (less than a
# chunk's 0.32 s where the server is real-time), the jobs queued before it, and due chunks for
# JOB_PATIENCE (1 s) at most: a second or two on a saturated lane. One still waiting after 5 s is
# behind a chunk that does not end (a hung GPU), and the POST waited on it until its client gave up
CLOSING_STREAM_WAIT_S = 5.0


class SessionEnded(Exception):
    """The session was closed (DELETE, a limit, its transport) while a transport was setting up."""


class AdmissionError(Exception):
    """Refused with 503: `reason` goes into the JSON body, `retry_after` into the header."""

    def __init__(self, reason: str, retry_after: int, **details):
        super().__init__(reason)
        self.reason, self.retry_after, self.details = reason, retry_after, details


class SessionRegistry:
    ENDED_KEPT = 1024  # the closed sessions whose reasons are kept (`ended`): ~100 bytes each

    def __init__(self, config: ServerConfig, worker: InferenceWorker, metrics: ServerMetrics):
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        # id -> (token, why it closed), the last closed sessions': a client that asks after its session
        # (the web page's WebRTC check) is told why it ended (require_session), not only that it is unknown
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Streamgen-Request-Key of a POST /v1/sessions -> its session, None while it is made, or
        # ABANDONED: a client that leaves before it has the answer (a page reloaded just as its
        # session was answered) ends it by that key (DELETE /v1/sessions), not knowing its id.
        # Bounded as the sessions are: a key is kept only while its POST runs or its session lives
        self.requests: dict[str, Session | str | None] = {}
        self.model = None  # AvatarModel, set when loaded in this process
        self.host = None  # ModelHost, when the model runs in a child process
        self.host_start: concurrent.futures.Future | None = None  # the worker's job that starts it
        self.chunk_seconds = 0.32
        # one session's chunk made alone (each lane making one at once), measured at the warm-up:
        # whether a session can stream in real time at all (`real_time`)
        self.alone_chunk_seconds: float | None = None
        self.ready = False
        self.load_error: str | None = None  # why the model did not load or warm up: it never will here
        self._creating = 0
        # (lane, its close) of each closed session's stream whose close has not run yet: its cache
        # is alive, though its session is no longer counted (`_closing_streams_ended`)
        self._streams_closing: list[tuple[int, concurrent.futures.Future]] = []
        self.down_logged = False  # whether the log has said the model host went down (`enforce_limits`)
        # set as the server begins to stop (a SIGINT/SIGTERM reached it): a `serve --sp` host then
        # takes a follower rank found gone for the stop, which reached the follower too
        self.stopping = StopBegun()

    # --- admission -------------------------------------------------------------------------------
    def capacity(self) -> int:
        return total_capacity(self.lane_fits(), self.config.max_sessions)

    def admitting(self) -> int:
        """The sessions this server admits now: its capacity once ready, none while it loads, once
        its model is down or once it has begun to stop (/readyz's `capacity`; the capacity gauge,
        read when scraped: set at each admission, it kept saying the last capacity after the model
        process died)."""
        return self.capacity() if self.ready and not self.down and not self.stopping.is_set() else 0

    def stop_begun(self) -> bool:
        """Whether the server's stop has begun: its `stopping` (set at the signal, the shutdown, or a
        host's own stop), or its worker's (which takes no job from then on). The one way the registry
        and the refusals made from it ask (server/stop_event.py)."""
        return self.stopping.is_set() or (self.worker is not None and self.worker.stopped)

    def ended_with_the_stop(self, error: Exception) -> bool:
        """Whether a job refused with `error` (WorkerBusy, HostDown) was refused by the server's stop:
        a host that ended with it (HostStopped), or any refusal once it has begun. A create and a
        caption asked it each in its own way: a host found down as the stop began was the stop's
        refusal for one, `model_down` for the other."""
        return isinstance(error, HostStopped) or self.stop_begun()

    def lane_fits(self) -> list[int] | None:
        """Sessions that fit on each lane (`InferenceWorker.lane_fits`); None: not measured."""
        if not self.config.measure_capacity:
            return None
        return self.worker.lane_fits(self.chunk_seconds, self.config.max_sessions)

    @property
    def host_down(self) -> str | None:
        """Why the model host can run nothing more (then the server is unhealthy), or None."""
        return getattr(self.host, "down", None)

    def model_process_pid(self) -> int | None:
        """The id of the model process (`--model-process`) while it runs, else None (once it has
        died, the id may be another process's)."""
        process = getattr(self.host, "process", None)
        return process.pid if process is not None and not self.host_down else None

    @property
    def real_time(self) -> bool:
        """Whether one session's chunk, made alone, is made faster than it plays (measured at the
        warm-up). Not from the worker's time per session now (`chunk_time_ema`), a batch's time
        shared among its sessions: batches made it say true where one session alone was too slow,
        and a batch of 4 at 100 ms a session is 400 ms, past a 320 ms chunk."""
        return (self.alone_chunk_seconds or 0.0) <= self.chunk_seconds

    @property
    def down(self) -> str | None:
        """Why this server can generate nothing, ever (then it is unhealthy), or None."""
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        return self.host_down or self.worker.down

    def admit(self) -> list[int] | None:
        """Refuse a new session unless there is room for it; the sessions that fit on each lane
        (`lane_fits`, what its lane is chosen by)."""
        if self.stopping.is_set():  # a kept-alive connection's POST during the stop got a session
            # that the worker set up ahead of the others' teardowns, closed as soon as it was made
            self._refuse("server is shutting down", 5, "stopping")
        if self.host_down:
            self._refuse_host_down()
        if self.worker.down:  # a lane failed (the creates it held are refused as it fails, `create`)
            self._refuse(f"the server cannot generate: {self.worker.down}", 30, "worker_down")
        if self.load_error:  # (it said "still loading", for ever)
            self._refuse(f"the model failed to load: {self.load_error}", 30, "load_error")
        if not self.ready:
            self._refuse("model is still loading", 5, "loading")
        fits = self.lane_fits()
        capacity = total_capacity(fits, self.config.max_sessions)
        active = len(self.sessions) + self._creating
        if active >= capacity:
            self._refuse(
                f"server is at capacity ({active} of {capacity} real-time sessions)",
                max(1, round(self.chunk_seconds * 10)),
                "capacity",
                active=active,
                capacity=capacity,
            )
        return fits

    def _refuse_host_down(self) -> NoReturn:
        if getattr(self.host, "awaiting_stop", False):  # (`serve --sp`: for up to 2 s a follower found gone
            # may have ended with the stop, as every rank does at a Ctrl-C; it was "the model is
            # unavailable", Retry-After 30, counted host_down, where the stop's answer followed)
            self._refuse("server may be shutting down: a rank of the model was found gone, and whether the "
                         "stop ended it is not known yet", 5, "stopping")  # fmt: skip
        self._refuse(f"the model is unavailable: {self.host_down}", 30, "host_down")

    def _refuse(self, reason: str, retry_after: int, label: str, **details) -> NoReturn:
        self.metrics.sessions_rejected.labels(label).inc()
        raise AdmissionError(reason, retry_after, **details)

    def playout_delay(self, lane: int = 0) -> float:
        """How far playout trails generation for a session joining `lane`: room for one round of
        the chunks of that lane's streaming sessions and its own. The other lanes generate at the
        same time on their own threads; what they take from this one is in the measured chunk time."""
        if self.config.playout_delay_s is not None:
            return self.config.playout_delay_s
        chunk = self.worker.chunk_time_ema or 0.15
        return playout_delay(chunk * (self.worker.streaming_on(lane) + 1))

    def stop_host(self) -> None:
        """At shutdown, after the worker's stop: stop the model host, or the one still starting
        once it has started (on the thread that starts it). A shutdown while it started left
        `host` unset, and the host that then finished starting was never stopped: its model
        process, or its process group and model (test_server_model_process). It does not become
        `host`: nothing is served any more."""
        if self.host is not None:
            self.host.stop()
        elif self.host_start is not None:
            self.host_start.add_done_callback(_stop_started_host)  # (at once if it has started)

    # --- a creation's request key ----------------------------------------------------------------
    def begin_request(self, key: str) -> bool:
        """A POST /v1/sessions with this key begins; False where another holds the key."""
        if key in self.requests:
            return False
        self.requests[key] = None
        return True

    def made_for_request(self, key: str, session: Session) -> bool:
        """The session its request made; False where the key was abandoned while it was made."""
        if self.requests.get(key) is ABANDONED:
            del self.requests[key]
            return False
        self.requests[key] = session
        session.request_key = key
        return True

    def forget_request(self, key: str) -> None:
        """Its POST failed: no session holds the key."""
        if self.requests.get(key) in (None, ABANDONED):
            self.requests.pop(key, None)

    def abandon_request(self, key: str) -> Session | None:
        """DELETE /v1/sessions with the key: its session to close, if made; one being made is
        closed as it is made (`made_for_request`). An unknown key is no one's: nothing is kept."""
        held = self.requests.get(key, ABANDONED)
        if held is None:
            self.requests[key] = ABANDONED
        return held if isinstance(held, Session) else None

    # --- lifecycle -------------------------------------------------------------------------------
    async def create(self, reference: np.ndarray, caption: str | None, seed: int | None) -> Session:
        fits = self.admit()
        self._creating += 1
        lane, stream = self.worker.take_lane(fits), None
        try:
            await self._closing_streams_ended(lane, total_capacity(fits, self.config.max_sessions))
            left = threading.Event()  # its caller left while the worker made the stream
            make = self._new_stream_unless_left
            future = self.worker.submit(make, left, reference, caption, seed, lane=lane)
            try:
                stream = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if future.cancelled() and not asyncio.current_task().cancelling():
                    # not its caller's cancel: the worker's stop cancelled its queued job (the only
                    # cancel of a job but a caller's), and it went out of the handler as such
                    self._refuse("server is shutting down", 5, "stopping")
                left.set()
                future.add_done_callback(lambda made: self._close_unclaimed(made, lane))
                raise
        except LaneDown as e:  # its lane failed while the create waited there
            self._refuse(f"the server cannot generate: {e}", 30, "worker_down")
        except WorkerBusy as e:
            if self.stop_begun():  # (met after a wait for a closing stream,
                # `_closing_streams_ended`): the stop's answer, as admit() and a cancelled job give it;
                # it was 'busy' with Retry-After 1, as a full queue is
                self._refuse("server is shutting down", 5, "stopping")
            self._refuse(str(e), 1, "busy")
        except HostDown as e:  # it died just now; admit() refuses every later request
            if self.ended_with_the_stop(e):  # (it ended with the stop: the stop's
                # answer, as the others get it; it was "the model is unavailable", Retry-After 30)
                self._refuse("server is shutting down", 5, "stopping")
            self._refuse_host_down()
        finally:
            self._creating -= 1
            if stream is None:  # no session holds the lane
                self.worker.release_lane(lane)
        if self.stopping.is_set():  # the stop began while its stream was made: a 201 was a session
            # the stop closed at once (or, made after its close_all, one never closed)
            self._drop_stream(stream, lane)
            self._refuse("server is shutting down", 5, "stopping")
        session = Session(secrets.token_hex(8), stream, asyncio.get_running_loop(), self.config.max_audio_ahead_s,
                          clock=self.worker.clock)  # (its due times are planned on the worker's clock)
        session.lane = lane
        session.fail_handler = lambda s, reason: asyncio.ensure_future(self.close(s, reason))
        session.on_late = self.metrics.late_chunks.inc
        received = self.metrics.audio_received
        session.timeline.on_receive = lambda source, n: received.labels(source).inc(n / 16000)
        self.sessions[session.id] = session
        self.metrics.sessions_created.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        log.info("session %s created (%dx%d)", session.id, session.width, session.height)
        # start the first chunk now: it is ready (or nearly) by the time a transport attaches
        session.preroll = asyncio.ensure_future(self._first_chunk(session))
        return session

    async def _closing_streams_ended(self, lane: int, capacity: int) -> None:
        """Until the streams of closed sessions on lanes other than `lane` are closed, as far as a
        stream made now on `lane` would be past `capacity` with them. A stream's close is queued on
        its lane as its session closes (`_queue_stream_close`), ahead of a stream made after it on
        the same lane; on another, idle lane, the new one was made at once while the closed one's
        close waited behind a chunk: two caches alive where the server admits one. The create
        waits for it (a chunk's time) rather than being refused: the closed session no longer
        counts (a page reloaded at capacity closes its session and makes another at once).
        Refused as busy after CLOSING_STREAM_WAIT_S (the caller gives its lane back): it waited as
        long as a lane stuck in a chunk did, and its client with it."""
        deadline = asyncio.get_running_loop().time() + CLOSING_STREAM_WAIT_S
        while True:
            self._streams_closing = [(on, close) for on, close in self._streams_closing if not close.done()]
            elsewhere = [(on, close) for on, close in self._streams_closing if on != lane]
            if not elsewhere or len(self.sessions) + self._creating + len(elsewhere) <= capacity:
                return
            # (not asyncio.wrap_future: cancelling the create cancelled a close, and a close's error
            # unread there was logged as never retrieved)
            one_ended = asyncio.get_running_loop().create_future()
            for _, close in elsewhere:
                close.add_done_callback(waker(one_ended))
            # woken by the stop too: it waited out CLOSING_STREAM_WAIT_S before the stop's answer
            self.stopping.wake_at_set(one_ended)
            try:
                async with asyncio.timeout_at(deadline):
                    await one_ended
            except TimeoutError:
                stuck = sorted({on for on, close in elsewhere if not close.done()})
                if stuck:  # (none: they ended as the time ran out, checked again above)
                    self._refuse_closes_stuck(stuck)
            finally:
                self.stopping.forget(one_ended)
            if self.stopping.is_set():
                self._refuse("server is shutting down", 5, "stopping")

    def _refuse_closes_stuck(self, lanes: list[int]) -> None:
        """A create's wait for closing streams on `lanes` ran out (`_closing_streams_ended`)."""
        if self.stopping.is_set():  # (the stop began meanwhile: its answer)
            self._refuse("server is shutting down", 5, "stopping")
        where = f"inference lane{'s' if len(lanes) > 1 else ''} {', '.join(map(str, lanes))}"
        waited = seconds(CLOSING_STREAM_WAIT_S)
        log.warning("a create waited %s for closed sessions' streams to be freed on %s, behind a chunk there: "
                    "refused (is the lane stuck?)", waited, where)  # fmt: skip
        self._refuse(f"server is busy: a closed session's stream is still held on {where} "
                     f"(its close waited {waited} behind a chunk there)", 1, "busy")  # fmt: skip

    def _drop_stream(self, stream, lane: int) -> None:
        """A stream made for no session: closed on its lane, which is released once it is."""
        try:
            closing = self.worker.submit(stream.close, lane=lane, force=True)
        except WorkerBusy:  # the worker runs nothing more: the stream goes with the reference
            self.worker.release_lane(lane)
            return
        closing.add_done_callback(lambda _: self.worker.release_lane(lane))  # (cancelled at the stop too)

    def _new_stream_unless_left(self, left: threading.Event, reference, caption, seed):  # worker thread
        """A stream, closed at once where its caller left while it was made: its close queued once it
        was made (`_close_unclaimed`) came after the stream of a create queued meanwhile (the page
        reloaded, its next POST), two caches where the server admits one (test_server_worker_lanes)."""
        stream = self._new_stream(reference, caption, seed)
        if left.is_set():
            stream.close()
            return None
        return stream

    def _close_unclaimed(self, made: concurrent.futures.Future, lane: int) -> None:
        """A stream made for a create whose caller was cancelled (its client gone, or shutdown) just
        after it was made: no session holds it, and a model process would keep it (and its cache)
        for good. (One whose caller left while it was made is closed there already.)"""
        if made.cancelled() or made.exception() is not None or made.result() is None:
            return
        try:  # on the worker (this runs on whichever thread finished the future)
            self.worker.submit(made.result().close, lane=lane, force=True)
        except WorkerBusy:  # shutting down: the model process goes with it
            pass

    def _make_first_chunk(self, session: Session):  # worker thread
        """Chunk 0, unless the stream's schedule made it first: a transport attached while this job
        waited behind due chunks. Then it would make chunk 1 ahead of its time, before its audio
        could arrive (silence, where the client's speech was due). Nor for a session closed while
        it waited (created and deleted at once): its chunk would take a chunk's time from the
        streaming sessions' for no one."""
        if session.chunk_index > 0 or session.closed:
            return None
        return self.worker.run_chunk(session)

    async def _first_chunk(self, session: Session) -> None:
        try:
            job = self.worker.submit(self._make_first_chunk, session, lane=session.lane)
            chunk = await asyncio.wrap_future(job)
        except LaneDown as e:  # its lane failed (logged there): it would never stream
            await self.close(session, f"generation failed: {e}")
            return
        except (WorkerBusy, HostDown, concurrent.futures.CancelledError, asyncio.CancelledError):
            # shutting down, or the queue is full: the worker makes it on its schedule instead; the
            # model process gone: its sessions end as host_down
            return
        except Exception as e:  # (a RuntimeError too, torch's errors: taken for a shutdown, unlogged)
            log.exception("session %s: first chunk failed", session.id)
            await self.close(session, f"generation failed: {e}")
            return
        if chunk is None:  # made on the schedule, and published there
            return
        session.first_chunk = chunk
        session.publish_first_chunk()

    def _new_stream(self, reference, caption, seed):  # worker thread
        from streamgen.stream import StreamSession

        c = self.config
        if self.host is not None:
            from .model_host import RemoteStream

            return RemoteStream(self.host, reference, caption, seed, c.height, c.width, c.steps)
        stream = StreamSession(self.model, height=c.height, width=c.width, steps=c.steps, device=c.device,
                               decode_dtype=c.decode_dtype)  # fmt: skip
        stream.start(reference, text=caption, seed=seed)
        return stream

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def start_streaming(self, session: Session, transport: str) -> None:
        if session.closed:  # it would stream again in the worker, with nothing left to remove it
            raise SessionEnded(f"session ended: {session.close_reason}")
        first = 1.1 * (self.worker.chunk_time_ema or 0.15) + 0.01  # the first chunk's own generation
        session.attach(transport, self.playout_delay(session.lane), first)
        if self.worker.align_batches:
            self._join_lane_schedule(session)
        self.worker.add(session)
        session.publish_first_chunk()
        self.metrics.sessions_streaming.set(self.worker.streaming)

    def _join_lane_schedule(self, session: Session) -> None:
        """Put a session that starts streaming on its lane's schedule, so that its chunks are
        generated with theirs (server/batching.py). The group it joins then makes a bigger batch:
        its sessions whose delay is shorter than that batch needs play that much later from now."""
        lane = self.worker.lane_sessions(session.lane)
        clocks = lane_dues(lane)  # read once: the group is the one its schedule was chosen from
        base, times = session.base, (self.worker.batch_times.estimate, self.worker.ready_times.estimate)
        schedule = join_schedule(
            session.base, session.delay, session.chunk_index, session.chunk_seconds, clocks, *times,
            fixed_delay=self.config.playout_delay_s is not None, max_delay=Session.MAX_DELAY,
        )  # fmt: skip
        session.reschedule(schedule.base, schedule.delay)
        if schedule.joins is None:
            log.debug("session %s: a schedule of its own (%d streaming on lane %d); playout delay %.0f ms",
                      session.id, len(lane), session.lane, 1000 * session.delay)  # fmt: skip
            return
        # the group joined: the sessions the worker generates in one batch with it (`join_schedule`)
        mates = group_mates(clocks, lane_dues([session])[0], session.chunk_seconds, *times, Session.MAX_DELAY)
        group = [lane[i] for i in mates]
        log.debug("session %s: joins a group of %d on lane %d, first frame %.0f ms later; playout delay %.0f ms",
                  session.id, len(group), session.lane, 1000 * (schedule.base - base), 1000 * session.delay)  # fmt: skip
        for other in group:
            other.hold_back(schedule.delay)

    def _leave_lane_group(self, session: Session) -> None:
        """A session that stops streaming leaves a smaller batch behind: its group's sessions may
        come back down to the delay that batch needs (a delay held back for a bigger batch comes
        down when their chunks keep arriving early, `Session._lower_delay_when_early`)."""
        lane = self.worker.lane_sessions(session.lane)
        times = (self.worker.batch_times.estimate, self.worker.ready_times.estimate)
        leaving = lane_dues([session])[0]
        mates = group_mates(lane_dues(lane), leaving, session.chunk_seconds, *times, Session.MAX_DELAY)
        group = [lane[i] for i in mates]
        ready = self.worker.ready_times.estimate(len(group))
        if not group or ready is None or self.config.playout_delay_s is not None:
            return
        for other in group:
            other.start_delay = min(other.start_delay, playout_delay(ready))

    async def close(self, session: Session, reason: str) -> None:
        """End a session (idempotent): stop generation, close its transport, free the model state."""
        if session.teardown is None:
            # (not `streaming`: the worker's `_fail` clears it, and a failed session left its group
            # behind held back for the batch it made bigger)
            was_streaming = session.attached
            session.closed, session.streaming, session.close_reason = True, False, reason
            self.worker.remove(session.id)
            self.worker.close_on_lane(session.lane)
            if was_streaming and self.worker.align_batches:
                self._leave_lane_group(session)
            self.sessions.pop(session.id, None)
            if session.request_key is not None:
                self.requests.pop(session.request_key, None)
            self.ended[session.id] = (session.token, reason)
            while len(self.ended) > self.ENDED_KEPT:
                self.ended.popitem(last=False)
            self.metrics.sessions_active.set(len(self.sessions))
            self.metrics.sessions_streaming.set(self.worker.streaming)
            self.metrics.sessions_closed.labels(reason.split(":")[0][:32]).inc()
            log.info("session %s closed: %s", session.id, reason)
            stream_closed = self._queue_stream_close(session)
            if stream_closed is not None:  # (those closed by now dropped: the list is as long as the closes under way)
                self._streams_closing = [(on, close) for on, close in self._streams_closing if not close.done()]
                self._streams_closing.append((session.lane, stream_closed))
            session.teardown = asyncio.ensure_future(self._teardown(session, stream_closed))
        # shielded: a caller being cancelled (its own transport task) must not cut the teardown short
        await asyncio.shield(session.teardown)

    def _queue_stream_close(self, session: Session) -> concurrent.futures.Future | None:
        """Queue the stream's close on its lane as the session closes, before anything awaits: a
        session created meanwhile (admitted at once, the closed one no longer counted) queues its
        stream's making behind it there, so the old cache is freed first. Queued after the
        transports' closes, as it was, the new stream was made first: two caches where the server
        admits one, more the faster sessions came and went (test_server_worker_lanes). On its lane,
        after any chunk of this session it may be generating; past a full queue (a client's burst
        of captions): dropped, the stream went on under a batch in progress, and a model process
        kept it for good. None where the worker runs nothing more (its stop, its lane failed):
        dropping the reference frees the cache all the same."""
        try:
            return self.worker.submit(session.stream.close, lane=session.lane, force=True)
        except WorkerBusy:
            return None

    async def _teardown(self, session: Session, stream_closed: concurrent.futures.Future | None) -> None:
        await session.run_closers()  # (the transports touch no stream: only its lane does)
        try:
            if stream_closed is not None:
                await asyncio.wrap_future(stream_closed)
        except (WorkerBusy, RuntimeError, concurrent.futures.CancelledError, asyncio.CancelledError):
            pass  # the worker stopped (shutdown), its lane failed, or a model process went: the stream
            # goes with the reference
        finally:
            self.worker.release_lane(session.lane, closed=True)
        session.stream = None

    async def close_all(self, reason: str) -> None:
        """At the server's stop: every session closed, their teardowns waited for STOP_WAIT_S at most."""
        closing = [asyncio.ensure_future(self.close(s, reason)) for s in list(self.sessions.values())]
        if not closing:
            return
        done, left = await asyncio.wait(closing, timeout=STOP_WAIT_S)
        for task in done:  # (logged, the stop going on: raised, the worker and model were never stopped)
            if not task.cancelled() and task.exception() is not None:
                log.error("closing a session at the stop failed", exc_info=task.exception())
        if left:  # their streams are freed with the process
            log.warning("%d sessions' streams were still in use by a chunk %g s into the stop: not waited for",
                        len(left), STOP_WAIT_S)  # fmt: skip

    async def enforce_limits_forever(self, period: float = 1.0) -> None:
        """Close sessions past the idle or the maximum-duration limit."""
        while True:
            await asyncio.sleep(period)
            await self.enforce_limits()  # (a failed close is logged there: the limits outlive it)

    @property
    def unclaimed_timeout_s(self) -> float:
        """How long a session may wait for its first connection: never past the idle limit."""
        return min(self.config.unclaimed_timeout_s, self.config.idle_timeout_s)

    async def enforce_limits(self) -> None:
        """The sessions past a limit, closed together: each teardown waits for its lane's worker
        (a chunk in progress), and one after another they held the others past their limits."""
        expired = []
        # a host down at a stop is the stop (`SequenceParallelHost._gone`): the shutdown closes the
        # sessions; one that waits to know whether the stop took its rank (`awaiting_stop`) leaves them
        # to what it finds (the stop's close, or its failure at the next check)
        awaiting_stop = getattr(self.host, "awaiting_stop", False)
        down = None if self.stopping.is_set() or awaiting_stop else self.host_down
        if down and not self.down_logged:  # (a process killed while no session streamed, the OOM
            # killer's way, left no line in the log: only /healthz and each refused request said it)
            self.down_logged = True
            log.error("the model is down: %s; /healthz says so, and the server admits no session until "
                      "it is restarted", down)  # fmt: skip
        # (a registry of no worker: the limits' own tests)
        failed_lanes = self.worker.lane_failures() if self.worker is not None else {}
        for session in list(self.sessions.values()):
            now = session.clock()  # (its times are on its clock: the worker's, `Session(clock=)`)
            if down:  # the model process died: no session of it can stream again
                expired.append((session, f"host_down: {down}"))
            elif failed_lanes and session.lane in failed_lanes:  # its lane failed (those streaming
                # there were ended as it failed; one waiting for its client was left to its limit)
                expired.append((session, f"generation failed: {failed_lanes[session.lane]}"))
            elif session.transport is None and now - session.created > self.unclaimed_timeout_s:
                expired.append((session, f"unclaimed: no client connected within {seconds(self.unclaimed_timeout_s)}"))
            elif now - session.created > self.config.max_duration_s:
                expired.append((session, f"max_duration: session reached {seconds(self.config.max_duration_s)}"))
            elif now - session.last_input > self.config.idle_timeout_s:
                expired.append((session, idle_reason(session, self.config.idle_timeout_s)))
        closed = await asyncio.gather(*(self.close(s, reason) for s, reason in expired), return_exceptions=True)
        for (session, _), outcome in zip(expired, closed):
            if isinstance(outcome, Exception):
                log.error("session %s: closing it at its limit failed: %r", session.id, outcome)


def idle_reason(session, limit: float) -> str:
    """Why a session is closed at the idle limit, in the same words whichever closes it: this
    registry's check or its socket's own timer (`server/websocket.py`), which come due together.
    A socket's client read one or the other by chance."""
    if session.transport == "websocket":  # what counts there: any message once started, only `start` before
        return f"idle: no {'message' if session.streaming else 'start'} for {seconds(limit)}"
    return f"idle: no input for {seconds(limit)}"


def seconds(limit: float) -> str:
    """A limit as its close reason says it: --max-duration 0.5 read "reached 0 s", 2.5 "reached 2 s";
    one of years or more in exponent form (1e300 was its 301 digits)."""
    return f"{limit:.0f} s" if 100 <= limit < 1e9 else f"{limit:.3g} s"


def _stop_started_host(start: concurrent.futures.Future) -> None:
    if start.cancelled() or start.exception() is not None:  # no host was made
        return
    try:
        start.result().stop()
    except Exception:  # (a shutdown's last step: logged, not raised into the worker's thread)
        log.exception("stopping the model host that started during the shutdown failed")
