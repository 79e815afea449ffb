"""The inference worker: the one thread that owns the model.

All model work goes through it: session setup (encoding the reference into the
KV cache), chunk generation and teardown. Streaming sessions are served
earliest-deadline-first, which is round-robin when they run at the same rate:
each has a `next_due` time (see session.py), and the worker sleeps until the
earliest one is due or a job arrives. Chunks are handed to the event loop with
`call_soon_threadsafe`, never awaited, so a slow client cannot stall the worker.

Batching: every session that is due when the worker picks one is generated
with it (`streamgen.stream_batch.next_chunks`): those at the same KV-cache fill level
(all that have streamed longer than the window) share one pass of each stage of a
chunk. Sessions that are not yet due are never generated early: their audio up to
the cut-off may still be on its way. So that they are due together, a session
joins its lane's schedule when it starts streaming, the worker waits for chunks
due soon when every chunk of the batch still makes its play time, and a session
due just after a batch moves its whole schedule sooner to join it (its delay
grows by as much) (server/batching.py; `align_batches`).

Lanes (`serve --lanes N`, default 1): N threads share the model, each serving
its own sessions. A session belongs to one lane from its creation to its
teardown, and every job that touches its stream runs there (`submit(...,
lane=session.lane)`), so a stream is never used by two threads at once; jobs of
no session run on lane 0. PyTorch releases the GIL inside its operators, so two
lanes run two sessions' forwards on two cores at once, where each stage runs on
one thread (streamgen/cpu_threads.py) and leaves a core idle. On the 2-core
machine, two streams on two threads made 1.6-1.8x the frames of one thread at
192x192 and 256x256 and 0.95x at 64x64 (the small forward is bound by Python and
the GIL); served, with the encoder on the same cores, less (docs/serving.md).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque

from .batching import (
    SAME_SCHEDULE,
    BatchTimes,
    Due,
    lane_dues,
    lane_group_indices,
    phase_groups,
    plan_batch,
    pull_into_batch,
    sessions_that_fit,
)
from .metrics import ServerMetrics
from .model_host import HostDown, HostStopped
from .session import Session

log = logging.getLogger("streamgen.server")

JOB_PATIENCE = 1.0  # seconds a job waits at most for due chunks


class WorkerBusy(Exception):
    """The job queue is full."""


class LaneDown(WorkerBusy):
    """A lane's own loop failed (not a session's chunk: its planning, a bug): the lane runs nothing
    more, its jobs fail with this, and the server is down (`InferenceWorker.down`)."""


class InferenceWorker:
    def __init__(
        self, metrics: ServerMetrics, stamp_frames: bool = False, max_jobs: int = 64, lanes: int = 1,
        torch_threads: int | None = None, align_batches: bool = True, clock=time.monotonic,
        wait=threading.Condition.wait,
    ):  # fmt: skip
        """lanes: threads that generate, each for its own sessions; torch_threads: torch's
        intra-op threads in each (None: torch's default); align_batches: wait for chunks due soon
        to generate them together (`plan_batch`), rather than each when it falls due.

        clock: the seconds the worker plans by (the sessions' due times are on it) and times its
        batches by; wait(condition, seconds): a lane's sleep on the worker's condition (held) until
        it is notified or `seconds` of that clock have passed (None: until notified). A test's clock
        passes both and drives the worker's time: on the machine's, a test of the batches the worker
        makes failed 2 runs in 3 under load, its sessions' schedules drifting apart as chunks came
        late (test_server_alignment)."""
        if lanes < 1:
            raise ValueError("an inference worker needs at least one lane")
        self.metrics = metrics
        self.stamp_frames = stamp_frames
        self.max_jobs = max_jobs
        self.torch_threads = torch_threads
        self._cond = threading.Condition()
        self._jobs: list[deque] = [deque() for _ in range(lanes)]
        self._sessions: dict[str, Session] = {}
        self._lane_load = [0] * lanes  # sessions created on each lane and not yet torn down
        self._lane_closed = [0] * lanes  # of those, the ones closed: they take none of its time
        self._lane_failures: dict[int, str] = {}  # lane -> why its loop ended (`_lane_failed`)
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, args=(lane,), name=f"inference-worker-{lane}", daemon=True)
            for lane in range(lanes)
        ]
        self.chunk_time_ema: float | None = None  # seconds per chunk of one session on one lane, measured
        # seconds per batch of k sessions' chunks, measured: in all (re-encodes too), and to publish
        self.batch_times, self.ready_times = BatchTimes(), BatchTimes()
        self.align_batches = align_batches
        self.clock, self._wait = clock, wait
        # counted when scraped: set by each lane, an idle lane's 0 overwrote a busy one's count
        metrics.queue_depth.set_function(self.waiting)

    @property
    def lanes(self) -> int:
        return len(self._threads)

    @property
    def down(self) -> str | None:
        """Why a lane runs nothing more (its loop failed), or None: the server is then unhealthy."""
        with self._cond:
            return next(iter(self._lane_failures.values()), None)

    @property
    def stopped(self) -> bool:
        """Whether its stop has begun: it takes no job more (`submit` raises WorkerBusy)."""
        with self._cond:
            return self._stopping

    def lane_failures(self) -> dict[int, str]:
        """lane -> why its loop failed, for the lanes that run nothing more."""
        with self._cond:
            return dict(self._lane_failures)

    # --- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def submit(self, fn, *args, lane: int = 0, force: bool = False) -> concurrent.futures.Future:
        """Run `fn(*args)` on a worker thread, `lane`'s (a session's jobs on the session's lane);
        the result arrives in the returned future. `force`: past a full queue (a session's
        teardown, which must not be dropped for others' jobs), though not past shutdown."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise WorkerBusy("server is shutting down")
            if lane in self._lane_failures:
                raise LaneDown(self._lane_failures[lane])
            if not force and sum(len(q) for q in self._jobs) >= self.max_jobs:
                raise WorkerBusy("inference queue is full")
            self._jobs[lane].append((future, fn, args, self.clock()))
            self._cond.notify_all()
        return future

    def waiting(self) -> int:
        """Jobs queued and chunks due, over every lane (the queue-depth gauge, read when scraped)."""
        now = self.clock()
        with self._cond:
            due = sum(1 for s in self._sessions.values() if s.streaming and not s.closed and s.next_due <= now)
            return sum(len(q) for q in self._jobs) + due

    def take_lane(self, fits: list[int] | None = None) -> int:
        """The lane for a new session: the one with the most room left (`fits`: the sessions that
        fit on each lane, `lane_fits`, less those it holds), then the one with the fewest;
        `release_lane` after its teardown. By the fewest alone, a lane whose sessions fall due in
        groups apart (a pass each) took the next session past its room while another lane had
        room for it: the capacity is the lanes' rooms summed (test_server_batching). A closed
        session holds its lane until its teardown but takes none of its room, as the capacity
        counts: counted, the next session went past another lane's room (test_server_batching)."""
        with self._cond:
            held = [self._lane_load[i] - self._lane_closed[i] for i in range(self.lanes)]
            room = [0 if fits is None else fits[i] - held[i] for i in range(self.lanes)]
            lane = min(range(self.lanes), key=lambda i: (-room[i], self._lane_load[i]))
            self._lane_load[lane] += 1
            return lane

    def close_on_lane(self, lane: int) -> None:
        """A session on `lane` is closed: it leaves its room (`take_lane`), its lane held until
        `release_lane(lane, closed=True)`."""
        with self._cond:
            self._lane_closed[lane] += 1

    def release_lane(self, lane: int, closed: bool = False) -> None:
        with self._cond:
            self._lane_load[lane] -= 1
            self._lane_closed[lane] -= closed

    def add(self, session: Session) -> None:
        with self._cond:
            failure = self._lane_failures.get(session.lane)
            if failure is None:
                self._sessions[session.id] = session
                self._cond.notify_all()
        if failure is not None:  # its lane makes no chunk any more: ended as those streaming there were
            self._fail([session], LaneDown(failure))

    def remove(self, session_id: str) -> None:
        with self._cond:
            self._sessions.pop(session_id, None)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def streaming(self) -> int:
        return len(self._sessions)

    def streaming_on(self, lane: int) -> int:
        """Sessions streaming on `lane`: the ones its thread generates for, in turn."""
        with self._cond:
            return sum(1 for s in self._sessions.values() if s.lane == lane)

    def lane_sessions(self, lane: int) -> list[Session]:
        """The sessions streaming on `lane`."""
        with self._cond:
            return [s for s in self._sessions.values() if s.lane == lane and s.streaming]

    def capacity(self, chunk_seconds: float, limit: int) -> int:
        """Sessions that fit in real time: on each lane, the most whose chunks the worker generates
        within 85% of the chunk period, by its measured time for a batch of that many
        (`batch_times`; a size not timed yet from its neighbours', above the largest at that one's
        time per session); at least one a lane. Not the chunk period over the last batches' time
        per session: that is the time of the batches of the sessions streaming now, which said 3
        where batches of 8 had been timed to fit (a pass's fixed cost shared by fewer), and 7
        where batches of 8 had been timed too slow and 5 fit (a session costing more in a bigger
        batch). The times are measured with every lane at work (the warm-up in server/app.py). With
        lanes the headroom is 30%: they also compete with the video encoder and the network,
        which the warm-up does not run (at 192x192 on 2 cores, 2 lanes measured 132 ms a chunk,
        4 sessions by 15%, and served 2 in real time). Before any batch is timed, a batch of k
        takes k times `chunk_time_ema` (given alone); with neither, the limit.

        A lane's streaming sessions whose due times lie apart (a clock moved further than
        `pull_into_batch` regroups, or batches not aligned) are generated as a batch per group,
        each pass paying its fixed cost: the lane's period holds all of them and those to come
        (`sessions_that_fit`). Counted as one batch, two groups of a lane whose batch of 8 was
        timed to fit said 9 where 5 fit in real time (test_server_batching)."""
        return total_capacity(self.lane_fits(chunk_seconds, limit), limit)

    def lane_fits(self, chunk_seconds: float, limit: int) -> list[int] | None:
        """Sessions that fit in real time on each lane, those it streams included (see `capacity`);
        None before any batch is timed."""
        if self.batch_times.estimate(1) is None and not self.chunk_time_ema:
            return None

        def batch_seconds(k: int) -> float:
            timed = self.batch_times.estimate(k)
            return timed if timed is not None else k * self.chunk_time_ema

        room = (0.85 if self.lanes == 1 else 0.7) * chunk_seconds
        join_room = 0.85 * chunk_seconds  # join_schedule's headroom
        fits = []
        for lane in range(self.lanes):
            sessions = self.lane_sessions(lane)
            if self.align_batches:  # the batches the worker will make of them
                groups = [len(group) for group in lane_group_indices(
                    lane_dues(sessions), chunk_seconds, self.batch_times.estimate, self.ready_times.estimate,
                    Session.MAX_DELAY,
                )]  # fmt: skip
            else:
                dues = [s.next_due for s in sessions]
                groups = [len(group) for group in phase_groups(dues, chunk_seconds, SAME_SCHEDULE)]
            fits.append(sessions_that_fit(groups, batch_seconds, room, join_room, limit, self.align_batches))
        return fits

    # --- the thread ------------------------------------------------------------------------------------
    def _next(self, lane: int):
        """Under the lock: a job, a due session of `lane`, or how long to sleep. Chunks that are
        due go first: a job (a new session's setup, its first chunk) waits for them, unless it has
        waited JOB_PATIENCE already (a saturated lane still starts its sessions). Run first, the
        setups of sessions created together made the chunks of those already streaming late."""
        now = self.clock()
        live = [s for s in self._sessions.values() if s.streaming and not s.closed and s.lane == lane]
        jobs = self._jobs[lane]
        if jobs and (jobs[0][3] < now - JOB_PATIENCE or all(s.next_due > now for s in live)):
            return jobs.popleft()[:3], None, 0.0
        if not live:
            return None, None, None
        if not self.align_batches:
            due = [s for s in live if s.next_due <= now]
            if due:
                return None, sorted(due, key=lambda s: s.next_due), 0.0
            return None, None, min(s.next_due for s in live) - now
        clocks = [s.due_and_delay() for s in live]
        dues = [Due(next_due, next_due + delay) for next_due, delay in clocks]
        batch, wait = plan_batch(now, dues, self.ready_times.estimate)
        if not batch:
            return None, None, wait
        pulled = []
        if len(batch) < len(live):
            pulled = pull_into_batch(batch, dues, self.batch_times.estimate, live[0].chunk_seconds,
                                    Session.MAX_DELAY, ready_time=self.ready_times.estimate, now=now)  # fmt: skip
        for i, sooner in pulled:
            live[i].generate_sooner(sooner)
        return None, [live[i] for i in batch + [i for i, _ in pulled]], 0.0

    def _run(self, lane: int) -> None:
        try:
            self._serve(lane)
        except Exception as e:  # the loop's own failure (a session's is its own, `_generate`)
            log.exception("inference lane %d failed: its sessions are ended and the server is unhealthy", lane)
            self._lane_failed(lane, e)

    def _lane_failed(self, lane: int, error: Exception) -> None:
        """The lane's loop raised: it is not restarted, the state it ran on unknown and the same
        fault likely to come again at its next session; the server says it is down (/healthz,
        /readyz, admission refused) for its supervisor to restart it. The lane's streaming sessions
        are ended with the reason, as a failed chunk ends one, and its queued jobs (a create's
        stream, a first chunk) fail with it: left, they waited for ever."""
        failure = LaneDown(f"inference lane {lane} failed: {type(error).__name__}: {error}")
        with self._cond:
            self._lane_failures[lane] = str(failure)
            jobs, self._jobs[lane] = self._jobs[lane], deque()
            sessions = [s for s in self._sessions.values() if s.lane == lane]
        for future, _, _, _ in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(failure)
        self._fail(sessions, failure)

    def _serve(self, lane: int) -> None:
        if self.torch_threads:  # torch's thread count is per OS thread
            import torch

            torch.set_num_threads(self.torch_threads)
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        self._cancel_jobs(lane)
                        return
                    job, due, wait = self._next(lane)
                    if job is not None or due is not None:
                        break
                    self._wait(self._cond, wait)
            if job is not None:
                self._run_job(*job)
            else:
                self._generate(due)

    def _run_job(self, future, fn, args) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # delivered to whoever awaits the job
            future.set_exception(e)

    def run_chunk(self, session: Session):
        """Generate `session`'s next chunk and record its time (worker thread)."""
        return self.run_chunks([session])[0]

    def run_chunks(self, sessions: list[Session], publish=None):
        """Generate the next chunk of each session, batched where the model can (worker thread);
        publish(session, chunk) each, then write the chunks into their streams' KV caches."""
        from streamgen.stream import StreamSession
        from streamgen.stream_batch import next_chunks, write_pending_chunks

        t = self.clock()  # (time.monotonic: on Linux the clock perf_counter reads, CLOCK_MONOTONIC)
        local = [s for s in sessions if isinstance(s.stream, StreamSession)]
        chunks, failed = {}, set()
        alone = len(sessions) == 1  # its failure raises, to run_chunk's caller

        def fail_alone(s: Session, e: Exception) -> None:  # its group's others have their chunks
            log.error("session %s: generation failed", s.id, exc_info=e)
            failed.add(s.id)
            self._fail([s], e)

        if len(local) > 1:
            # what each session does on its own fails it alone, as one by one (below): its input,
            # its part of the batch's preparation, its frames' audio. A pass a group of them
            # shares (its forward, decode, re-encode) fails that group's sessions only
            inputs = {}
            for s in local:
                try:
                    inputs[s.id] = s.take_input()  # the timelines are validated and bounded on arrival
                except Exception as e:
                    fail_alone(s, e)
            batch = [s for s in local if s.id in inputs]
            outputs = next_chunks([s.stream for s in batch], on_error=lambda i, e: fail_alone(batch[i], e))
            for s, output in zip(batch, outputs):
                if output is None:
                    continue
                try:
                    chunks[s.id] = s.finish_chunk(*output, inputs[s.id], self.stamp_frames)
                except Exception as e:
                    fail_alone(s, e)
        for s in sessions:  # alone, or a stream in a model child process
            if s.id not in chunks and s.id not in failed:
                try:
                    chunks[s.id] = s.generate(self.stamp_frames)
                except HostDown:  # the model process is gone: every stream with it
                    raise
                except Exception as e:
                    if alone:
                        raise
                    fail_alone(s, e)
        dt = self.clock() - t
        sessions = [s for s in sessions if s.id in chunks]
        if not sessions:  # each failed on its own (and was failed)
            return []
        results = [chunks[s.id] for s in sessions]
        for s, chunk in zip(sessions, results):
            self.metrics.chunk_done(dt, len(chunk.frames))
            if publish is not None:
                publish(s, chunk)
        # Each chunk's clean re-encode into its stream's cache once its frames are on their way
        # (a stream would otherwise run it at the start of its next chunk, before that chunk's
        # denoising, on the chunk's latency: 15% of it). A stream in a model child process does
        # the same there, on its own; the sequence-parallel ranks do it in step (model_host).
        # In one forward where they batch; a group's failed re-encode fails that group's sessions.
        written = [s for s in local if s.id in chunks]
        on_error = None if alone else lambda i, e: fail_alone(written[i], e)
        write_pending_chunks([s.stream for s in written], on_error)
        for s in sessions:
            if not isinstance(s.stream, StreamSession):
                s.stream.write_pending_chunk()
        # what one session's chunk costs the worker, its re-encode included (capacity)
        busy = self.clock() - t
        self.metrics.worker_busy.inc(busy)
        self.metrics.batch_sessions.observe(len(sessions))
        self.batch_times.observe(len(sessions), busy)
        self.ready_times.observe(len(sessions), dt)
        per_session = busy / len(sessions)
        self.chunk_time_ema = (
            per_session if self.chunk_time_ema is None else 0.9 * self.chunk_time_ema + 0.1 * per_session
        )
        return results

    def _generate(self, sessions: list[Session]) -> None:
        try:
            self.run_chunks(
                sessions, publish=lambda session, chunk: _call_soon(session, session.publish, chunk)
            )
        except Exception as e:  # one broken batch must not take the worker down
            if isinstance(e, HostStopped):  # the server's stop, which closes every session anyway
                log.info("sessions %s: generation ended with the server's stop", [s.id for s in sessions])
            elif isinstance(e, HostDown):  # the model host said why when it went down: no traceback
                log.error("sessions %s: generation stopped: %s", [s.id for s in sessions], e)
            else:
                log.exception("sessions %s: generation failed", [s.id for s in sessions])
            self._fail(sessions, e)

    def _fail(self, sessions: list[Session], error: Exception) -> None:
        # a dead model host ends its streaming sessions as it ends the others (`enforce_limits`):
        # as "generation failed" they were counted with the model's own errors
        reason = f"host_down: {error}" if isinstance(error, HostDown) else f"generation failed: {error}"
        if isinstance(error, HostStopped):  # as the shutdown closes the others (uvicorn_server.py)
            reason = "server shutting down"
        for session in sessions:
            self.remove(session.id)
            session.streaming = False
            _call_soon(session, session.fail_from_worker, reason)

    def _cancel_jobs(self, lane: int) -> None:
        while self._jobs[lane]:
            future = self._jobs[lane].popleft()[0]
            future.cancel()


def total_capacity(lane_fits: list[int] | None, limit: int) -> int:
    """The sessions the lanes hold in real time together (`InferenceWorker.lane_fits`; None: not
    measured, the limit), at least one and at most the limit."""
    return limit if lane_fits is None else max(1, min(limit, sum(lane_fits)))


def _call_soon(session: Session, fn, *args) -> None:
    try:
        session.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is gone
        pass
