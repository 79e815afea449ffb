"""How many threads each stage of a chunk runs its operators on, on a CPU.

PyTorch runs an operator on several threads (an OpenMP parallel region) once its
tensors are large enough. streamgen's OpenMP threads sleep while they wait
(`OMP_WAIT_POLICY=PASSIVE`, streamgen/__init__.py: spinning ones collapse as soon
as anything else wants a core), so every parallel region first wakes a sleeping
thread, tens of microseconds on the 2-core machine. A DiT forward makes a few
hundred such regions whatever its size, so two threads pay only once its
arithmetic is large enough. The tiny-avatar's (window of 2 latent frames) ran its
denoising 3x faster on one thread than on two at 64x64 (17 ms against 52 ms a
chunk), 2.2x at 128x128, 1.3x at 256x256, and 1.05x slower at 320x320; with a
ring of 32 latent frames, whose attention is 7x its linears at 256x256, two
threads won there by 1.5x. Its decoder's convolutions: one thread won at 64x64
(1.8x) and 96x96, two from 160x160 up (1.5-2x at 256x256).

So a stage runs on one thread unless its work reaches a size measured to gain
from more (`DIT_PARALLEL_FLOP`, `CODEC_PARALLEL_PIXELS`); then on all the threads
the process allows (`torch.get_num_threads()` as it stands outside every stage:
`streamgen serve --threads N` caps them). One thread for the small stages also
leaves the other core to whatever else runs: the server's video encoder, a second
process. `StreamSession(cpu_threads="all")` runs every stage on all of them, as
before (bench/engine.py times the two against each other).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref
from contextlib import contextmanager, nullcontext

import torch

CPU_THREADS = ("auto", "all")
# How the decode stage uses its threads: "split" each convolution over them (an OpenMP region
# per operator), "frames" the chunk's frames side by side, each on one thread (`side_by_side`),
# "auto" frames where there are at least as many latent frames as threads, else split. On 2
# threads, 3 latent frames decoded side by side (two on one, one on the other) beat splitting every
# convolution: 1.16x and 1.26x for the decode at 128x128 (bench/results/cpu-2026-12-07-decode-modes.json).
# With fewer frames than threads side by side would leave threads idle; that is not measured.
DECODE_THREADS = ("auto", "split", "frames")


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later): bfloat16 products much faster than float32's."""
    return _torch_probe("_is_amx_tile_supported")


def cpu_has_avx512_bf16() -> bool:
    """AVX512-BF16: bfloat16 products without AMX's tiles (AMD Zen 4, Intel Cooper Lake)."""
    return _torch_probe("_is_avx512_bf16_supported")


def cpu_has_native_bfloat16() -> bool:
    """AMX tiles or AVX512-BF16: bfloat16 arithmetic without a conversion at every product."""
    return cpu_has_amx() or cpu_has_avx512_bf16()


def _torch_probe(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())  # private torch probes: absent counts as no


# A DiT forward (a denoising step, a re-encode, the sink) runs in parallel from this much
# arithmetic (`dit_forward_flop`), measured with tiny-avatar on each kind of 2-core machine this
# farm has. With AMX: one thread won at 3.9 GFLOP (288x288, 1.08x) and 2.7 (256x256, 1.15x; 0.9
# with a ring of 32 frames at 128x128, 1.4x), two from 5.4 (320x320, 1.05x; 9.9 at 384x384,
# 1.33x; 10.8 with the ring of 32 frames at 256x256, 1.5x). On the AMD EPYC (no AMX) two threads
# pay sooner: one won at 1.83 GFLOP (224x224, 1.05x), two at 2.7 (1.03-1.08x) and 3.9 (1.13x)
# (the whole session, alternating rounds). This CPU's, chosen once.
DIT_PARALLEL_FLOP_AMX, DIT_PARALLEL_FLOP_OTHER = 4.5e9, 2.5e9
DIT_PARALLEL_FLOP = DIT_PARALLEL_FLOP_AMX if cpu_has_amx() else DIT_PARALLEL_FLOP_OTHER
# The same for a DiT in bfloat16 (or float16) on a CPU with AMX tiles, whose products are faster
# than float32's while the per-operator cost stays: one thread won at 5.4 GFLOP (320x320, 1.5x),
# the two tied at 16.8 (448x448), two won at 26.9 (512x512, 1.22x). Without AMX (AVX512-BF16
# alone) its products are no faster and float32's threshold holds: on one thread the session ran
# 0.92x as fast as on two at 320x320, 0.81x at 384x384 (same run).
DIT_PARALLEL_FLOP_HALF = 20e9
# The autoencoder (a chunk's decode, the reference's encode) from this many frame pixels:
# batch x frames x height x width. With AMX one thread won at 96x96 (8 frames, 74k pixels, 1.3x),
# the two tied at 128x128 (131k), two won from 160x160 (205k, 1.12x). On the AMD EPYC the two
# tied at 64x64 and 80x80 (33k, 51k: 1.04x, 0.98x) and two won from 96x96 (1.11x; 1.13x at
# 128x128, 1.19x at 160x160; the whole session, alternating rounds). This CPU's, chosen once.
CODEC_PARALLEL_PIXELS_AMX, CODEC_PARALLEL_PIXELS_OTHER = 150_000, 60_000
CODEC_PARALLEL_PIXELS = CODEC_PARALLEL_PIXELS_AMX if cpu_has_amx() else CODEC_PARALLEL_PIXELS_OTHER

_outermost = threading.local()  # torch's threads outside every stage, per OS thread


@contextmanager
def intra_op_threads(parallel: bool):
    """Run the block on all the threads the process allows (parallel) or on one.

    torch's thread count is per OS thread (OpenMP's), so each thread that runs stages keeps
    its own; nested blocks read the count outside the outermost one, not their parent's."""
    outer = getattr(_outermost, "threads", None)
    allowed = allowed_threads()
    before = torch.get_num_threads()
    wanted = allowed if parallel else 1
    _outermost.threads = allowed
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if wanted != before:
            torch.set_num_threads(before)
        _outermost.threads = outer


def allowed_threads() -> int:
    """The threads `intra_op_threads(True)` would run on here: the count outside the outermost
    block, whatever a block in force has set."""
    outer = getattr(_outermost, "threads", None)
    return outer if outer is not None else torch.get_num_threads()


def dit_threads(dit, latent_hw: tuple[int, int], frames: int, key_frames: int | None = None, batch: int = 1):
    """The threads of a DiT forward over `frames` latent frames of `batch` streams, attending to
    `key_frames` latent frames of keys (None: a stream's chunk's, the sink, the full ring and
    itself)."""
    half = next(dit.parameters()).dtype in (torch.bfloat16, torch.float16)
    threshold = DIT_PARALLEL_FLOP_HALF if half and cpu_has_amx() else DIT_PARALLEL_FLOP
    return intra_op_threads(chunk_forward_flop(dit, latent_hw, frames, key_frames, batch) >= threshold)


def chunk_forward_flop(
    dit, latent_hw: tuple[int, int], frames: int, key_frames: int | None = None, batch: int = 1
) -> float:
    """`dit_forward_flop` of a forward over `frames` latent frames of `batch` streams at `latent_hw`,
    attending to `key_frames` latent frames (None: a stream's chunk's keys, the sink, the full
    ring and itself)."""
    cfg = dit.cfg
    if key_frames is None:
        key_frames = cfg.sink_frames + cfg.window_frames + cfg.frames_per_chunk
    hp, wp = dit.grid(latent_hw)
    return batch * dit_forward_flop(dit, frames * hp * wp, key_frames * hp * wp)


def dit_forward_flop(dit, tokens: int, keys: int) -> float:
    """One forward's matrix arithmetic (a multiply-add is two): every block's weights over the
    tokens (the cross-attentions' keys and values over the context counted as over the tokens: a
    bound) and the self-attention of the tokens to `keys` keys."""
    cfg = dit.cfg
    weights = _block_weights.get(dit)
    if weights is None:
        weights = _block_weights[dit] = sum(p.numel() for p in dit.blocks.parameters())
    return 2 * tokens * weights + 4 * tokens * keys * cfg.dim * cfg.num_layers


_block_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dit -> its blocks' weights


def codec_threads(frames: int, height: int, width: int, batch: int = 1):
    """The threads of the autoencoder decoding (or encoding) `frames` frames of `batch` streams."""
    return intra_op_threads(batch * frames * height * width >= CODEC_PARALLEL_PIXELS)


def session_stage_threads(session, stage: str, batch: int = 1):
    """A context that runs a StreamSession's `stage` (of its `CHUNK_STAGES` or `START_STAGES`) for
    `batch` streams on the threads its work gains from; a no-op off the CPU, under
    cpu_threads="all", and for the stages that run no model. A decode that runs its frames side
    by side (`decodes_frames_apart`) gets all threads, one for each of its frames."""
    if session.cpu_threads == "all" or session.device.type != "cpu":
        return nullcontext()
    cfg = session.cfg
    if stage == "sink":
        return dit_threads(session.dit, session.latent_hw, cfg.sink_frames, cfg.sink_frames)
    if stage in ("reencode", "denoise"):  # the chunk against the sink, the full ring and itself
        return dit_threads(session.dit, session.latent_hw, cfg.frames_per_chunk, batch=batch)
    if stage == "decode" and session.decodes_frames_apart(batch):
        return intra_op_threads(True)
    if stage in ("decode", "reference_encode"):
        # the reference is one latent frame's video frames (the tiny autoencoder encodes the
        # image as that many copies: at 320x320 two threads encode it 1.75x faster than one)
        frames = session.frames_per_chunk if stage == "decode" else session.vae.first_latent_frames
        return codec_threads(frames, session.height, session.width, batch)
    if stage == "audio":  # the audio encoder's few small convolutions, whatever the video's size
        return intra_op_threads(False)
    return nullcontext()


def check_cpu_threads(value: str) -> str:
    if value not in CPU_THREADS:
        raise ValueError(f"cpu_threads must be one of {CPU_THREADS}, got {value!r}")
    return value


def check_decode_threads(value: str) -> str:
    if value not in DECODE_THREADS:
        raise ValueError(f"decode_threads must be one of {DECODE_THREADS}, got {value!r}")
    return value


_side_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (its process, it)
_side_pool_lock = threading.Lock()


def _side_pool_executor() -> concurrent.futures.ThreadPoolExecutor:
    """One pool for the process (its threads are made as calls need them, up to a core each): a
    server's lanes share it rather than each session keeping threads of its own. A forked child
    makes its own: the parent's threads are not in it, and work queued for them would wait forever."""
    global _side_pool
    with _side_pool_lock:
        if _side_pool is None or _side_pool[0] != os.getpid():
            workers = os.cpu_count() or 2
            pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="streamgen-side")
            _side_pool = (os.getpid(), pool)
        return _side_pool[1]


def side_by_side(fn, parts: list) -> list:
    """[fn(part) for part in parts], each call on a thread of its own that runs its operators on
    one (the first in the calling thread, the others in a pool): work split into independent
    parts (the frames of a decode) without an OpenMP region per operator. Each call sees the
    caller's grad and inference modes (torch keeps them per thread)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def one(part):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), intra_op_threads(False):
            return fn(part)

    # the caller's one thread held until every part is done: torch's count for threads made later
    # is whichever count was set last, by any thread, so the caller's restore comes last
    with intra_op_threads(False):
        others = [_side_pool_executor().submit(one, part) for part in parts[1:]]
        try:
            first = [one(part) for part in parts[:1]]
        finally:
            concurrent.futures.wait(others)  # (none left running past a failure here)
    return [*first, *(f.result() for f in others)]
