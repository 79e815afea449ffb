"""`streamgen generate`: speech audio + a face image -> a talking-avatar MP4."""

from __future__ import annotations

import math
import os
import stat
import sys
from pathlib import Path

from streamgen.cli import (
    FRAME_SIZE_RULE,
    HEAVY_IMPORTS,
    add_dtype_option,
    caption,
    frame_size,
    positive_int,
    seed_number,
)
from streamgen.files import home_expanded, new_file_beside

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# the names an MP4 (H.264 + AAC) goes by
MP4_SUFFIXES = (".mp4", ".m4v", ".mov")
TEACHER_IN_ONE_PROCESS = "--sp applies to streaming students; a teacher runs in one process"


def add_arguments(p) -> None:
    p.add_argument(
        "--audio",
        default=str(ASSETS / "sample_speech.wav"),
        help="speech audio, any format/rate (default: the bundled sample speech)",
    )
    p.add_argument(
        "--reference",
        default=str(ASSETS / "sample_face.png"),
        help="the face to animate (default: the bundled sample face)",
    )
    p.add_argument("--text", type=caption, default=None, help="optional caption, e.g. 'smiling'")
    p.add_argument("--out", default="out.mp4", help="output MP4 (H.264 + AAC; default out.mp4)")
    p.add_argument("--model", default="tiny-avatar", help="model name or directory (default tiny-avatar)")
    p.add_argument("--height", type=frame_size, default=None, help=f"{FRAME_SIZE_RULE} (default: the model's)")
    p.add_argument("--width", type=frame_size, default=None, help=f"{FRAME_SIZE_RULE} (default: the model's)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps (default: the model's): a distilled student takes the steps it was distilled for "
        "or a count that divides them (1, 2 or 4 of 4: its schedule's levels), a teacher any number",
    )
    p.add_argument("--seed", type=seed_number, default=0, help="the seed of the noise (default 0)")
    p.add_argument(
        "--cache-from",
        choices=["reencode", "last_step"],
        default=None,
        help="each chunk's keys/values in the KV cache: from a clean re-encode (Self-Forcing's way) or from "
        "its last denoising step (one forward fewer per chunk); default: the model's own",
    )
    p.add_argument("--device", default="cpu", help="cpu (the default), cuda or cuda:N")
    add_dtype_option(
        p,
        "--dtype",
        "the DiT's weights and cache (auto: bfloat16 from 224x224 up on CPUs with AMX in one process, "
        "else float32, --sp N included; bfloat16: AMX CPUs, GPUs)",
    )
    add_dtype_option(
        p,
        "--decode-dtype",
        "the autoencoder's decoder (auto: bfloat16 on CPUs with AMX or AVX512-BF16, 2-3x faster with AMX, "
        "1.2-1.35x without; frames within 2 levels)",
    )
    p.add_argument(
        "--attention",
        default=None,
        metavar="BACKEND",
        help="attention backend: sdpa (the default), flex, triton, flash, cudnn, or in FP8 fp8_qk (QK^T) and "
        "fp8 (both products; sm_89+) (on a CPU triton, flash and cudnn run as sdpa, fp8_qk and fp8 are emulated)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="the DiT's block linears in FP8 (streamgen.model.float8): for sm_89+ GPUs with --dtype bfloat16 "
        "(on CPUs it runs, slower than float32)",
    )
    p.add_argument(
        "--tiny-decoder",
        metavar="CHECKPOINT",
        help="decode with a tiny decoder (TAEHV's architecture, streamgen/model/tiny_decoder.py) that "
        "`streamgen distill tiny_decoder` made for this model's autoencoder",
    )
    p.add_argument(
        "--sp",
        type=positive_int,
        default=1,
        help="sequence-parallel processes (restarts under torchrun; default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import time

    from streamgen.cli import (
        UserError,
        check_device,
        check_session_options,
        import_with_ctrl_c_held,
        is_stop,
        require_models,
        restore_handlers,
        terminate_as_exit,
    )

    import_with_ctrl_c_held(HEAVY_IMPORTS)
    from streamgen.media import MediaError, Mp4Writer, from_time_zero, output_path, read_audio, read_image

    # (`--audio=~/a.wav`, which no shell expands: "No such file or directory: ~/a.wav")
    args.audio, args.reference = (str(home_expanded(given)) for given in (args.audio, args.reference))

    # before any relaunch: a bad file is one clear error, not one per process
    try:
        pcm = read_audio(args.audio)
        face = read_image(args.reference)
    except MediaError as e:
        raise UserError(str(e)) from None
    if args.out == "-":  # (a file named "-" was written)
        raise UserError("--out -: generate writes a file (an MP4 is finished by going back to its start), "
                        "not to standard output; give the file's name")  # fmt: skip
    out = home_expanded(args.out)  # (`--out=~/a.mp4`, no shell expands: "output directory does not exist: ~")
    try:
        out.exists()  # (the checks below stat it: a name the file system cannot hold raised there)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    if (
        str(args.out).endswith(("/", os.sep)) and not out.is_dir()
    ):  # (Path drops the slash: a file was written)
        raise UserError(f"--out {args.out} names a folder, which does not exist; give the file to write")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the file to write, e.g. {out / 'avatar.mp4'}")
    if out.suffix and out.suffix.lower() not in MP4_SUFFIXES:  # (/dev/null, a name without one: as given)
        # an MP4 under another kind's name: a player or browser that goes by the name refused it
        raise UserError(f"--out {out}: generate writes MP4 (H.264 + AAC); name it .mp4 (or .m4v, .mov)")
    try:
        out = output_path(out)
    except MediaError as e:
        raise UserError(f"--out {e}") from None
    _check_replaceable(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is a file, not a folder")
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    for flag, given in (("--audio", args.audio), ("--reference", args.reference)):
        if out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise UserError(f"--out {out} is the {flag} file: it would be replaced; give another name")
    try:  # now, not after the whole stream (the writer opens its file at the first frame); a
        # name of its own: every --sp rank checks at once, and one's unlink failed another's check
        new_file_beside(out).unlink()
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    if args.tiny_decoder is not None and not args.tiny_decoder.strip():  # (it was passed over without a word)
        raise UserError(f"--tiny-decoder {args.tiny_decoder!r} names no checkpoint: give the file `streamgen "
                        "distill tiny_decoder` made, or leave --tiny-decoder out for the model's own decoder")  # fmt: skip
    if args.fp8 and args.device.startswith("cuda") and args.dtype != "bfloat16":
        # (as serve says it: before the model loads, which then refused its float32 DiT in FP8)
        raise UserError("--fp8 on a GPU needs --dtype bfloat16 (its FP8 products give bfloat16)")
    check_device(args.device)  # (after the options' own conflicts, which hold on any machine)
    require_models(args.model)  # (before any relaunch: --sp N's processes each said it, after starting)
    # (each process said a --cache-from that does not fit, once it had loaded)
    check_session_options(args.model, args.steps, args.cache_from, dtype=args.dtype, decode_dtype=args.decode_dtype,
                          fp8=args.fp8)  # fmt: skip
    from streamgen.models import use_attention_backend, use_precision

    try:
        use_attention_backend(args.attention)  # in the environment: torchrun's ranks inherit it
        use_precision(fp8=args.fp8)
        from streamgen.parallel.launch import check_torchrun_world

        check_torchrun_world(args.sp)  # (under plain torchrun, before the model loads)
        if args.sp > 1:
            from streamgen.models import model_kind
            from streamgen.parallel.launch import (
                check_sequence_parallel,
                init_process_group,
                relaunch_under_torchrun,
            )

            # now, in one line, rather than from each of the processes once it has loaded the model
            if model_kind(args.model) == "teacher":
                raise ValueError(TEACHER_IN_ONE_PROCESS)
            check_sequence_parallel(args.sp, args.model, args.height, args.width)
            _check_inputs_read_again(args.sp, args.audio, args.reference)
            if args.tiny_decoder:  # (a small file: read here too, for a bad one's line before any process)
                _check_tiny_decoder(args.tiny_decoder, args.model)
            # does not return in the launcher
            relaunch_under_torchrun(args.sp, args._argv, device=args.device, model=args.model)
            # before the model loads: each rank's "cuda" is its own GPU
            args.device = init_process_group(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None

    # from here, not once streaming starts: a SIGTERM as the model loaded ended it unsaid (143), where
    # Ctrl-C says "interrupted" (an --sp rank too: torchrun stops its ranks by SIGTERM)
    terminated_before = terminate_as_exit()
    from tqdm import tqdm

    from streamgen.model.audio import SAMPLE_RATE, VIDEO_FPS
    from streamgen.teacher import TeacherSession, open_session

    try:
        session = open_session(
            _with_tiny_decoder(args) if args.tiny_decoder else args.model,
            args.height,
            args.width,
            args.steps,
            args.device,
            # sequence-parallel ranks run the model as loaded (streamgen.parallel shards that DiT)
            None if args.dtype == "auto" and args.sp > 1 else args.dtype,
            args.decode_dtype,
            args.cache_from,
        )
        if isinstance(session, TeacherSession) and args.sp > 1:
            raise ValueError(TEACHER_IN_ONE_PROCESS)
        main_process = _apply_sequence_parallel(session, args.sp)
        session.start(face, text=args.text, seed=args.seed)
    except BaseException as e:
        restore_handlers(terminated_before)
        if is_stop(e) or not isinstance(e, (FileNotFoundError, ValueError, RuntimeError)):
            raise
        session = None  # (--sp) it holds the process groups, as the frames of its error do
        _let_go_of_frames(args.sp, e)
        _leave_sequence_parallel(args.sp, finished=False)
        if _another_rank_failed(args.sp, e):
            return _stopped_by_another_rank()
        raise UserError(str(e)) from None

    n_chunks = math.ceil(len(pcm) / SAMPLE_RATE / session.chunk_seconds)
    per_chunk = int(round(session.chunk_seconds * SAMPLE_RATE))
    # the video spans the audio and no more: its last chunk's frames past the audio's end are left
    # out (2.0 s of speech made 2.24 s of video, 0.32 s of it 0.96 s from the teacher's windows)
    video_frames = math.ceil(len(pcm) * VIDEO_FPS / SAMPLE_RATE)
    written = 0
    t0 = time.perf_counter()
    finished = False  # every rank meets the others at the end only when none of them failed
    writer = None
    try:
        # every process runs the same stream on its shard of the tokens; one writes the file
        writer = Mp4Writer(out, session.width, session.height) if main_process else None
        # feed audio one chunk ahead of generation, as a live stream would
        session.push_audio(pcm[: 2 * per_chunk])
        # (without a standard error, `2>&-`, the bar's first write was an AttributeError: no video)
        no_bar = args.quiet or not main_process or sys.stderr is None
        for k in tqdm(range(n_chunks), desc="generating", unit="chunk", disable=no_bar):
            session.push_audio(pcm[(k + 2) * per_chunk : (k + 3) * per_chunk])
            frames, pts = session.next_chunk()
            frames = (from_time_zero(frames, pts, VIDEO_FPS) if k == 0 else frames)[: video_frames - written]
            written += len(frames)
            if writer:
                writer.write_frames(frames)
        if writer:
            writer.write_audio(pcm)
            writer.close()
        finished = True
    except MediaError as e:  # the writer's: a full disk
        _let_go_of_frames(args.sp, e)
        if writer:
            writer.abort()
        raise UserError(str(e)) from None
    except RuntimeError as e:
        _let_go_of_frames(args.sp, e)
        if writer:
            writer.abort()
        if not _another_rank_failed(args.sp, e):
            raise
        return _stopped_by_another_rank()
    except BaseException as e:
        _let_go_of_frames(args.sp, e)
        if writer:
            writer.abort()
        # Ctrl-C; SIGTERM, SIGHUP (`terminate_as_exit`); or an import such a stop failed
        if writer and is_stop(e):
            # ("interrupted" alone left its user to look whether --out was made, whole or in part)
            before = " (the file there is the one from before)" if out.exists() else ""
            try:  # (after SIGHUP its terminal may be gone: the stop is the thing to end with)
                print(f"streamgen generate: stopped: {out} not written, {written / VIDEO_FPS:.2f} s of "
                      f"{video_frames / VIDEO_FPS:.2f} s of video made{before}", file=sys.stderr)  # fmt: skip
            except OSError:
                pass
        raise
    finally:
        restore_handlers(terminated_before)
        session.close()
        width, height, frames_per_chunk = session.width, session.height, session.frames_per_chunk
        # (--sp) the sharded model holds the process groups, in reference cycles: let go of here, it
        # is collected as the ranks leave, so that the groups' threads end there, not in the
        # interpreter's shutdown (a run that succeeded aborted: docs/parallel.md)
        session = None
        _leave_sequence_parallel(args.sp, finished)
    if not main_process:
        return 0
    elapsed = time.perf_counter() - t0
    print(
        f"wrote {out} ({written / VIDEO_FPS:.2f} s of video, {width}x{height}, "
        f"{n_chunks * frames_per_chunk / elapsed:.1f} frames/s)"
    )
    return 0


def _check_replaceable(out: Path) -> None:
    """A UserError where `out` (a name without an MP4 suffix, or a link to one) is a file that is not
    empty and not an MP4 (ISO-BMFF: its first box, `ftyp`, at byte 4): a suffix-less name replaced any
    file at all, /etc/passwd run as root. A video from before, or a file named as one, is replaced."""
    from streamgen.cli import UserError

    if out.suffix.lower() in MP4_SUFFIXES or not out.is_file():
        return
    try:
        with open(out, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    if head and head[4:8] != b"ftyp":
        raise UserError(f"--out {out} is a file that is not an MP4: generate replaces only a video it "
                        "could have written; give another name (or remove the file)")  # fmt: skip


def _check_inputs_read_again(sp: int, audio: str, reference: str) -> None:
    """A ValueError where --audio or --reference is not a file (a pipe: `cat a.wav | ... --audio /dev/stdin`,
    `<(...)`, a FIFO), which each of the `sp` processes reads again after this one has: a pipe on stdin gave
    them no data ("Invalid data found"), `<(...)`'s /dev/fd/63 was not there, and a FIFO left them
    waiting for a writer for ever."""
    for flag, given in (("--audio", audio), ("--reference", reference)):
        if not stat.S_ISREG(os.stat(given).st_mode):
            raise ValueError(
                f"{flag} {given} is not a file (a pipe?): --sp {sp} starts {sp} processes that each read it "
                "again, after this one; save it to a file and give that"
            )


def _check_tiny_decoder(checkpoint: str, model: str) -> None:
    """A ValueError where the tiny decoder at `checkpoint` cannot be read, or does not fit the
    autoencoder of `model` (a model directory's, loaded alone: no DiT), as each process would find
    once it had loaded the whole model. A flavor's stand-in (random weights) is left to them."""
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderVAE
    from streamgen.models import load_autoencoder, resolve_model_dir

    try:
        decoder = TinyDecoder.from_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    directory = resolve_model_dir(model)
    if directory is not None:
        TinyDecoderVAE(load_autoencoder(directory), decoder)  # (its ValueError says what does not fit)


def _with_tiny_decoder(args):
    """The model, its autoencoder decoding through the tiny decoder at `args.tiny_decoder`."""
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderVAE
    from streamgen.models import load_model

    decoder = TinyDecoder.from_checkpoint(args.tiny_decoder).to(args.device).eval()  # a bad file first
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    model.vae = TinyDecoderVAE(model.vae, decoder)
    return model


def _another_rank_failed(sp: int, e: BaseException) -> bool:
    """Whether `e` is this --sp rank's collective failing because another rank had ended: that
    rank's error is the run's (this one printed a gloo traceback below it, ending "GLHF")."""
    from streamgen.parallel.torchrun import another_rank_failed

    return sp > 1 and another_rank_failed(e)


def _stopped_by_another_rank() -> int:
    from streamgen.parallel.torchrun import stopped_by_another_rank

    return stopped_by_another_rank("generate", os.environ.get("RANK", "?"))


def _let_go_of_frames(sp: int, e: BaseException) -> None:
    """(--sp) The frames of a failed run's error (its chunk's, the session among their locals) hold
    the sharded model, and so the process groups, as long as the error lives: a printed one to the
    interpreter's shutdown, where a gloo thread still running aborts the process after its error
    ("terminate called without an active exception"). Their locals are let go of before the ranks
    leave the groups, which collects the model; the error's lines still print."""
    if sp > 1:
        from streamgen.parallel.launch import clear_error_frames

        clear_error_frames(e)


def _leave_sequence_parallel(sp: int, finished: bool) -> None:
    if sp > 1:
        from streamgen.parallel.launch import leave_process_group

        leave_process_group(finished)


def _apply_sequence_parallel(session, sp: int) -> bool:
    """Shard the session's model over the torchrun processes; True on the process that writes."""
    if sp <= 1:
        return True
    from streamgen.parallel.apply import apply_sequence_parallel
    from streamgen.parallel.launch import init_sequence_parallel, is_main_process

    mesh, mode = init_sequence_parallel(sp, session.cfg.num_heads)
    apply_sequence_parallel(session.dit, mesh, mode)
    from streamgen.parallel.vae import parallel_decoder

    session.vae = parallel_decoder(session.vae, session.latent_hw[0])  # a band of rows per process
    return is_main_process()
