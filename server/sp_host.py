"""`streamgen serve --sp N`: the model sharded over N processes (sequence parallelism).

`serve --sp N` restarts itself under torchrun (`streamgen.parallel.launch`).
Every process loads the model and shards it the same way (the DiT's tokens
by Ulysses/Ring, the VAE decode by bands); rank 0 also runs the server. A
parallel forward needs every process to make the same calls in the same
order, so the followers replay rank 0's model operations:

    inference worker (rank 0)                     followers (ranks 1..N-1)
    SequenceParallelHost.call(op, args) --------> conn.recv() -> ModelOps.handle
        -> ModelOps.handle(op, args)                    (collectives meet here)
        <- result (RemoteStream, as with --model-process)

The operations are ModelHost's (create, chunk, write_pending, caption, close,
...), so the registry and scheduler use `RemoteStream` exactly as for
`--model-process`. A chunk's clean re-encode is its own operation, which the
scheduler calls once it has published the chunk's frames, so the frames do not
wait for it (a model child process runs it after replying instead).
Commands travel on plain local connections, not on the process group: a
follower waits for its next command for as long as the server is idle, which
a collective's timeout would not allow, and it sees EOF when rank 0 is gone.
Stream seeds are drawn on rank 0 before a command is sent, so every replica
draws the same noise.

Each follower answers every command with its outcome. Errors a client causes
(a bad reference, an unknown stream) are raised on every process alike, before
any collective; rank 0 reports them to the client and everyone carries on. Any
other failure (out of memory on one GPU, say) leaves the ranks out of step, so
it stops the service instead of risking a hang or wrong frames: a follower
that fails exits, so torchrun ends the whole group, and rank 0 marks the host
down when its own operation fails or a follower's outcome differs from its
own; from then on every call raises `HostDown` and /healthz answers 503, for
the supervisor to restart the service. When rank 0's own operation fails it
does not wait for the followers' outcomes: they may be inside a collective
rank 0 never reached, which only the group's timeout would end. A stop is
not a failure: torchrun passes a SIGINT/SIGTERM to every rank at once, and a
follower rank 0 finds gone once the server is stopping (or is told so within
`STOP_SIGNAL_WAIT`) ended with the stop
(an INFO line, `HostStopped`; the sessions close as "server shutting down").
"""

from __future__ import annotations

import gc
import logging
import random
import secrets
import threading
import time
from functools import partial
from multiprocessing.connection import Client, Listener
from typing import NoReturn

import torch
import torch.distributed as dist

from streamgen.parallel.torchrun import another_rank_failed, stopped_by_another_rank
from streamgen.session_limits import SEED_END

from .model_host import CLIENT_ERRORS, HostDown, HostStopped, ModelOps, freeze_loaded_heap, load_error_line
from .stop_event import StopsWithTheServer
from .watchdog import DeadlineWatchdog

log = logging.getLogger("streamgen.server")

# seconds `SequenceParallelHost.stop` waits for an operation still running (after the server's
# worker has waited 10 s for it); past that, the operation lets go of the model when it ends
STOP_WAIT = 5.0
# seconds a follower found gone waits for the server's stop to be known before it is a failure: a
# Ctrl-C reaches every rank at once, and a follower that ended at once was found gone by rank 0's
# worker thread before rank 0's main thread, on a loaded machine, had run its signal handler
# (`stopping` unset: "cannot go on together", CRITICAL, at a plain Ctrl-C of `serve --sp 2`)
STOP_SIGNAL_WAIT = 2.0


def load_sharded(model_name: str, device: str, threads: int | None, sp: int, height: int | None,
                 decode_dtype: str = "auto"):  # fmt: skip
    """The same on every process, in the same order (the mesh and groups are collective):
    load the model, shard the DiT, decode in bands (when the latent height divides) in `decode_dtype`."""
    from streamgen.models import load_model
    from streamgen.parallel.apply import apply_sequence_parallel
    from streamgen.parallel.launch import init_process_group, init_sequence_parallel
    from streamgen.parallel.vae import parallel_decoder
    from streamgen.precision import autoencoder_dtype

    if threads:
        torch.set_num_threads(threads)
    device = init_process_group(device)  # this rank's own GPU for a CUDA device
    model = load_model(model_name, device=device)
    mesh, mode = init_sequence_parallel(sp, model.cfg.num_heads)
    apply_sequence_parallel(model.dit, mesh, mode)
    latent_height, _ = model.vae.latent_hw(height or model.height, height or model.width)
    dtype = autoencoder_dtype(decode_dtype, model.vae, device)
    model.vae = parallel_decoder(model.session_vae(dtype), latent_height)  # sessions decode as set here
    log.info("rank %d of %d: %s sharded (%s)", dist.get_rank(), sp, model_name, mode)
    return model, device


class ModelNotLoaded(Exception):
    """A follower rank could not load the model: `serve` ends it with the line rank 0 gives for
    the same failure (every rank loads the same files), which the launcher prints once."""


class SequenceParallelHost(StopsWithTheServer):
    """ModelHost's interface, on rank 0: each operation is sent to the followers, then run here."""

    # a chunk's clean re-encode runs collectives too, so it is one more operation in step
    # ("write_pending", after the scheduler has published the chunk's frames), not work a rank
    # may do on its own after replying
    writes_chunks_itself = False

    def __init__(self, ops: ModelOps, followers: list, stopping: threading.Event | None = None):
        self.ops = ops
        self.followers = followers  # one connection per follower rank, in rank order
        # set once the server is stopping (a SIGINT/SIGTERM reached it; `stop` sets it too): torchrun
        # passed the signal to every rank, so a follower found gone from then on ended with the stop (`_gone`)
        self.share_the_stop(stopping)
        self.down: str | None = None  # why the ranks can run nothing more together
        # down by the server's stop (a follower found gone at it, or `stop`), not by a failure: every
        # operation from then on raises HostStopped, as the one that found it did (`call`)
        self._stopped = False
        # a follower found gone, and the host waits to know whether the stop took it (`_gone`): down
        # already, but the registry's limits leave its sessions to what it finds
        self.awaiting_stop = False
        self._calling = threading.Lock()  # held by the operation running: `stop` waits for it
        # guards the hand-over below: a stop that gives up waiting and a call that ends meanwhile
        # both look at these under it, so exactly one of them lets go of the model
        self._handover = threading.Lock()
        self._running = False  # an operation is under way (set inside `_calling`)
        self._stop_gave_up = False  # the stop left the letting go to the operation running
        # seconds the followers may take to answer an operation before the host is down: a follower
        # alive but hung (a driver hang, a deadlock) held the worker in `recv`, and every session with
        # it, for good; None while the model warms up (a first chunk may take minutes): the server
        # sets it once it is ready (ServerConfig.model_timeout_s, --model-timeout)
        self.answer_timeout: float | None = None
        self._overdue = False  # the operation running ran past answer_timeout (`_past_the_timeout`)
        self._watchdog = DeadlineWatchdog("streamgen-sp-watchdog")  # (its thread: from the first bounded operation)

    @classmethod
    def start(cls, model: str, device: str, threads: int | None, sp: int, height: int | None = None,
              decode_dtype: str = "auto", stopping: threading.Event | None = None):  # fmt: skip
        """Load and shard the model (every rank does the same), then connect to the followers."""
        loaded, device = load_sharded(model, device, threads, sp, height, decode_dtype)
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        dist.broadcast_object_list([listener.address, authkey], src=0)
        followers = []
        try:
            for _ in range(sp - 1):
                followers.append(listener.accept())
        except BaseException:  # (a follower refused, a Ctrl-C: the followers see EOF and end)
            for conn in followers:
                conn.close()
            raise
        finally:  # (an accept that raised left it bound for as long as the process lived)
            listener.close()
        return cls(ModelOps(loaded, device, None), followers, stopping)

    def call(self, op: str, *args):
        with self._calling:
            with self._handover:
                if self.down:  # (HostDown: the worker logged an ERROR and ended its sessions as host_down)
                    raise (HostStopped if self._stopped else HostDown)(self.down)
                self._running = True
            # rank 0 itself waits in the operation's collectives on a follower that hangs before them:
            # the bound on the followers' answers (`_run`) never came into play, and /healthz said ok
            # for as long as it hung. Timed from here, the host is down once it runs past the limit
            bound = None
            if self.answer_timeout is not None:
                deadline = time.monotonic() + self.answer_timeout
                bound = self._watchdog.arm(deadline, partial(self._past_the_timeout, op))
            try:
                result = self._run(op, args)
            finally:
                if bound is not None:
                    self._watchdog.disarm(bound)
                with self._handover:  # (the watchdog looks at `_running` under it: it ran before, or not at all)
                    self._running = False
                    let_go, overdue = self._stop_gave_up, self._overdue
                if let_go:  # the stop gave up waiting for this operation
                    self._let_go_after(op)
        if overdue:  # it ended after the host went down: its sessions are ended already
            raise HostDown(self.down)
        return result

    def _past_the_timeout(self, op: str) -> None:
        """The watchdog's (on its thread): the operation under way has run for answer_timeout. The
        ranks cannot be killed from here, as a model process is: the host is down, which /healthz's
        503 says, for the supervisor to restart the service (and torchrun's group with it)."""
        with self._handover:
            # (ended, or the stop's to end; a disarmed bound never runs, so this is the operation under way)
            if not self._running or self.down or self.stop_begun():
                return
            self._overdue = True
            self.down = (f"the sequence-parallel ranks cannot go on together (they gave no answer to {op!r} "
                         f"in {self.answer_timeout:g} s: a rank is stuck)")  # fmt: skip
        log.critical("%s; no more model operations will run", self.down)

    def _let_go_after(self, op: str) -> None:
        # logged, not raised: the caller waits for the operation's own result or error
        try:
            self._let_go()
        except Exception:
            log.exception("letting go of the model after %s (the stop had left it to it) failed", op)

    def _run(self, op: str, args: tuple):
        if op == "create" and args[3] is None:  # seed: one draw, shared by every replica
            args = (*args[:3], random.randrange(SEED_END), *args[4:])
        answer_by = None if self.answer_timeout is None else time.monotonic() + self.answer_timeout
        try:
            for conn in self.followers:
                conn.send((op, args))
        except OSError:
            self._gone(f"{op}: a follower rank is gone")
        error = None
        try:
            result = self.ops.handle(op, args)
        except Exception as e:
            error = e
        mine = outcome(error)
        if error is not None and another_rank_failed(error):
            # (gloo's words for it, "Connection reset by peer [...] GLHF! 🏖️", went to /healthz and
            # the sessions' close reasons as rank 0's own failure)
            self._gone(f"{op}: a follower rank is gone")
        if error is not None and mine not in CLIENT_ERRORS:
            if self.stop_begun():
                # a follower ended with the stop, and the collective said so in words PEER_GONE does not
                # list (gloo's "Socket closed" for a pair already shut, say): it was said CRITICAL
                self._gone(f"{op} failed on rank 0 ({load_error_line(error)})")
            # at once: the followers may wait in a collective this rank never reached, and would
            # answer only when the group's timeout ends it (30 minutes on gloo)
            self._fail(f"{op} failed on rank 0: {type(error).__name__}: {error}")
        for rank, conn in enumerate(self.followers, start=1):
            if answer_by is not None and not conn.poll(max(0.0, answer_by - time.monotonic())):
                # (it cannot be killed from here, as a model process is: torchrun's group ends when
                # the supervisor restarts the service, which /healthz's 503 asks for)
                self._fail(f"rank {rank} gave no answer to {op!r} in {self.answer_timeout:g} s (stuck)")
            try:
                theirs = conn.recv()
            except (EOFError, OSError):
                self._gone(f"{op}: rank {rank} is gone")
            if theirs != mine:  # (`_gone`: as the server stops, a collective of theirs met a rank that had ended)
                self._gone(f"{op}: rank 0 {describe(mine)}, rank {rank} {describe(theirs)}")
        if error is None:
            return result
        raise error

    def _gone(self, reason: str) -> NoReturn:
        """A follower rank is gone, or an operation failed as one would: a failure, unless the server
        is stopping (then it ended with the stop, and the operation, the closing of a session say,
        ends here without one, in whatever words its collective failed)."""
        # down from the loss on: while it waited for the stop, /healthz and /readyz said ok and
        # admission took creates for a host that could run nothing more
        with self._handover:
            self.down, self.awaiting_stop = f"the sequence-parallel host lost a rank ({reason})", True
        if not self.stopping.wait(STOP_SIGNAL_WAIT):  # (`stop_begun`, waited for)
            self._fail(reason)
        # (it said "the sequence-parallel ranks cannot go on together", CRITICAL, at every Ctrl-C). Not
        # "ended with the stop": a follower killed alone has torchrun stop rank 0 too, which may come
        # first; the launcher's last line names the rank that failed
        with self._handover:
            self.down, self._stopped = "the sequence-parallel host has stopped", True
            self.awaiting_stop = False  # (after: its reason is in place)
        log.info("%s, as the server stops (torchrun stops every rank)", reason)
        raise HostStopped(f"{self.down} ({reason}, as the server stops)")

    def _fail(self, reason: str) -> NoReturn:
        self.down = f"the sequence-parallel ranks cannot go on together ({reason})"
        self.awaiting_stop = False  # (after: the limits close its sessions with the failure's reason)
        log.critical("%s; no more model operations will run", self.down)
        raise HostDown(self.down)

    def stop(self) -> None:
        """End the followers and let go of the model and the process group: now, or, when an
        operation is still running after STOP_WAIT seconds, as that operation ends (the server's
        worker gave up waiting for it). Let go of under it, a chunk met closed streams and a
        destroyed group (test_server_sp). Every call after this raises HostStopped (HostDown where a
        failure had taken the host down before). The stop has begun from here (`stop_begun`), whoever
        calls it: an operation that waits to know whether the stop took a follower it found gone ends
        with it (it waited for the server's stop only, and failed, CRITICAL, as the host stopped)."""
        self.stopping.set()
        self._watchdog.stop()  # (an operation still running is the stop's from here: not a failure)
        with self._handover:  # any call from here on is refused (as the stop, unless down by a failure)
            if not self.down:
                self.down, self._stopped = "the sequence-parallel host has stopped", True
        if not self._calling.acquire(timeout=STOP_WAIT):
            with self._handover:
                if self._running:  # it lets go when it ends (`call`)
                    self._stop_gave_up = True
                    # the server's worker threads are daemons: should the server exit before the
                    # operation ends, nothing here runs again; the followers end as they find rank 0
                    # gone (EOF on their connection, or a collective that fails)
                    log.warning("a model operation is still running after %.0f s: the sequence-parallel host "
                                "lets go of the model when it ends; if the server exits first, the follower "
                                "ranks end when they find rank 0 gone", STOP_WAIT)  # fmt: skip
                    return
            self._calling.acquire()  # it ended as the wait did, and is releasing the lock
        try:
            self._let_go()
        finally:
            self._calling.release()

    def _let_go(self) -> None:  # holding `_calling`
        if self.ops is None:  # stopped already
            return
        for conn in self.followers:
            try:
                conn.send(("exit", ()))
                conn.close()
            except OSError:
                pass  # that follower is already gone
        self.followers = []
        try:
            self.ops.close_all()
        finally:  # (a close that raised, a sticky CUDA error say, left the group to the shutdown)
            if dist.is_initialized():
                dist.destroy_process_group()
            # the server keeps this host until the interpreter exits, and the model's parallel layers
            # hold the group (in reference cycles): let the model go and collect now, so the group's
            # threads end here rather than in the shutdown, where one still freeing a collective's
            # tensors aborts the process (docs/parallel.md); the server unfreezes its heap first
            self.ops = None
            gc.collect()


def follow(model: str, device: str, threads: int | None, sp: int, height: int | None = None,
           decode_dtype: str = "auto") -> int:  # fmt: skip
    """Ranks 1..N-1: replay rank 0's operations until it says exit or goes away."""
    try:
        loaded, device = load_sharded(model, device, threads, sp, height, decode_dtype)
    except Exception as e:  # (a traceback per follower, and rank 0's one line stopped by torchrun)
        log.debug("the model did not load", exc_info=True)  # rank 0 logs its own at error
        raise ModelNotLoaded(load_error_line(e)) from None
    ops = ModelOps(loaded, device, None)
    freeze_loaded_heap()  # (rank 0 is the server, which freezes its heap when ready)
    box = [None, None]
    dist.broadcast_object_list(box, src=0)
    address, authkey = box
    try:
        with Client(address, authkey=authkey) as conn:
            return replay(conn, ops, dist.get_rank())
    finally:  # (a Ctrl-C too: it left both to the shutdown, which printed triton's 600 "leaked" lines)
        try:
            ops.close_all()
        finally:  # (a close that raised, a sticky CUDA error say, left the group to the shutdown)
            dist.destroy_process_group()
            # the model's parallel layers hold the group, and the frozen heap the model: let both go
            # now, so the group's threads end here, not in the interpreter's shutdown, where one still
            # freeing a collective's tensors aborts the process (docs/parallel.md)
            del ops, loaded
            gc.unfreeze()
            gc.collect()


def replay(conn, ops: ModelOps, rank: int) -> int:
    """Run each command from rank 0 and answer with its outcome; the exit code (1: out of step)."""
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # rank 0 is gone
            return 0
        if op == "exit":
            return 0
        error = None
        try:
            ops.handle(op, args)
        except Exception as e:
            error = e
        try:
            conn.send(outcome(error))
        except OSError:
            return 0
        if error is not None and outcome(error) not in CLIENT_ERRORS:  # exiting makes torchrun end the group
            if another_rank_failed(error):  # (rank 0 killed: gloo's traceback, CRITICAL, and exit 1 here,
                # which the launcher could name as the rank that failed)
                return stopped_by_another_rank("serve", rank)
            log.critical("rank %d: %s failed; leaving the group", rank, op, exc_info=error)
            return 1
        if error is not None:  # a client's error: rank 0 raised the same and reports it
            log.debug("rank %d: %s refused: %s", rank, op, error)


def outcome(error: Exception | None) -> str | None:
    """What a rank reports after an operation: None, or the error's type name."""
    return None if error is None else type(error).__name__


def describe(outcome: str | None) -> str:
    return "succeeded" if outcome is None else f"raised {outcome}"
