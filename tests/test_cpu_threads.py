"""Each stage of a chunk on the CPU threads its work gains from (streamgen/cpu_threads.py)."""

import threading
import time

import numpy as np
import pytest
import torch

import streamgen.cpu_threads as cpu_threads
import streamgen.stream_batch as stream_batch
from streamgen.cpu_threads import intra_op_threads
from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks


@pytest.fixture(scope="module")
def model():
    return load_model("debug")


def face(seed=0, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def speech(seconds=3.0):
    return (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def thread_recorder():
    """(stage -> the threads it ran on, an `observe` hook that records them)."""
    seen = {}

    def observe(stage, fn):
        seen.setdefault(stage, set()).add(torch.get_num_threads())
        return fn()

    return seen, observe


def test_a_block_runs_on_one_thread_or_all_and_restores_them(two_threads):
    with intra_op_threads(False) as n:
        assert n == 1 and torch.get_num_threads() == 1
        # nested: all means the threads outside the outermost block, not the parent's one
        with intra_op_threads(True) as inner:
            assert inner == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with intra_op_threads(True):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), intra_op_threads(False):
        raise RuntimeError("a stage that fails")
    assert torch.get_num_threads() == 2  # restored all the same


def test_small_stages_run_on_one_thread_large_ones_on_all(model, two_threads, monkeypatch):
    s = StreamSession(model, decode_threads="split")  # (the decode's own threads: below)
    seen, observe = thread_recorder()
    s.start(face(), seed=1, observe=observe)
    s.push_audio(speech())
    for _ in range(3):
        s.next_chunk(observe=observe)
    assert seen["reference_encode"] == seen["sink"] == {1}
    for stage in ("reencode", "audio", "denoise", "decode"):
        assert seen[stage] == {1}, stage
    assert seen["to_host"] == {2}  # a copy: left as it is
    assert torch.get_num_threads() == 2

    # work past the thresholds: the model's stages on all threads (the audio encoder stays on one)
    monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", 1)
    monkeypatch.setattr(cpu_threads, "CODEC_PARALLEL_PIXELS", 1)
    seen.clear()
    s.next_chunk(observe=observe)
    for stage in ("reencode", "denoise", "decode"):
        assert seen[stage] == {2}, stage
    assert seen["audio"] == {1}


def test_the_thresholds_count_the_stages_work(model, two_threads, monkeypatch):
    s = StreamSession(model)
    cfg = model.cfg
    hp, wp = model.dit.grid(s.latent_hw)
    chunk, keys = (
        cfg.frames_per_chunk * hp * wp,
        (cfg.sink_frames + cfg.window_frames + cfg.frames_per_chunk) * hp * wp,
    )
    weights = sum(p.numel() for p in model.dit.blocks.parameters())
    chunk_flop = 2 * chunk * weights + 4 * chunk * keys * cfg.dim * cfg.num_layers
    assert cpu_threads.dit_forward_flop(model.dit, chunk, keys) == chunk_flop
    monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", chunk_flop)
    with s.stage_threads("denoise"):
        assert torch.get_num_threads() == 2
    with s.stage_threads("sink"):  # one latent frame of tokens and keys: under the threshold
        assert cfg.sink_frames < cfg.frames_per_chunk and torch.get_num_threads() == 1
    monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", chunk_flop + 1)
    with s.stage_threads("denoise"):
        assert torch.get_num_threads() == 1
    with s.stage_threads("denoise", batch=2):  # a batch of streams in one forward
        assert torch.get_num_threads() == 2
    # a longer ring: more keys for the same tokens
    monkeypatch.setattr(cfg, "window_frames", cfg.window_frames + 1)
    with s.stage_threads("denoise"):
        assert torch.get_num_threads() == 2
    monkeypatch.setattr(cpu_threads, "CODEC_PARALLEL_PIXELS", s.frames_per_chunk * s.height * s.width)
    with s.stage_threads("decode"):
        assert torch.get_num_threads() == 2
    with s.stage_threads("reference_encode"):  # one latent frame: fewer video frames than a chunk's
        assert s.vae.first_latent_frames < s.frames_per_chunk and torch.get_num_threads() == 1
    monkeypatch.setattr(cpu_threads, "CODEC_PARALLEL_PIXELS", s.vae.first_latent_frames * s.height * s.width)
    with s.stage_threads("reference_encode"):
        assert torch.get_num_threads() == 2


def test_all_leaves_every_stage_on_all_threads_with_the_same_frames(model, two_threads):
    frames = {}
    for way in ("auto", "all"):
        s = StreamSession(model, cpu_threads=way)
        seen, observe = thread_recorder()
        s.start(face(), seed=3)
        s.push_audio(speech())
        frames[way] = np.concatenate([s.next_chunk(observe=observe)[0] for _ in range(3)])
        if way == "all":
            assert set().union(*seen.values()) == {2}
    # the same stream: a thread count changes at most how a product's sums are split
    diff = np.abs(frames["auto"].astype(int) - frames["all"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_a_batch_of_streams_runs_its_forward_on_the_batchs_threads(model, two_threads, monkeypatch):
    sessions = []
    for i in range(2):
        s = StreamSession(model)
        s.start(face(i), seed=i)
        s.push_audio(speech())
        sessions.append(s)
    cfg = model.cfg
    hp, wp = model.dit.grid(sessions[0].latent_hw)
    keys = (cfg.sink_frames + cfg.window_frames + cfg.frames_per_chunk) * hp * wp
    one_stream = cpu_threads.dit_forward_flop(model.dit, cfg.frames_per_chunk * hp * wp, keys)
    monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", one_stream + 1)  # two streams reach it
    seen = []
    forward = stream_batch.cached_velocity

    def recording(*args, **kwargs):
        velocity = forward(*args, **kwargs)

        def step(*a, **k):
            seen.append(torch.get_num_threads())
            return velocity(*a, **k)

        return step

    monkeypatch.setattr(stream_batch, "cached_velocity", recording)
    next_chunks(sessions)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 2


def test_side_by_side_runs_each_part_on_a_thread_of_its_own_on_one_thread(two_threads):
    def record(part):
        time.sleep(0.05)  # (all parts at once, so that no pool thread takes two)
        return part, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()

    with torch.no_grad():
        out = cpu_threads.side_by_side(record, [0, 1, 2])
    assert [part for part, *_ in out] == [0, 1, 2]  # in order
    assert out[0][1] == threading.get_ident() and len({ident for _, ident, *_ in out}) == 3
    assert {threads for *_, threads, _ in out} == {1} and not any(grad for *_, grad in out)
    assert torch.get_num_threads() == 2  # the caller's own again
    assert all(grad for *_, grad in cpu_threads.side_by_side(record, [0, 1]))

    def fail(part):
        if part == 1:
            raise RuntimeError("a part that fails")
        return part

    with pytest.raises(RuntimeError, match="a part that fails"):
        cpu_threads.side_by_side(fail, [0, 1])
    assert torch.get_num_threads() == 2


def _parts_in_a_fork(queue):
    queue.put(cpu_threads.side_by_side(lambda part: (part, threading.get_ident()), [0, 1]))


def test_side_by_side_runs_in_a_process_forked_after_it_ran(two_threads):
    """The pool's threads stay in the parent: a forked child's parts had nobody to run them."""
    import multiprocessing

    cpu_threads.side_by_side(lambda part: part, [0, 1])  # the parent's pool, with a thread idle
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_parts_in_a_fork, args=(queue,))
    child.start()
    try:
        parts = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert [part for part, _ in parts] == [0, 1] and parts[0][1] != parts[1][1]


def test_frames_decode_the_chunks_frames_side_by_side_with_the_same_frames(model, two_threads):
    """decode_threads="frames": the decode stage on all threads, its latent frames each on a
    thread of its own running on one; the same stream as "split"."""
    frames, decoded_on = {}, {}
    for way in ("split", "frames"):
        s = StreamSession(model, decode_threads=way)
        seen, observe = thread_recorder()
        calls = decoded_on[way] = []

        def record(module, args, calls=calls):
            calls.append((threading.get_ident(), torch.get_num_threads(), len(args[0])))

        hook = s.vae.dec.register_forward_pre_hook(record)
        try:
            s.start(face(), seed=3)
            s.push_audio(speech())
            frames[way] = np.concatenate([s.next_chunk(observe=observe)[0] for _ in range(3)])
        finally:
            hook.remove()
        assert seen["decode"] == ({1} if way == "split" else {2})
    latent_frames = model.cfg.frames_per_chunk
    assert [n for *_, n in decoded_on["split"]] == [latent_frames] * 3
    assert [n for *_, n in decoded_on["frames"]] == [1] * (3 * latent_frames)
    assert {threads for _, threads, _ in decoded_on["frames"]} == {1}
    assert len({ident for ident, *_ in decoded_on["frames"]}) >= 2
    diff = np.abs(frames["split"].astype(int) - frames["frames"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert torch.get_num_threads() == 2


def test_a_batch_of_streams_decodes_its_frames_side_by_side_as_its_lead_says(model, two_threads):
    sessions = []
    for i in range(2):
        s = StreamSession(model, decode_threads="frames")
        s.start(face(i), seed=i)
        s.push_audio(speech())
        sessions.append(s)
    calls = []
    hook = sessions[0].vae.dec.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        next_chunks(sessions)
    finally:
        hook.remove()
    assert calls == [model.cfg.frames_per_chunk] * 2  # two streams' frames in two parts


def test_auto_decodes_frames_side_by_side_where_there_are_no_fewer_frames_than_threads(model, two_threads):
    """The default, "auto": a chunk's latent frames side by side on 2 threads (what was measured,
    bench/results/cpu-2026-12-07-decode-modes.json); with more threads than frames each
    convolution split over them, unless a batch of streams brings frames enough."""
    frames = model.cfg.frames_per_chunk
    assert frames >= 2
    s = StreamSession(model)
    assert s.decode_threads == "auto"
    assert s.decodes_frames_apart() and s.decode_options() == {"frame_threads": 2}
    seen, observe = thread_recorder()
    parts = []
    hook = s.vae.dec.register_forward_pre_hook(lambda m, args: parts.append(len(args[0])))
    try:
        s.start(face(), seed=3)
        s.push_audio(speech())
        s.next_chunk(observe=observe)
    finally:
        hook.remove()
    assert seen["decode"] == {2} and parts == [1] * frames

    torch.set_num_threads(frames + 1)  # (two_threads gives the count back)
    assert not s.decodes_frames_apart() and s.decode_options() == {}
    assert s.decodes_frames_apart(batch=2)
    with intra_op_threads(False):  # a block in force does not change the choice: the count outside it
        assert not s.decodes_frames_apart() and s.decodes_frames_apart(batch=2)
    for way, apart in (("split", False), ("frames", True)):
        s.decode_threads = way
        assert s.decodes_frames_apart() == apart


def test_a_parallel_decoder_decodes_its_band_as_before_not_frames_apart(model, two_threads):
    """`serve --sp`'s tiled decoder read the wrapped autoencoder's `frames_decode_apart` (True)
    through its `__getattr__`, and was given `frame_threads`, which its `decode_stream` has not:
    every chunk failed on every rank (a TypeError), and the ranks went down together."""
    from streamgen.parallel.vae import TiledParallelDecoder

    s = StreamSession(model)
    assert s.decodes_frames_apart()
    s.vae = TiledParallelDecoder(s.vae, group=object(), halo=0)  # (the group is only used when decoding)
    assert not s.decodes_frames_apart() and s.decode_options() == {}


def test_an_unknown_decode_threads_is_an_error(model):
    with pytest.raises(ValueError, match="decode_threads must be one of"):
        StreamSession(model, decode_threads="many")


def test_an_unknown_cpu_threads_is_an_error(model):
    with pytest.raises(ValueError, match="cpu_threads"):
        StreamSession(model, cpu_threads="many")


@pytest.mark.parametrize("amx", [True, False])
def test_the_thresholds_are_their_cpu_kinds(amx):
    """Two threads paid for the float32 DiT from 4.5 GFLOP on the 2-core machine with AMX, from 2.5
    on the AMD EPYC without, and for the autoencoder from 150k frame pixels and 60k: a stage goes
    parallel at the threshold of the CPU it runs on."""
    import subprocess
    import sys

    probe = (
        "import torch\n"
        f"torch.cpu._is_amx_tile_supported = lambda: {amx}\n"
        "import streamgen.cpu_threads as c\n"
        "print(c.DIT_PARALLEL_FLOP, c.DIT_PARALLEL_FLOP_AMX, c.DIT_PARALLEL_FLOP_OTHER)\n"
        "print(c.CODEC_PARALLEL_PIXELS, c.CODEC_PARALLEL_PIXELS_AMX, c.CODEC_PARALLEL_PIXELS_OTHER)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():  # the DiT's, then the autoencoder's
        chosen, with_amx, other = map(float, line.split())
        assert with_amx > other
        assert chosen == (with_amx if amx else other)
