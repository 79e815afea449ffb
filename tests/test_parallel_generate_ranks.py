"""`generate --sp N` as one of its ranks sees it: how a rank ends when another rank, or its launcher,
ends first. In this process, as rank 0 of two with no process group: the collectives' failures are
raised where a chunk is made."""

from __future__ import annotations

import contextlib

import pytest

from streamgen.parallel.torchrun import ANOTHER_RANK_FAILED

# what gloo raises in a collective whose peer process has ended (a rank killed mid-run)
PEER_GONE = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:25235: Connection reset by peer. This is typically caused by a remote worker hanging "
    "or bugs in the application. Check the logs of the remote worker before reporting an error. GLHF!"
)
RANK_0_OF_2 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}


@pytest.fixture
def rank_0(monkeypatch):
    """This process as rank 0 of `generate --sp 2` under the launcher, the group left out."""
    from streamgen.commands import generate
    from streamgen.parallel import launch

    for name, value in RANK_0_OF_2.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr(launch, "init_process_group", lambda device="cpu": device)
    monkeypatch.setattr(generate, "_apply_sequence_parallel", lambda session, sp: True)


def _argv(tmp_path):
    return ["generate", "--model", "debug", "--sp", "2", "--quiet", "--out", str(tmp_path / "a.mp4")]


def test_a_rank_whose_peer_ended_mid_run_says_so_in_one_line(rank_0, monkeypatch, tmp_path, capsys):
    """Rank 1 killed while the ranks generated: rank 0 printed gloo's traceback (40 lines, ending
    "GLHF") below the launcher's "rank 1 failed", and left its unfinished MP4 to the exit."""
    from streamgen import cli
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self, *args, **kwargs):
        if chunks:
            raise RuntimeError(PEER_GONE)
        chunks.append(1)
        return made(self, *args, **kwargs)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    assert cli.main(_argv(tmp_path)) == ANOTHER_RANK_FAILED
    err = capsys.readouterr().err
    assert err == "streamgen generate: rank 0 stopped: another rank failed (see its error above)\n", err
    assert list(tmp_path.iterdir()) == []  # the unfinished MP4 removed


def test_a_rank_whose_peer_ended_while_it_started_says_so_in_one_line(rank_0, monkeypatch, tmp_path, capsys):
    """A peer gone while the session started (its reference encoded): gloo's message was the
    "usage error" (exit code 2), so this rank could be named as the failed one."""
    from streamgen import cli
    from streamgen.stream import StreamSession

    def start(self, *args, **kwargs):
        raise RuntimeError(PEER_GONE)

    monkeypatch.setattr(StreamSession, "start", start)
    assert cli.main(_argv(tmp_path)) == ANOTHER_RANK_FAILED
    assert "rank 0 stopped: another rank failed" in capsys.readouterr().err


def test_other_runtime_errors_are_not_taken_for_a_peer_gone(rank_0, monkeypatch, tmp_path):
    from streamgen import cli
    from streamgen.stream import StreamSession

    def next_chunk(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(_argv(tmp_path))


def test_a_rank_stopped_by_sigterm_removes_its_unfinished_file(rank_0, monkeypatch, tmp_path):
    """torchrun stops its ranks by SIGTERM (the launcher stopped by `kill` or `timeout`, or another
    rank failed): rank 0 died of it where it stood, leaving its hidden temp file beside --out."""
    import signal

    from streamgen import cli
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self, *args, **kwargs):
        if chunks:  # the writer has its file: SIGTERM, as its handler takes it (not this test's process)
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), f"SIGTERM would end the rank where it stands ({handler!r})"
            handler(signal.SIGTERM, None)
        chunks.append(1)
        return made(self, *args, **kwargs)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    with pytest.raises(SystemExit) as ended:
        cli.main(_argv(tmp_path))
    assert ended.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # (as it was)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("rank_of_the_launcher", [True, False])
def test_a_stopped_rank_leaves_the_word_to_its_launcher(stop, rank_of_the_launcher, monkeypatch, capsys):
    """A terminal's Ctrl-C reaches every rank: each printed "interrupted" (as SIGTERM's "terminated")
    above the launcher's one line that says it for all of them, `--sp 8` nine lines."""
    import os
    import signal

    from streamgen import cli
    from streamgen.commands import generate
    from streamgen.parallel import torchrun

    installed = {}  # the handlers, kept from this test's process

    def run(args):
        if stop == "SIGINT":
            raise KeyboardInterrupt
        cli.terminate_as_exit()
        installed[signal.SIGTERM](signal.SIGTERM, None)

    monkeypatch.setattr(generate, "run", run)
    monkeypatch.setattr(torchrun, "end_with_the_launcher", lambda: None)  # (not this test's process)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.setdefault(signum, handler))
    launcher = str(os.getppid()) if rank_of_the_launcher else str(os.getppid() + 1)
    monkeypatch.setenv(torchrun.LAUNCHER_ENV, launcher)
    with pytest.raises(SystemExit) if stop == "SIGTERM" else contextlib.nullcontext():
        cli.main(["generate"])
    said = "interrupted" if stop == "SIGINT" else "terminated"
    assert capsys.readouterr().err == ("" if rank_of_the_launcher else f"{said}\n")


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False), (None, True)])
def test_only_the_first_rank_says_the_model_has_no_trained_weights(rank, said, monkeypatch, caplog):
    """Every rank of `--sp N` loads the model: a stand-in's warning came N times, word for word."""
    from streamgen.models import load_model

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    with caplog.at_level("WARNING", logger="streamgen.models"):
        load_model("debug")
    assert ("no trained weights for 'debug'" in caplog.text) == said, caplog.text


def _generate_then_its_threads(rank: int, port: int, root: str, fails: str | None) -> None:
    """`generate --sp 2` as rank `rank` of 2 runs it (its environment, one thread), then how many
    gloo threads this process still runs, counted as the command returns (no collection first).
    Where it `fails` (both ranks' session raising once it has started, or after its first chunk),
    an error raised is held while they are counted, as the interpreter holds an error it printed
    until its shutdown."""
    import os

    import torch
    from spawn_helpers import gloo_threads

    from streamgen.cli import main
    from streamgen.stream import StreamSession

    if fails:
        method = "start" if fails == "starting" else "next_chunk"
        made = getattr(StreamSession, method)

        def then_a_bug(self, *args, **kwargs):
            made(self, *args, **kwargs)  # (the groups' collectives have run)
            raise RuntimeError("a bug")

        setattr(StreamSession, method, then_a_bug)

    from rendezvous import at_the_held_store

    os.environ.update(**at_the_held_store(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    argv = ["generate", "--model", "debug", "--sp", "2", "--device", "cpu", "--quiet",
            "--audio", f"{root}/speech.wav", "--reference", f"{root}/face.png", "--out", f"{root}/a.mp4"]  # fmt: skip
    try:
        code = main(argv)
    except RuntimeError as e:
        code, error = "raised", e  # noqa: F841 (held while the threads are counted)
    with open(f"{root}/rank{rank}.txt", "w") as f:
        f.write(f"{code} {gloo_threads()}")


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fails", [None, "starting", "streaming"], ids=["finished", "failed_starting", "failed_streaming"])
def test_generate_on_two_ranks_leaves_no_thread_of_its_process_groups(tmp_path, fails):
    """The sharded model holds its sequence-parallel groups in reference cycles (its `new_cache`
    refers to the model), and generate destroyed the groups with the model still held: their gloo
    threads ran on after the command returned, into the interpreter's shutdown, where one still
    freeing a collective's tensors aborts a run that succeeded ("terminate called without an
    active exception"). The model is let go of and collected as the ranks leave the group.
    A run that failed mid-stream kept it in its error's traceback (the frames of its chunk, the
    session among their locals), past the leave's collection: a process that printed its error
    could then abort in its shutdown (one that failed as it started, its error said in a line, held
    it as long as the error lived). The error's finished frames let go of their locals."""
    from PIL import Image
    from rendezvous import a_held_rendezvous_store
    from server_helpers import write_wav
    from spawn_helpers import spawn
    from stream_helpers import face

    Image.fromarray(face()).save(tmp_path / "face.png")
    write_wav(tmp_path / "speech.wav", 0.3)
    with a_held_rendezvous_store() as port:  # (not a port let go: another test process could take it)
        spawn(_generate_then_its_threads, (port, str(tmp_path), fails), nprocs=2, preload=("streamgen.cli", __name__))
    assert (tmp_path / "a.mp4").is_file() == (fails is None)
    for rank in (0, 1):
        code, threads = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert code == {None: "0", "starting": "2", "streaming": "raised"}[fails]  # (2: its one line)
        assert threads in ("0", "None"), f"rank {rank}: {threads} gloo threads left"  # (None: no /proc)
