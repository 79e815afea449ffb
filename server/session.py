"""Sessions: one avatar stream each, its audio timeline, its playout clock and its output slots.

A session is created by `POST /v1/sessions` (the reference is encoded into the
KV cache then), starts streaming when a transport attaches (WHEP offer or the
WebSocket "start" message) and ends when that transport goes away, on
`DELETE`, on the idle or maximum-duration limit, or at shutdown. Ending it
removes it from the inference worker, frees its StreamSession (cache, decoder
state) and runs the transport's close callbacks, so nothing outlives it.

Timing. Everything lives on the stream's own timeline (seconds since the first
chunk). `base` maps it to the wall clock (the session's `clock`, `time.monotonic()`): stream time `p`
plays at `base + p`. The worker generates chunk k at `base - delay + k *
chunk_seconds` and the tracks play it `delay` later; when anything runs late
(the transport connects slowly, the worker is overloaded) `base` moves forward
instead of letting a backlog build, and audio and video move together because
both read the same `base`. The delay adapts to the load: when chunks keep missing
their play time (a second late chunk within `SLACK_WINDOW` chunks of the last), it
grows by as much as that chunk was late, up to `MAX_DELAY`, so that the next ones
are on time instead of each stuttering; a one-off late chunk only moves the clock.
When every chunk of the last few seconds arrived with time to spare, the delay
comes back down towards the one the session started with, `base` moving back and
the tracks skipping what it jumped over: in a pause of the sound (server/pauses.py), where a WebRTC
audio track plays it (`rewind_pending`, applied by the track where its playhead is at
silence, so no word is cut), else at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from .pauses import NOISE_PAUSE_BLOCKS, NOISE_WINDOW_BLOCKS, SILENCE_BLOCK, block_rms, pause_blocks

log = logging.getLogger("streamgen.server")

SAMPLE_RATE = 16000


class AudioTimeline:
    """The session's 16 kHz mono audio placed on the stream timeline; bounded both ways.

    Several sources write into it and are mixed: "mic" and "client" are live
    (real-time) sources, "speech" is queued text-to-speech. Each source has its
    own cursor, so speech does not push the microphone back and vice versa.
    Audio that arrives after the model has taken its position is placed at the
    present, never in the past; a live source that falls behind restarts a
    small jitter margin ahead, so the model's per-chunk reads do not chop it.
    The worker takes samples up to the end of the next chunk's audio window
    (`take_until`); the outgoing audio reads the samples the video was
    generated from (`read`), kept for `history_s`.
    """

    LIVE_MARGIN = int(0.1 * SAMPLE_RATE)

    def __init__(self, max_ahead_s: float = 30.0, history_s: float = 4.0, on_receive=None):
        self.on_receive = on_receive  # (source, samples) -> None: metrics
        self.max_ahead = int(max_ahead_s * SAMPLE_RATE)
        self.history = int(history_s * SAMPLE_RATE)
        self._buf = np.zeros(0, np.float32)
        self._origin = 0  # absolute sample index of _buf[0]
        self._cursors: dict[str, int] = {}  # source -> where its next sample goes
        self.taken = 0  # samples before this have been handed to the model
        self.clears = 0  # interrupts so far (`clear_ahead`): speech asked for before one is dropped
        self._lock = threading.Lock()

    def append(self, pcm: np.ndarray, source: str = "client", live: bool = False, whole: bool = False) -> int:
        """Mix float32 samples in after `source`'s previous ones; returns how many did not fit.
        whole: all of them or none (an utterance: the avatar would say the first half of it)."""
        with self._lock:
            start = self._cursors.get(source, 0)
            if start < self.taken:
                start = self.taken + (self.LIVE_MARGIN if live else 0)
            room = self.taken + self.max_ahead - start
            keep = max(0, min(len(pcm), room))
            if whole and keep < len(pcm):
                keep = 0
            if keep:
                self._ensure(start + keep)
                self._buf[start - self._origin : start + keep - self._origin] += pcm[:keep]
            self._cursors[source] = start + keep
        if self.on_receive is not None:
            self.on_receive(source, len(pcm))
        return len(pcm) - keep

    def clear_ahead(self) -> None:
        """Forget audio not yet handed to the model (interrupt)."""
        with self._lock:
            self.clears += 1
            self._cursors.clear()
            end = max(0, self.taken - self._origin)
            self._buf = self._buf[:end].copy()

    @property
    def queued_seconds(self) -> float:
        with self._lock:
            end = max(self._cursors.values(), default=0)
        return max(0, end - self.taken) / SAMPLE_RATE

    def room_seconds(self, source: str = "speech") -> float:
        """Seconds of audio `source` can still queue after its own, as `append` places it: the
        sources are mixed, so another's audio queued ahead (a client's WAV sent at once) takes none
        of its room."""
        with self._lock:
            start = max(self._cursors.get(source, 0), self.taken)
            return (self.taken + self.max_ahead - start) / SAMPLE_RATE

    def take_until(self, end: int) -> np.ndarray:
        """Samples [taken, end) for the model (silence where nothing arrived); advances `taken`."""
        with self._lock:
            out = self._slice(self.taken, end)
            self.taken = max(self.taken, end)
            # keep `history` behind the model for the audio track, drop older samples
            drop = self.taken - self.history - self._origin
            if drop > 0:
                self._buf = self._buf[drop:].copy()
                self._origin += drop
            return out

    def overwrite(self, start: int, pcm: np.ndarray) -> None:
        """Replace samples the model has already taken (benchmark markers on the outgoing audio)."""
        with self._lock:
            self._ensure(start + len(pcm))
            lo = max(start, self._origin)
            self._buf[lo - self._origin : start + len(pcm) - self._origin] = pcm[lo - start :]

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples [start, start + n) as the model saw them; silence where unknown."""
        with self._lock:
            return self._slice(start, start + n)

    def silent_run(self, start: int, end: int) -> int:
        """How many samples from `start` on (up to `end`) are a pause: whole SILENCE_BLOCKs, each
        with an RMS below SILENCE_RMS, or within the sound's noise floor in a run of
        NOISE_PAUSE_BLOCKS at least (over a noisy microphone)."""
        blocks = max(0, end - start) // SILENCE_BLOCK
        behind = min(NOISE_WINDOW_BLOCKS, max(0, start - max(0, self._origin)) // SILENCE_BLOCK)
        # (ahead far enough to see a noise run's length, no further than the samples the model took)
        ahead = max(blocks, min(NOISE_PAUSE_BLOCKS, max(0, self.taken - start) // SILENCE_BLOCK))
        pcm = self.read(start - behind * SILENCE_BLOCK, (behind + ahead) * SILENCE_BLOCK)
        return pause_blocks(block_rms(pcm), behind, blocks) * SILENCE_BLOCK

    def _ensure(self, end: int) -> None:
        """Room up to sample `end`, grown by doubling: grown to fit, a client's messages of one
        sample each copied the whole queue each (253 us a message with 25 s queued). The room past
        the samples written is silence, as what was never written reads."""
        need = end - self._origin
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf)), np.float32)
            grown[: len(self._buf)] = self._buf
            self._buf = grown

    def _slice(self, start: int, end: int) -> np.ndarray:
        out = np.zeros(max(0, end - start), np.float32)
        lo, hi = max(start, self._origin), min(end, self._origin + len(self._buf))
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo - self._origin : hi - self._origin]
        return np.clip(out, -1.0, 1.0)


@dataclass
class Chunk:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    pts: float  # stream time of frames[0], seconds
    audio: np.ndarray  # int16 16 kHz mono samples of [pts, pts + T / fps): what the lips were made from
    fps: float
    index: int
    input_time: float  # time.time() when the chunk's input audio was cut off (glass-to-glass origin)

    @property
    def first_frame(self) -> int:
        """The stream's frame number of frames[0] (a 1 + 4k stream's first chunk starts at 3)."""
        return round(self.pts * self.fps)

    @property
    def end_frame(self) -> int:
        return self.first_frame + len(self.frames)


class ChunkSlot:
    """Latest-chunk slot between the worker and one consumer: holds at most one chunk.

    A new chunk replaces one the consumer has not taken yet (counted as dropped),
    so a slow consumer skips ahead instead of building up latency.
    """

    def __init__(self, on_drop: Callable[[], None] | None = None):
        self._chunk: Chunk | None = None
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.closed = False

    def put(self, chunk: Chunk) -> None:  # event-loop thread only
        if self._chunk is not None and self._on_drop:
            self._on_drop()
        self._chunk = chunk
        self._ready.set()

    def take_nowait(self) -> Chunk | None:
        chunk, self._chunk = self._chunk, None
        self._ready.clear()
        return chunk

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a chunk (or the close); True when one is there."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            pass
        return self._chunk is not None

    async def take(self) -> Chunk | None:
        """The next chunk, or None once the slot is closed."""
        while self._chunk is None and not self.closed:
            await self._ready.wait()
        return self.take_nowait()

    def close(self) -> None:
        self.closed = True
        self._ready.set()


class SpeechTurns:
    """A session's speaks in the order they were accepted, over its WebSocket or over HTTP: each
    waits for those before it to be queued (or refused) before its own speech is queued, from its
    acceptance on (server/speech.py). The socket's speaker handles its own one at a time, so a
    socket's speak posted behind an HTTP one waits for it, and one posted over HTTP while any is in
    hand is refused (429) rather than queued ahead of those accepted before it."""

    def __init__(self):
        self._turns: deque[asyncio.Event] = deque()  # the first one's event is set: its turn

    def take(self) -> asyncio.Event:
        """A turn after every speak accepted so far; give it back once the speak is done."""
        turn = asyncio.Event()
        self._turns.append(turn)
        if len(self._turns) == 1:
            turn.set()
        return turn

    def give_back(self, turn: asyncio.Event) -> None:
        """Done with (or dropped before) its turn; the next speak's turn comes. Idempotent."""
        if turn in self._turns:
            self._turns.remove(turn)
            if self._turns:
                self._turns[0].set()

    @property
    def busy(self) -> bool:
        return bool(self._turns)


class Session:
    MAX_DELAY = 1.0  # seconds; the delay grows no further (the stream skips ahead instead)
    SLACK_WINDOW = 16  # chunks (5 s at 0.32 s): late twice within it grows the delay, all early lowers it
    SLACK_KEEP = 0.02  # seconds of their smallest head start kept when it does
    REWIND_WAIT = SLACK_WINDOW  # chunks a lowering waits for a pause in the sound, then it is applied anyway

    def __init__(self, session_id: str, stream, loop: asyncio.AbstractEventLoop, max_audio_ahead_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):  # fmt: skip
        """clock: the seconds its playout clock is on (`base`, the due times the worker plans by: the
        worker's clock, `InferenceWorker(clock=)`), read by its tracks too; sleep: how its tracks
        wait on that clock. A test's clock moves only as the code runs (tests/test_server_clock.py):
        on the machine's, a loaded machine's late looks moved what was tested."""
        self.id = session_id
        self.clock, self.sleep = clock, sleep
        self.token = secrets.token_urlsafe(24)
        self.stream = stream  # streamgen.stream.StreamSession, touched only by its lane's worker thread
        self.lane = 0  # the worker's lane that runs everything of this stream (server/scheduler.py)
        self.loop = loop
        self.timeline = AudioTimeline(max_audio_ahead_s)
        self.width, self.height = stream.width, stream.height
        self.frames_per_chunk = stream.frames_per_chunk
        self.chunk_seconds = stream.chunk_seconds
        self.fps = self.frames_per_chunk / self.chunk_seconds
        self.lookahead_samples = round(stream.audio_lookahead_seconds * SAMPLE_RATE)
        self.created = clock()
        self.last_input = self.created
        self.transport: str | None = None  # "whep" or "websocket" once attached
        self.request_key: str | None = None  # its POST's Streamgen-Request-Key (SessionRegistry.requests)
        self.trickle = None  # WHEP: the peer connection's trickle ICE (server/trickle.py)
        self.streaming = False
        self.attached = False  # it has streamed: on its lane's schedule, even once the worker failed it
        self.closed = False
        self.close_reason = ""
        self.slots: list[ChunkSlot] = []
        self.first_chunk: Chunk | None = None  # generated at creation, played when a transport attaches
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.teardown: asyncio.Future | None = None  # set by SessionRegistry.close
        self.preroll: asyncio.Future | None = None  # the first chunk, started at creation
        self.fail_handler: Callable[[Session, str], None] | None = None  # set by the registry
        self.caption_wanted: str | None = None  # the latest caption asked for (server/speech.py)
        self.caption_job = None  # the worker job that will apply it, while it waits in the queue
        self.speech_turns = SpeechTurns()  # its speaks accepted and not queued yet (server/speech.py)
        # clock (see module docstring). The event loop moves it (base, delay) and the worker moves the
        # due times (chunk_index, next_due, generate_sooner), each from what the other writes: every
        # change to these fields is made under clock_lock, or one made between the other thread's
        # read and write is lost (a next chunk due early, before its audio; a grown delay undone)
        self.clock_lock = threading.Lock()
        self.delay = 0.2
        self.start_delay = 0.2  # the delay it attached with: the floor that a grown delay returns to
        self.base = 0.0
        self.rewound = 0.0  # seconds the clock has moved back in all (the video track skips as many frames)
        self.rewind_pending = 0.0  # seconds the delay is to come down by, in a pause of the sound (`rewind`)
        self.rewinds_in_pauses = False  # a WebRTC audio track plays: it applies rewind_pending
        self._pending_chunks = 0  # chunks published while rewind_pending waited for a pause
        self._slack: list[float] = []  # head start of the recent chunks: play time - arrival, seconds
        self._waited = 0.0  # seconds the clock moved while the video waited for the next chunk
        self._published = -1  # index of the last chunk handed to the transports
        self._last_late: int | None = None  # index of the last chunk that came late
        self.on_late: Callable[[], None] | None = None  # a chunk arrived after its play time (metrics)
        self.chunk_index = 0  # next chunk the worker generates
        self.next_due = float("inf")
        self.generated_until = 0  # samples of the timeline covered by generated chunks

    # --- transport side (event loop) ----------------------------------------------------------
    def attach(self, transport: str, delay: float, first_delay: float) -> None:
        """Start the clock. Every chunk is generated `delay` before it plays. The first chunk
        was started when the session was created (silence: no input can have arrived), so
        the stream starts as soon as that one is ready: now, or `first_delay` from now."""
        self.transport, self.attached = transport, True
        now = self.clock()
        self.reschedule(now + (0.0 if self.first_chunk is not None else min(first_delay, delay)), delay)
        self.streaming = True
        self.touch()

    def reschedule(self, base: float, delay: float) -> None:
        """Before streaming: play chunk 0 at `base` and generate every chunk `delay` ahead."""
        with self.clock_lock:
            self.base, self.delay = base, delay
            self.start_delay = delay
            self.next_due = base - delay + self.chunk_index * self.chunk_seconds

    def hold_back(self, delay: float) -> None:
        """Play later from now on by as much as the delay is shorter than `delay`, generating on the
        same schedule: a longer delay (and the floor it comes back down to, until its group
        shrinks), the picture held and the audio silent for that long once. The shortfall is
        read under the lock: read before it, a delay the worker grew meanwhile (`generate_sooner`)
        went into the floor, and never came back down (test_server_clock_threads). A delay longer
        already is kept, its floor raised all the same: left, a delay grown by late chunks came
        down below what the batch needs (test_server_alignment)."""
        with self.clock_lock:
            seconds = delay - self.delay
            if seconds > 0:
                self.base += seconds
                self.delay += seconds
            self.start_delay = max(self.start_delay, delay)

    def generate_sooner(self, seconds: float) -> None:
        """Generate every chunk `seconds` sooner from now on, playing as before: a longer delay
        (it comes back down as a grown one does, `_lower_delay_when_early`, and stays on the
        schedule it moved to). The worker does this to keep a session in a batch its clock
        moved it out of (server/batching.py, `pull_into_batch`). The delay grows no further than
        MAX_DELAY: what would go past it plays that much sooner (the tracks skip it, as when a
        grown delay comes down). Left on its own schedule instead, a session whose delay was near
        its most ran a batch of its own every period beside its group's (test_server_alignment)."""
        with self.clock_lock:
            grown = min(self.delay + seconds, max(self.delay, self.MAX_DELAY))
            skipped = self.delay + seconds - grown
            self.delay = grown
            self.next_due -= seconds
            self.base -= skipped
            self.rewound += skipped

    def due_and_delay(self) -> tuple[float, float]:
        """When the next chunk falls due and how long before its play time, read together: the
        loop grows a delay and moves the due time sooner by as much, and a due time read before
        and a delay read after put the play time that much later than it is (the worker held a
        chunk past its play time for a batch, test_server_clock_threads)."""
        with self.clock_lock:
            return self.next_due, self.delay

    def publish_first_chunk(self) -> None:
        """Hand the pre-generated first chunk to the transport once both exist."""
        if self.first_chunk is not None and self.streaming and not self.closed:
            chunk, self.first_chunk = self.first_chunk, None
            self.publish(chunk)

    def touch(self) -> None:
        self.last_input = self.clock()

    def add_slot(self, on_drop=None) -> ChunkSlot:
        slot = ChunkSlot(on_drop)
        self.slots.append(slot)
        return slot

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    def move_clock(self, seconds: float) -> None:
        """The stream plays `seconds` later than planned: move the clock, never queue up."""
        if seconds > 0:
            with self.clock_lock:
                self.base += seconds
                self.next_due += seconds

    def late_by(self, seconds: float, chunk_index: int) -> None:
        """The video repeated `seconds` of picture waiting for chunk `chunk_index`: move the clock.
        The chunk's lateness is weighed when it arrives (`publish`); a wait that ends after it
        arrived (the video was sleeping out its repeated frame) is already in it."""
        self.move_clock(seconds)
        if chunk_index > self._published:
            self._waited += max(0.0, seconds)

    def publish(self, chunk: Chunk) -> None:  # event-loop thread
        if self.closed:  # generated while it closed: into its closed slots, a WebSocket's sender sent
            return  # it after the session's end, and it was counted late or dropped for a session gone
        self._published = max(self._published, chunk.index)
        waiting = self.rewind_pending > 0  # (one this chunk sets waits from the next chunk on)
        if chunk.index > 0:  # the first chunk plays as soon as it is ready, by design
            head_start = self.base + chunk.pts - self.clock()
            lateness, self._waited = self._waited + max(0.0, -head_start), 0.0
            if lateness > 0:
                self._chunk_was_late(chunk.index, lateness)
            else:
                self._lower_delay_when_early(head_start)
        else:  # ready after its play time (its lane busy, the machine loaded): the clock moves to it,
            # as for a late chunk the video waited for. Left, the video, which starts at the present,
            # skipped it and every chunk after it until generation caught up: where a chunk took
            # longer than it plays, never (no frame, and the session closed as idle)
            self.move_clock(self.clock() - (self.base + chunk.pts))
        if waiting and self.rewind_pending > 0:
            self._pending_chunks += 1
            if self._pending_chunks >= self.REWIND_WAIT:  # continuous sound: no pause came
                self.rewind(self.rewind_pending)
        for slot in self.slots:
            slot.put(chunk)

    def _chunk_was_late(self, index: int, lateness: float) -> None:
        """A chunk arrived `lateness` s after its play time. Twice within SLACK_WINDOW chunks is the
        load, not a hiccup: play that much later from now on (up to MAX_DELAY) while generation
        keeps its pace, so that the next chunks arrive in time."""
        if self.on_late is not None:
            self.on_late()
        self._slack.clear()
        # it came late with the delay not lowered yet: lowered as planned, it would be later still
        self.rewind_pending, self._pending_chunks = 0.0, 0
        recurring = self._last_late is not None and index - self._last_late <= self.SLACK_WINDOW
        self._last_late = index
        if recurring:
            with self.clock_lock:
                grow = min(lateness, max(0.0, self.MAX_DELAY - self.delay))
                self.delay += grow
                self.next_due -= grow  # base - delay + k * chunk_seconds: the worker sees it when it next wakes
        log.debug("session %s: chunk %d came %.0f ms late; playout delay %.0f ms",
                  self.id, index, 1000 * lateness, 1000 * self.delay)  # fmt: skip

    def _lower_delay_when_early(self, head_start: float) -> None:
        """Bring a grown delay back down once every chunk for SLACK_WINDOW chunks had time to spare:
        by their smallest head start beyond SLACK_KEEP. Where a WebRTC audio track plays, the
        lowering waits for a pause in the sound (`rewind_pending`: the tracks skip what the clock
        jumps over, and skipped at once, that was up to the whole spare of the user's words);
        elsewhere (a WebSocket client plays by pts) it is applied at once."""
        # the head start it will have once what is pending is applied: counted twice, the delay
        # came down twice for one spare, and the chunks came late
        self._slack.append(head_start - self.rewind_pending)
        if len(self._slack) < self.SLACK_WINDOW:
            return
        spare = min(min(self._slack) - self.SLACK_KEEP, self.delay - self.rewind_pending - self.start_delay)
        self._slack.clear()
        step = round(spare, 3)
        if step >= 0.005:
            log.debug("session %s: playout delay %.0f -> %.0f ms%s", self.id, 1000 * self.delay,
                      1000 * (self.delay - self.rewind_pending - step),
                      " in the next pause" if self.rewinds_in_pauses else "")  # fmt: skip
            self.rewind_pending += step
            if not self.rewinds_in_pauses:
                self.rewind(self.rewind_pending)

    def rewind(self, seconds: float) -> float:  # event-loop thread
        """Apply up to `seconds` of rewind_pending now: play that much sooner from now on, the delay
        that much shorter (never below start_delay, which hold_back may have raised since), while
        generation keeps its pace (next_due stays). The tracks skip what the clock jumps over
        (`rewound`). Returns the seconds applied."""
        with self.clock_lock:  # (the worker moves base and `rewound` too, `generate_sooner`)
            self.rewind_pending = min(self.rewind_pending, max(0.0, self.delay - self.start_delay))
            seconds = min(seconds, self.rewind_pending)
            self.delay -= seconds
            self.base -= seconds  # next_due (base - delay + k * chunk_seconds) stays
            self.rewound += seconds
            self.rewind_pending -= seconds
        if self.rewind_pending < 1e-9:  # (what float subtraction leaves of it)
            self.rewind_pending, self._pending_chunks = 0.0, 0
        return seconds

    def fail_from_worker(self, reason: str) -> None:  # event-loop thread
        if self.fail_handler is not None:
            self.fail_handler(self, reason)

    async def run_closers(self) -> None:
        for slot in self.slots:
            slot.close()
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                await closer()
            except Exception as e:  # a transport that fails to close must not keep the others open
                log.warning("session %s: closing transport failed: %r", self.id, e)

    # --- worker side --------------------------------------------------------------------------
    def generate(self, stamp_frames: bool) -> Chunk:
        """Generate the next chunk on the worker thread (the only thread that touches the model)."""
        input_time = self.take_input()
        frames, pts = self.stream.next_chunk()
        return self.finish_chunk(frames, pts, input_time, stamp_frames)

    def take_input(self) -> float:
        """Hand the chunk's audio (up to its cut-off plus look-ahead) to the stream; returns the cut-off time."""
        chunk_samples = round(self.chunk_seconds * SAMPLE_RATE)
        input_time = time.time()
        pcm = self.timeline.take_until((self.chunk_index + 1) * chunk_samples + self.lookahead_samples)
        self.stream.push_audio(pcm)
        return input_time

    def finish_chunk(self, frames: np.ndarray, pts: float, input_time: float, stamp_frames: bool) -> Chunk:
        """Pair the generated frames with their audio and move the playout clock on."""
        k = self.chunk_index
        start = round(pts * SAMPLE_RATE)
        samples = round(len(frames) * SAMPLE_RATE / self.fps)  # the frames' time, whatever its length
        if stamp_frames:  # benchmark: a 20 ms tone at the chunk's start marks its audio for A/V offset
            self.timeline.overwrite(start, MARKER_TONE)
        audio = self.timeline.read(start, samples)
        self.generated_until = start + samples
        with self.clock_lock:
            self.chunk_index = k + 1
            self.next_due = self.base - self.delay + self.chunk_index * self.chunk_seconds
        if stamp_frames:
            frames = frames.copy()
            stamp_picture(frames, input_time)
        pcm16 = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        return Chunk(frames, pts, pcm16, self.fps, k, input_time)


# --- picture time stamps and audio markers (benchmark) ------------------------------------------
STAMP_BITS = 32
MARKER_TONE = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(320) / SAMPLE_RATE)).astype(np.float32)


def stamp_picture(frames: np.ndarray, wall_time: float) -> None:
    """Write the low 32 bits of `wall_time` in ms as black/white blocks across the top of each frame."""
    value = int(wall_time * 1000) & 0xFFFFFFFF
    w = frames.shape[2]
    block = w // 16
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, 16)
        on = (value >> (STAMP_BITS - 1 - bit)) & 1
        frames[:, row * block : (row + 1) * block, col * block : (col + 1) * block] = 255 if on else 0


def read_stamp(frame: np.ndarray, now: float) -> float:
    """The wall time written by `stamp_picture` (the high bits taken from `now`)."""
    w = frame.shape[1]
    block = w // 16
    value = 0
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, 16)
        patch = frame[row * block + block // 4 : (row + 1) * block - block // 4,
                      col * block + block // 4 : (col + 1) * block - block // 4]  # fmt: skip
        value = (value << 1) | int(patch.mean() > 127)
    now_ms = int(now * 1000)
    ms = (now_ms & ~0xFFFFFFFF) | value
    if ms > now_ms + 2**31:
        ms -= 2**32
    return ms / 1000.0
