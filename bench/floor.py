"""`streamgen bench floor --json`: the least time a chunk can take, counted rather than timed.

For each stage of a chunk (`streamgen.stream.CHUNK_STAGES`: the clean re-encode
of the chunk before, audio encoder, the denoising steps, decoding, the copy to
the host; a fresh stream's first chunk has no re-encode to do) and for
starting a stream (reference encode and sink), this counts

- `tflop`: the floating-point operations of every matrix product, attention and
  convolution (`torch.utils.flop_counter`, a multiply-add counting two), and
  how they split between linear layers, attention and convolutions;
- `weights_gb` + `kv_gb`: the fewest bytes the stage must move through device
  memory: every weight it uses read once per forward (the denoising steps run
  one after the other), and in the transformer's stages the KV cache each
  forward attends to read once.

Over the device's matrix rate and copy bandwidth the FLOPs and the fewest bytes
give two times; the larger is the stage's floor, and no implementation of the
same model runs much faster. The counts come from running the real
`StreamSession`, on the meta device for models too large for this machine
(`wan2.1-1.3b`: no values, only shapes), so they follow the model code as it is.
On meta every operator is a Python call (~0.6 ms here), so there the
transformer is counted with one block and with two (`layer_extrapolated`): its
blocks are identical, so every count is the one-block count plus the second
block's share once for each further block, the same numbers as counting all 30
(tested; `--every-layer` counts them all: 76 s against 17 s at 832x480 on the
2-core CPU). The autoencoder's decodes run in the one-block count alone, the
two-block count takes them (`KeptDecodes`: they were 40% of its CPU time, run in
both). The first chunk is counted on a fresh stream,
the steady chunk once the ring holds `window_frames`, and every chunk of a fresh
81-frame clip: the setting of Self-Forcing's published rate (`clip`, below).

The default ceilings are an H200's as measured on the lent machines (KINDS.md
of the device tool: a bf16 8192^3 matrix product at ~790 TFLOP/s on random data,
a device-to-device copy at ~4.3 TB/s counting read and write); `--measure`
measures this device's instead. `bench/gpu.py` measures them on the GPU in the
same run and sets its timings against this floor.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.blocks import layer_extrapolated, with_layers
from bench.ceilings import H200_COPY_GBPS, H200_MATMUL_TFLOPS, measure_ceilings
from bench.work_count import KINDS, count
from streamgen.cli import frame_size, positive_int, positive_number, whole_number
from streamgen.model.audio import VIDEO_FPS
from streamgen.stream import StreamSession, to_uint8

TARGET_FPS = 34  # issue 6: wan2.1-1.3b, 832x480, 4 steps on one H200
# Self-Forcing's published 17 FPS is the rate of a fresh 81-frame clip (21 latent frames, Wan's
# length): its cache grows from nothing and never evicts, so its chunks attend to 12 latent
# frames on average where a stream's steady chunks attend to the sink, the chunk and a full ring
CLIP_FRAMES = 81
WAN_FLAVORS = ("wan2.1-1.3b", "wan2.1-14b")  # random weights, counted on the meta device
# the ceilings a count is set against unless --measure or --time measures this device's (the FP8
# rate: twice the bf16 rate, Hopper's nominal ratio)
_RATE_DEFAULTS = {
    "matmul_tflops": H200_MATMUL_TFLOPS,
    "copy_gbps": H200_COPY_GBPS,
    "fp8_tflops": 2 * H200_MATMUL_TFLOPS,
}


_FP8_KINDS = ("fp8_linear", "fp8_attention")  # products at the FP8 rate
# the share of attention's products in e4m3 with each FP8 backend (kernels.attention): QK^T, or both
FP8_ATTENTION_SHARE = {"fp8_qk": 0.5, "fp8": 1.0}


def chunk_work(
    session: StreamSession, start, steps: int, clip_frames: int = CLIP_FRAMES, decodes=None
) -> dict:
    """The work of starting `session` (start() prepares it), of each chunk of a fresh clip of
    `clip_frames` video frames (its first chunk first), and of a chunk at the full ring.
    `decodes`: a `KeptDecodes` shared by counts of the same chunks (another number of blocks),
    its decodes run and counted in the first of them only."""
    decodes = decodes or KeptDecodes()
    decodes.rewind()
    _, start_work = count(start)
    clip, frames = [], 0
    while frames < clip_frames:
        clip.append(_counted_chunk(session, steps, decodes))
        frames += clip[-1]["frames"]
    while session.cache.filled < session.cache.window_frames:  # fill the ring as a stream does
        session.next_chunk(observe=_uncounted(session, decodes))
    steady = _counted_chunk(session, steps, decodes)
    return {"start": start_work, "first_chunk": clip[0], "steady_chunk": steady, "clip": clip}


class KeptDecodes:
    """The decodes of a count of a stream's chunks (their latents, frames and work), kept to stand
    in for those of a later count of the same chunks: the decoder's work follows the latents'
    shapes and its own state, never the transformer's depth, so the count with two blocks takes
    the one-block count's decodes rather than running the decoder again (on meta, half the time
    of a Wan count); and another decoder decodes the same latents (`decoded_by`) for the count of
    a stream that differs in its decoder alone."""

    def __init__(self):
        self.kept: list[tuple] = []  # (chunk index, latents, frames, work or None where not counted)
        self.next = 0

    def rewind(self) -> None:
        """From the first chunk again: a new count of the same chunks."""
        self.next = 0

    def decode(self, chunk_index: int, latents, fn, counted: bool):
        """(fn()'s frames, their work where `counted`): fn decodes `latents`, run, or the kept
        ones in their place."""
        if self.next < len(self.kept):
            index, _, frames, work = self.kept[self.next]
            if index != chunk_index or (work is not None) != counted:
                raise ValueError(f"this count decodes other chunks than the first (chunk {chunk_index})")
        else:
            frames, work = count(fn) if counted else (fn(), None)
            self.kept.append((chunk_index, latents, frames, work))
        self.next += 1
        return frames, copy.deepcopy(work)

    def decoded_by(self, vae) -> KeptDecodes:
        """These decodes' latents decoded again by `vae` from its fresh state, in their order and
        counted where they were: as a stream decoding through `vae` decodes them (a session's
        `_decode`, under no_grad: the latents in the autoencoder's dtype, then the frames as uint8;
        neither decoder `bench gpu` varies takes decode options)."""
        dtype, state = next(vae.parameters()).dtype, vae.init_state(1)

        @torch.no_grad()  # (as a stream's: with grad, TAEHV's later chunks counted 1.6 MB more weights)
        def decode(latents):
            nonlocal state
            frames, state = vae.decode_stream(latents.to(dtype), state)
            return to_uint8(frames)[0]

        other = KeptDecodes()
        for index, latents, _, work in self.kept:
            other.decode(index, latents, lambda latents=latents: decode(latents), counted=work is not None)
        return other

    def counted(self) -> list[tuple]:
        """(frames, work) of each counted decode, in order: those of `chunk_work`'s clip, then
        its steady chunk."""
        return [(frames, work) for _, _, frames, work in self.kept if work is not None]


def attention_in_fp8(work: dict, backend: str) -> dict:
    """`work` with the DiT's attention (the denoising and the re-encode) in FP8 with `backend`: its
    share of their attention FLOPs counted as `fp8_attention`. The count itself runs SDPA (the FP8
    kernel's products are the same); the start's attention stays in the model's dtype (its sink
    forward is small beside the encoder's)."""
    share = FP8_ATTENTION_SHARE[backend]
    # each chunk once: a fresh clip's first chunk is `first_chunk` itself (moved twice, fp8_qk's
    # share of it was 3/4 instead of 1/2)
    chunks = {
        id(chunk): chunk for chunk in (work["first_chunk"], work["steady_chunk"], *work.get("clip", []))
    }
    for chunk in chunks.values():
        for stage in ("denoise", "reencode"):
            kinds = chunk["stages"][stage]["tflop_by_kind"]
            moved = share * kinds["attention"]
            kinds["attention"] -= moved
            kinds["fp8_attention"] += moved
    return work


def _uncounted(session, decodes):
    denoised = None

    def observe(stage, fn):
        nonlocal denoised
        # meta tensors have no values to copy; elsewhere the copy is timed, never counted
        if stage == "to_host":
            return None
        if stage == "decode":
            return decodes.decode(session.chunk_index, denoised, fn, counted=False)[0]
        result = fn()
        if stage == "denoise":  # the latents the decode takes (kept for another decoder's)
            denoised = result
        return result

    return observe


def _counted_chunk(session, steps, decodes) -> dict:
    stages = {}
    frames_per_chunk = session.frames_per_chunk
    denoised = None

    def observe(stage, fn):
        nonlocal frames_per_chunk, denoised
        if stage == "to_host":
            return None
        if stage == "denoise":  # forwards of the transformer against the cache
            result, stages[stage] = count(fn, steps, session.cache)
            denoised = result  # the latents the decode takes (kept for another decoder's)
        elif stage == "reencode":  # the previous chunk's, if any: the first chunk's call has none
            # a cache write's last layer stores keys and values and attends to none
            cache = session.cache if session.chunk_pending else None
            result, stages[stage] = count(fn, 1, cache, kv_layers=len(session.cache.layers) - 1)
        elif stage == "decode":
            result, stages[stage] = decodes.decode(session.chunk_index, denoised, fn, counted=True)
            frames_per_chunk = result.shape[0]
        else:
            result, stages[stage] = count(fn)
        return result

    session.next_chunk(observe=observe)
    return {"frames": frames_per_chunk, "stages": stages}


# the stages a chunk runs at once with StreamSession.decode_beside_reencode (two CUDA streams)
DECODE_BESIDE_REENCODE = ("decode", "reencode")


def floor(
    work: dict, matmul_tflops, copy_gbps, target_fps=TARGET_FPS, fp8_tflops=None, overlapped=()
) -> dict:
    """Each stage's floor (ms) and what bounds it; the chunk's floor, frames/s ceiling, first-chunk
    floor. FP8 products run at `fp8_tflops` (None: at the matrix rate, as everything else). The
    stages run one after the other, but the `overlapped` ones (`DECODE_BESIDE_REENCODE`) at once
    on the one device, sharing its rates: together they take the floor of their summed work, not
    the longer one's alone (below the sum of their floors only where one is bound by memory and
    the other by arithmetic)."""

    def stage_floor(w):
        fp8 = sum(w["tflop_by_kind"].get(kind, 0.0) for kind in _FP8_KINDS)
        arithmetic_ms = ((w["tflop"] - fp8) / matmul_tflops + fp8 / (fp8_tflops or matmul_tflops)) * 1e3
        memory_ms = (w["weights_gb"] + w["kv_gb"]) / copy_gbps * 1e3
        return {
            "floor_ms": max(arithmetic_ms, memory_ms),
            "bound": "arithmetic" if arithmetic_ms >= memory_ms else "memory",
            "flop_per_byte": w["tflop"] * 1e3 / max(w["weights_gb"] + w["kv_gb"], 1e-12),
        }

    def chunk_floor(chunk):
        stages = {name: stage_floor(w) for name, w in chunk["stages"].items()}
        tflop = sum(w["tflop"] for w in chunk["stages"].values())
        together = [name for name in overlapped if name in stages]
        floor_ms = sum(s["floor_ms"] for name, s in stages.items() if name not in together)
        out = {"stages": stages, "floor_ms": floor_ms, "tflop": tflop}
        if together:
            shared = stage_floor(summed_work([chunk["stages"][name] for name in together]))
            out["floor_ms"] += shared["floor_ms"]
            out["overlapped"] = {"stages": together, **shared}
        return out

    def rates(frames, floor_ms):
        fps = frames / (floor_ms / 1e3)
        # the share of the matrix rate the whole would have to sustain for the target
        return {"fps_ceiling": fps, "matmul_rate_needed_for_target": target_fps / fps}

    out = {"start": stage_floor(work["start"])}
    out["first_chunk"] = chunk_floor(work["first_chunk"])
    out["first_chunk"]["floor_ms_from_start"] = out["start"]["floor_ms"] + out["first_chunk"]["floor_ms"]
    out["steady_chunk"] = chunk_floor(work["steady_chunk"])
    out["steady_chunk"].update(rates(work["steady_chunk"]["frames"], out["steady_chunk"]["floor_ms"]))
    if "clip" in work:  # from the first chunk on, as the published rate (start not included)
        clip = [chunk_floor(chunk) for chunk in work["clip"]]
        frames = sum(chunk["frames"] for chunk in work["clip"])
        floor_ms = sum(c["floor_ms"] for c in clip)
        out["clip"] = {
            "frames": frames,
            "chunks": len(clip),
            "floor_ms": floor_ms,
            "chunk_floor_ms": [c["floor_ms"] for c in clip],
            "tflop": sum(c["tflop"] for c in clip),
            **rates(frames, floor_ms),
        }
    return out


def summed_work(works: list) -> dict:
    """The work of stages run as one (`count`'s dicts): their FLOPs, by kind too, and bytes added."""
    summed = {key: sum(w[key] for w in works) for key in ("tflop", "weights_gb", "kv_gb")}
    kinds = {kind for w in works for kind in w["tflop_by_kind"]}
    return {**summed, "tflop_by_kind": {k: sum(w["tflop_by_kind"].get(k, 0.0) for w in works) for k in kinds}}


def flops_by_kind(stages: dict) -> dict:
    """TFLOP per chunk in matrix products (linear layers), attention and convolutions."""
    return {kind: sum(w["tflop_by_kind"][kind] for w in stages.values()) for kind in KINDS}


def rounded(x, digits=3):
    """Floats (in nested dicts and lists too) to digits + 1 significant digits, for reading."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    if isinstance(x, float):
        return float(f"{x:.{digits + 1}g}")
    return x


def report(work: dict, ceilings: dict, target_fps: float = TARGET_FPS) -> dict:
    """work + floor under these ceilings, rounded for reading."""
    rates = ceilings["matmul_tflop_per_s"], ceilings["copy_gb_per_s"]
    fl = floor(work, *rates, target_fps, ceilings.get("matmul_tflop_per_s_float8"))
    return rounded(
        {
            "ceilings": ceilings,
            "work": work,
            "floor": fl,
            "steady_chunk_tflop_by_kind": flops_by_kind(work["steady_chunk"]["stages"]),
            "fps_ceiling": fl["steady_chunk"]["fps_ceiling"],
            "clip_fps_ceiling": fl.get("clip", {}).get("fps_ceiling"),
            "first_chunk_floor_ms": fl["first_chunk"]["floor_ms_from_start"],
            # a known avatar's start is a copy of its kept sink (streamgen/start_memo.py)
            "first_chunk_floor_ms_known_avatar": fl["first_chunk"]["floor_ms"],
        }
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="wan2.1-1.3b",
        help=f"{' or '.join(WAN_FLAVORS)}, or a streamgen model (default: %(default)s)",
    )
    p.add_argument("--height", type=frame_size, help="default: 480 for the Wan flavors, else the model's own")
    p.add_argument("--width", type=frame_size, help="default: 832 for the Wan flavors, else the model's own")
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps (default: %(default)s)")
    p.add_argument("--text-tokens", type=positive_int, help="Wan: text context length (T5's; default 512)")
    p.add_argument(
        "--window",
        type=positive_int,
        help="Wan: latent frames in the ring (default 21; at least a chunk's 3)",
    )
    p.add_argument(
        "--device", help="where to count: default meta for the Wan flavors (shapes only), else cpu"
    )
    p.add_argument("--measure", action="store_true", help="measure this machine's ceilings (else an H200's)")
    p.add_argument(
        "--matmul-tflops",
        type=positive_number,
        default=_RATE_DEFAULTS["matmul_tflops"],
        help="the matmul rate a count is set against without --measure or --time (default: %(default)g, "
        "an H200's)",
    )
    p.add_argument(
        "--copy-gbps",
        type=positive_number,
        default=_RATE_DEFAULTS["copy_gbps"],
        help="the memory copy rate, bytes read + written, a count is set against without --measure or --time "
        "(default: %(default)g, an H200's)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="count the DiT with its block linears in FP8 (streamgen.model.float8), their products at "
        "the FP8 rate",
    )
    p.add_argument(
        "--fp8-attention",
        choices=sorted(FP8_ATTENTION_SHARE),
        help="count the DiT's attention with QK^T (fp8_qk) or both products (fp8) at the FP8 rate",
    )
    p.add_argument(
        "--fp8-tflops",
        type=positive_number,
        default=_RATE_DEFAULTS["fp8_tflops"],
        help="the FP8 products' rate, with --fp8 or --fp8-attention (default: twice the bf16 rate, "
        "Hopper's nominal ratio)",
    )
    p.add_argument(
        "--tiny-decoder",
        action="store_true",
        help="Wan: count TAEHV's tiny decoder (streamgen/model/tiny_decoder.py) in place of the Wan VAE's",
    )
    p.add_argument(
        "--upsample-phases",
        action="store_true",
        help="Wan: count the Wan decoder's upsamplers at low resolution (WanVAE.upsample_phases)",
    )
    p.add_argument(
        "--cache-from",
        choices=["reencode", "last_step"],
        default=None,
        help="each chunk's keys/values from a clean re-encode or from its last denoising step "
        "(streamgen.sampling.CACHE_FROM; default: the model's own, a re-encode for the Wan flavors)",
    )
    p.add_argument(
        "--clip-frames",
        type=positive_int,
        default=CLIP_FRAMES,
        help="also count a fresh clip this long (video frames), from its first chunk on (default: 81)",
    )
    p.add_argument(
        "--every-layer",
        action="store_true",
        help="on meta, count every block of the transformer (default: one block and two, "
        "extrapolated: the same counts, about 3x sooner)",
    )
    p.add_argument("--plot", help="write the steady chunk's floor by stage to this PNG")
    p.add_argument(
        "--time",
        type=whole_number,
        default=0,
        metavar="CHUNKS",
        help="also time each stage over CHUNKS chunks against this device's measured floor "
        "(default: 0, none)",
    )
    p.add_argument(
        "--target-fps",
        type=positive_number,
        help=f"default: {TARGET_FPS} for the Wan flavors (issue 6), else 25.",
    )


def main(args) -> dict:
    from bench import stage_timing  # here: both import this module
    from bench.gpu import build_model, start_stream
    from streamgen.cli import UserError, check_device
    from streamgen.models import load_model

    started = time.perf_counter()
    wan = args.model in WAN_FLAVORS
    device = args.device or ("meta" if wan else "cpu")
    check_device(device, meta=True)  # (the count needs no data)
    for flag, given in (("--measure", args.measure), ("--time", args.time)):
        if given and device == "meta":
            raise UserError(f"{flag} needs a real device (--device cuda or cpu), not meta")
        given_rates = [
            f"--{name.replace('_', '-')}"
            for name, default in _RATE_DEFAULTS.items()
            if getattr(args, name) != default
        ]
        if given and given_rates:  # (they were ignored: the JSON's ceilings were the measured ones)
            raise UserError(
                f"{' and '.join(given_rates)}: {flag} measures this device's ceilings, give one or the other"
            )
    context = None
    attention = args.fp8_attention or "sdpa"  # what --time runs; the count is the same for both
    if wan:
        dtype = torch.bfloat16
        height, width = args.height or 480, args.width or 832
        window = args.window or 21
        if window < 3:  # (a chunk's keys go into the ring: the cache's ValueError, a traceback)
            raise UserError(f"--window {window}: the ring holds at least a chunk's 3 latent frames")
        try:
            model = build_model(args.model, height, width, device, dtype, False, attention, window)
        except ValueError as e:  # more than this machine's memory (--device cpu)
            raise UserError(str(e)) from None
        context = torch.zeros(1, args.text_tokens or 512, model.cfg.text_dim, device=device, dtype=dtype)
        if args.tiny_decoder and args.upsample_phases:
            raise UserError("--upsample-phases is a way of the Wan decoder, not of --tiny-decoder")
        model.vae.upsample_phases = args.upsample_phases
        if args.tiny_decoder:
            from bench.wan_decoder import tiny_decoder_vae

            model.vae = tiny_decoder_vae(model.vae)
    else:
        for flag, given in (  # (a streamgen model's own window and text were counted: ignored)
            ("--tiny-decoder", args.tiny_decoder),
            ("--upsample-phases", args.upsample_phases),
            ("--window", args.window),
            ("--text-tokens", args.text_tokens),
        ):
            if given:
                raise UserError(f"{flag} is about Wan's latents: it needs a Wan flavor as --model")
        dtype = torch.float32
        try:
            model = load_model(args.model, device=device, dtype=dtype, attn_backend=attention)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        height, width = args.height or model.height, args.width or model.width
    from streamgen.model.float8 import float8_layers

    # $STREAMGEN_FP8 (load_model's) counts as --fp8: the JSON said "fp8_linears": false, and the
    # ceilings had no FP8 rate, while the linears were counted as FP8
    fp8_linears = args.fp8 or float8_layers(model.dit) > 0
    fp8 = fp8_linears or args.fp8_attention is not None
    if not fp8 and args.fp8_tflops != _RATE_DEFAULTS["fp8_tflops"]:  # (ignored: no product was FP8)
        raise UserError("--fp8-tflops is the FP8 products' rate: give --fp8 or --fp8-attention too")

    def session_of(m):
        try:
            if args.fp8:
                from streamgen.model.float8 import float8_linears

                float8_linears(m.dit)
            return StreamSession(
                m, height, width, steps=args.steps, device=device, dtype=dtype, cache_from=args.cache_from
            )
        except ValueError as e:  # a teacher, a size the model cannot take, a device without FP8
            raise UserError(str(e)) from None

    def starter(session):
        # enough speech for every chunk of the clip and up to the full ring, so no chunk is silent
        chunks = max(
            model.cfg.window_frames // model.cfg.frames_per_chunk,
            -(-args.clip_frames // session.frames_per_chunk),
        )
        speech_s = (chunks + 3) * session.chunk_seconds
        return lambda observe=None: start_stream(session, context, speech_s, observe=observe)

    decodes = KeptDecodes()  # the autoencoder's decodes counted once, in the one-block count

    def work_with_layers(layers):
        shallow = session_of(with_layers(model, layers))
        return chunk_work(shallow, starter(shallow), shallow.steps, args.clip_frames, decodes)

    session = session_of(model)
    start = starter(session)
    # on meta (counting only: --time and --measure need a real device) from one block and two
    extrapolate = device == "meta" and not args.every_layer and model.cfg.num_layers > 2
    if extrapolate:
        work = layer_extrapolated(work_with_layers, model.cfg.num_layers)
    else:
        work = chunk_work(session, start, session.steps, args.clip_frames)
    if args.fp8_attention:
        attention_in_fp8(work, args.fp8_attention)
    target_fps = args.target_fps or (TARGET_FPS if wan else VIDEO_FPS)
    if args.measure or args.time:  # times on this device go against this device's floor
        # every dtype the session computes in (the tiny models decode in bf16 on CPUs with native bf16)
        used = {p.dtype for module in (session.dit, session.vae) for p in module.parameters()}
        used.discard(torch.float8_e4m3fn)  # FP8 products have their own rate
        ceilings = measure_ceilings(device, sorted(used, key=str), float8=fp8)
    else:
        given = (args.matmul_tflops, args.copy_gbps) != (H200_MATMUL_TFLOPS, H200_COPY_GBPS)
        ceilings = {
            "matmul_tflop_per_s": args.matmul_tflops,
            "copy_gb_per_s": args.copy_gbps,
            "source": "given"
            if given
            else "an H200 as measured on the lent machines (device tool, KINDS.md)",
        }
        if fp8:  # not yet measured on a lent machine: bench gpu measures it
            ceilings["matmul_tflop_per_s_float8"] = args.fp8_tflops
    result = {
        "model": args.model,
        "height": height,
        "width": width,
        "steps": session.steps,
        "window_frames": model.cfg.window_frames,
        "dtype": str(dtype).removeprefix("torch."),
        "fp8_linears": fp8_linears,
        "attention": attention,
        "decoder": "tiny"
        if args.tiny_decoder
        else ("wan, upsample_phases" if args.upsample_phases else "wan")
        if wan
        else "model's",
        "cache_from": session.cache_from,
        "counted_on": device,
        "blocks_counted": [1, 2] if extrapolate else model.cfg.num_layers,
        **(
            stage_timing.timed_report(session, work, ceilings, args.time, target_fps, restart=start)
            if args.time
            else report(work, ceilings, target_fps)
        ),
        "target_fps": target_fps,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.plot:
        from bench.floor_plot import plot

        plot([result], args.plot)
    return result


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args())))
