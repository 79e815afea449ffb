"""Speech for the avatar world: espeak-ng through its C library, with exact phoneme timing.

We call libespeak-ng directly (ctypes) in synchronous mode. Its synthesis
callback hands us PCM blocks together with events; phoneme and word events carry
the exact output sample at which they start (`espeak_EVENT.sample`), so every
clip knows precisely when each phoneme sounds. espeak-ng synthesises at 22050 Hz;
we resample to 16 kHz mono float32 in [-1, 1] (the project's audio format) and
convert the event positions with the same ratio.

The library is found through the PyPI package `espeakng-loader` (it ships the
shared library and its data); Debian's `libespeak-ng1` is the fallback. The
library keeps global state, so all synthesis in a process goes through one lock.
It reads its data through a view with steady copies of the voice variants
(`espeak_view`), which makes each sentence's speech depend on its text and voice alone.

A voice is a `Voice(language, variant, pitch, rate, pitch_range)`; `language` is
one of `LANGUAGES` (espeak voice names), `variant` one of `VARIANTS`
(espeak's `+variant` files, e.g. "f3", "m2", "klatt").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from streamgen.data import espeak_view

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

# espeak voice names of the languages the world speaks (sentence banks exist for these)
LANGUAGES = ("en-us", "en", "de", "fr", "es", "it")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "croak", "whisper",
)  # fmt: skip

# espeak_EVENT_TYPE values (speak_lib.h)
_EVENT_WORD = 1
_EVENT_SENTENCE = 2
_EVENT_END = 5
_EVENT_MSG_TERMINATED = 6
_EVENT_PHONEME = 7
_EVENT_LIST_TERMINATED = 0

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_INIT_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_PHONEMES_TRACE = 0x08  # espeakPHONEMES_TRACE: each word's dictionary look-up, to a FILE*
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class SpeechError(ValueError):
    """Bad speech input (unknown voice or language, empty or non-UTF-8 text) or a synthesis failure."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class Voice:
    language: str = "en-us"
    variant: str | None = None
    pitch: int = 50  # 0..100, espeak's base pitch
    rate: int = 165  # words per minute, 80..450
    pitch_range: int = 50  # 0..100, intonation range

    def espeak_name(self) -> str:
        # our copies of the variants (see espeak_view), "sg_default" when none is asked for
        return f"{self.language}+sg_{self.variant or 'default'}"

    def validate(self) -> None:
        if self.language not in LANGUAGES:
            raise SpeechError(f"unknown language {self.language!r}; choose one of {', '.join(LANGUAGES)}")
        if self.variant is not None and self.variant not in VARIANTS:
            raise SpeechError(f"unknown voice variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name, value, lo, hi in (
            ("pitch", self.pitch, 0, 100),
            ("rate", self.rate, 80, 450),
            ("pitch_range", self.pitch_range, 0, 100),
        ):
            if not lo <= value <= hi:
                raise SpeechError(f"voice {name} {value} is outside [{lo}, {hi}]")


@dataclass
class Phoneme:
    symbol: str  # IPA, as espeak-ng writes it (may carry stress marks)
    start: float  # seconds
    end: float


@dataclass
class Word:
    text: str
    start: float


@dataclass
class Utterance:
    """Synthesised speech: 16 kHz mono float32 PCM plus timed phonemes and words."""

    text: str
    voice: Voice
    audio: np.ndarray
    phonemes: list[Phoneme] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


_lock = threading.Lock()
_engine: _Engine | None = None


# A fork waits for the speech under way to end, and the child starts with the lock free. Held by another
# thread at the fork, the lock stayed held in the child, where no thread releases it: its first speech
# waited for good; given the child free but forked mid-synthesis, the library's state was half a
# sentence's, and the child's new engine (_engine_pid) on it crashed (SIGSEGV) or spoke otherwise.
os.register_at_fork(
    before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(), after_in_child=lambda: _lock.release()
)


class _Engine:
    """The loaded library, initialised once per process."""

    def __init__(self) -> None:
        lib_path, data_path = _find_library()
        self.lib = ctypes.CDLL(lib_path)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(self.lib, "espeak_ng_SetRandSeed"):  # older libraries: libc's rand() only
            self.lib.espeak_ng_SetRandSeed = lambda seed: None
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetVoiceByName.restype = ctypes.c_int
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]  # fmt: skip
        self.lib.espeak_Synth.restype = ctypes.c_int
        text_pointer = ctypes.POINTER(ctypes.c_void_p)
        self.lib.espeak_TextToPhonemes.argtypes = [text_pointer, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_SetPhonemeTrace.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.libc.tmpfile.restype = ctypes.c_void_p
        for name in ("fflush", "fileno", "rewind"):
            getattr(self.libc, name).argtypes = [ctypes.c_void_p]
        self._trace: int | None = None  # the FILE* espeak traces its dictionary look-ups to
        self._dots_readable: bool | None = None  # whether the trace tells abbreviations' dots (`clauses`)
        options = _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA | _INIT_DONT_EXIT
        # the data espeak-ng reads, steady variants among it (held: removed when no engine needs it)
        self._data_dir = espeak_view.data_view(lambda: _data_directory(data_path), VARIANTS)
        path = str(self._data_dir.path).encode()
        self.native_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, path, options)
        if self.native_rate <= 0:
            raise SpeechError(f"espeak-ng failed to initialise (data path {data_path})")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, bytes]] = []
        self._stopped: BaseException | None = None  # a Ctrl-C or a SystemExit met in the callback
        self._callback = _CALLBACK(self._on_synth)  # keep a reference: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav, num_samples, events) -> int:
        if self._stopped is not None:
            return 1  # (1 = stop: a Ctrl-C or a SystemExit came in a callback before, see _speak)
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == _EVENT_PHONEME:
                self._events.append((e.type, e.sample, e.text_position, bytes(e.id.string)))
            elif e.type == _EVENT_WORD:
                self._events.append((e.type, e.sample, e.text_position, e.length.to_bytes(4, "little")))
            i += 1
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, list]:
        if self.lib.espeak_SetVoiceByName(voice.espeak_name().encode()) != 0:
            raise SpeechError(f"espeak-ng has no voice {voice.espeak_name()!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        self.lib.espeak_SetParameter(_PARAM_RANGE, voice.pitch_range, 0)
        self.lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        self._chunks, self._events = [], []
        # espeak-ng adds random jitter and noise; reseeding before every sentence makes synthesis
        # a pure function of (text, voice), which per-seed determinism of the dataset needs
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0x5EED))
        self.libc.srand(0x5EED)
        status = self._speak(text.encode("utf-8") + b"\0")
        if status != 0:
            raise SpeechError(f"espeak-ng synthesis failed (status {status}) for text {text[:40]!r}")
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return pcm, self._events

    def _speak(self, data: bytes) -> int:
        """espeak_Synth of `data`, its status. A signal that comes while it runs is handled in the next
        call of the synthesis callback: its KeyboardInterrupt (Ctrl-C) or SystemExit (SIGTERM, see
        `terminate_as_exit`) was "Exception ignored on calling ctypes callback function", a traceback
        printed and the command going on as if not stopped. Here it ends the synthesis and is raised."""
        self._stopped = None
        unraisable_before = sys.unraisablehook

        def catch_stops(unraisable) -> None:
            if isinstance(unraisable.exc_value, KeyboardInterrupt | SystemExit):
                self._stopped = self._stopped or unraisable.exc_value
            else:
                unraisable_before(unraisable)

        sys.unraisablehook = catch_stops
        try:
            status = self.lib.espeak_Synth(data, len(data), 0, 1, 0, _CHARS_UTF8, None, None)
        finally:
            sys.unraisablehook = unraisable_before
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            raise stopped
        return status

    def clauses(self, text: str, voice: Voice) -> list[Clause]:
        """The phonemes espeak-ng would speak for `text`, clause by clause (`_read_clauses`). Where its
        trace no longer tells an abbreviation's dot ("Dr.") from a full stop, every dot counts as an
        abbreviation's: counted as full stops, a text full of them was estimated above its speech
        (en "Dr. Mr. Mrs. ..." 5.15 s for 3.19 s) and refused though it fit, where a full stop
        counted as a dot only makes the estimate lower (the speech that then does not fit is
        refused after its synthesis)."""
        if self._dots_readable is None:
            self._dots_readable = self._trace_tells_dots()
        clauses = self._read_clauses(text, voice)
        if not self._dots_readable:
            clauses = [c._replace(abbreviation=True) if c.closing == "." else c for c in clauses]
        return clauses

    # Texts whose dots espeak-ng's trace is known to tell apart: (language, text, each clause's dot
    # is an abbreviation's): a dictionary abbreviation ("$dot" flag), a replaced one ("Replace:")
    _DOT_PROBES = (
        ("en", "Dr. Lee left. He went.", [True, False, False]),
        ("es", "Sr. Díaz se fue. Ya.", [True, False, False]),
    )

    def _trace_tells_dots(self) -> bool:
        """Whether espeak-ng's phoneme trace (a debugging format, which this library's version may
        write otherwise) reads as `_has_dot_flag` expects, on `_DOT_PROBES`; logs an error if not.
        A probe whose voice this espeak-ng lacks tells nothing (raised, it failed every count after
        it): the other probe decides, and with none run, every dot counts as an abbreviation's."""
        probed = 0
        for language, text, expected in self._DOT_PROBES:
            try:
                clauses = self._read_clauses(text, Voice(language=language))
            except SpeechError as e:
                log.warning("espeak-ng's %s trace probe cannot run (%s): the other decides", language, e)
                continue
            probed += 1
            read = [c.abbreviation for c in clauses]
            if read != expected:
                log.error(
                    "espeak-ng's phoneme trace is not in the form streamgen reads (%r in %s: abbreviations' "
                    "dots read %s, expected %s; espeakng-loader %s): every dot now counts as an "
                    "abbreviation's, and the speech-length estimate is lower than it should be",
                    text, language, read, expected, _loader_version(),
                )  # fmt: skip
                return False
        if not probed:
            log.error("no probe of espeak-ng's phoneme trace ran: every dot counts as an abbreviation's")
        return probed > 0

    def _read_clauses(self, text: str, voice: Voice) -> list[Clause]:
        """The phonemes espeak-ng would speak for `text` (their ASCII names), clause by clause, each
        with the punctuation that closes it ("," ";" ":" "." "!" "?", or ""), without synthesising
        it: numbers, amounts and abbreviations come out as the words it reads. A clause's pause is
        not among its phonemes (espeak makes it from the punctuation)."""
        if self.lib.espeak_SetVoiceByName(voice.espeak_name().encode()) != 0:
            raise SpeechError(f"espeak-ng has no voice {voice.espeak_name()!r}")
        encoded = text.encode("utf-8")
        data = ctypes.create_string_buffer(encoded + b"\0")
        start = ctypes.addressof(data)
        position = ctypes.c_void_p(start)  # moved on one clause a call, NULL at the end
        # phoneme mode: ASCII names (bit 1 clear), '|' between a word's phonemes; ' ' between words;
        # with the trace bit, each word's dictionary flags go to the trace file
        mode = ord("|") << 8 | _PHONEMES_TRACE
        trace = self._trace_file()
        self.lib.espeak_SetPhonemeTrace(_PHONEMES_TRACE, trace)
        clauses = []
        try:
            while position.value:
                begin = position.value - start
                clause = self.lib.espeak_TextToPhonemes(ctypes.byref(position), _CHARS_UTF8, mode)
                names = (clause or b"").decode("utf-8", "replace").replace(" ", "|").split("|")
                # the text up to the clause's end: espeak leaves the position one character or two
                # into the next clause (the clause's own start is not reliable, its end is)
                end = position.value - start if position.value else len(encoded)
                upto = encoded[:end].decode("utf-8", "replace")[: -1 if position.value else None].rstrip()
                closing = upto[-1:] if upto[-1:] in CLAUSE_PUNCTUATION else ""
                if upto.endswith(("...", "…")):  # (espeak pauses 249 ms there, at "." 345 ms)
                    closing = "…"
                words = (upto.rstrip(".…") if closing == "…" else upto[:-1] if closing else upto).split()
                last_word = words[-1].lower().lstrip("¡¿(\"'") if words else ""
                traced = self._read_trace(trace)
                # an initial's dot ("J. R. R. Tolkien") is not in the dictionary, and espeak's speech
                # pauses 8-21 ms there too, not a full stop's 345 ms
                initial = len(last_word) == 1 and last_word.isalpha()
                abbreviation = closing == "." and (initial or _has_dot_flag(traced, last_word))
                # its words (what has a letter or digit: French "Ah !" is one); from one byte
                # before its start, its first character may be lost
                own = encoded[max(begin - 1, 0) : end].decode("utf-8", "replace")
                own = own[: -1 if position.value else None].split()
                count = sum(1 for word in own if any(c.isalnum() for c in word))
                clauses.append(Clause(closing, [name for name in names if name], count, abbreviation))
        finally:
            self.lib.espeak_SetPhonemeTrace(0, None)  # (synthesis traces nothing)
        return clauses

    def _trace_file(self) -> int:
        if self._trace is None:
            self._trace = self.libc.tmpfile()
            if not self._trace:
                raise SpeechError("could not open a temporary file for espeak-ng's trace")
        return self._trace

    def _read_trace(self, trace: int) -> str:
        """What espeak-ng traced since the last read, and the file emptied."""
        self.libc.fflush(trace)
        fd = self.libc.fileno(trace)
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")
        self.libc.rewind(trace)
        os.ftruncate(fd, 0)
        return text


class Clause(NamedTuple):
    closing: str  # the punctuation that closes it ("," ";" ":" "." "!" "?", "…" for "..."), or ""
    names: list[str]  # its phonemes' ASCII names
    words: int
    # closed by the dot of an abbreviation espeak's dictionary knows ("Dr.", "Mr.") or of an initial
    # ("J."): its speech makes a 10 ms pause there, not a full stop's
    abbreviation: bool


def _has_dot_flag(trace: str, word: str) -> bool:
    """Whether espeak's trace of a clause shows `word` looked up with the `$dot` flag, or replaced
    by the dictionary's words (an abbreviation: espeak-ng's speech does not end a sentence at its
    dot, its phoneme pass does)."""
    if not word:
        return False
    word = re.escape(word)
    flagged = rf"^(?:Found: '{word}'|Flags:\s+{word})\s.*\$dot\b"
    replaced = rf"^Replace: {word}\s"  # (Spanish "Sr." -> "señor": its speech does not pause there either)
    return re.search(f"{flagged}|{replaced}", trace, re.MULTILINE) is not None


def _loader_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("espeakng-loader")
    except PackageNotFoundError:  # (Debian's library)
        return "not installed"


def engine_version() -> str:
    """The espeak-ng that speaks the clips, as its library names its version, and the loader it came
    with ("not installed": the system's library): another one speaks them otherwise (their sound, their
    phonemes' timing), streamgen's code the same."""
    with _lock:
        lib = _engine_instance().lib
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        version = lib.espeak_Info(None)
    return f"espeak-ng {version.decode(errors='replace')} (espeakng-loader {_loader_version()})"


def _find_library() -> tuple[str, str | None]:
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except (ImportError, RuntimeError):
        pass
    name = ctypes.util.find_library("espeak-ng")
    if name is None:
        raise SpeechError(
            "espeak-ng library not found: pip install espeakng-loader (or apt install libespeak-ng1)"
        )
    return name, os.environ.get("ESPEAK_DATA_PATH")


def _data_directory(data_path: str | None) -> Path:
    """espeak-ng's data directory: `data_path`, or the system's (what `espeak_view` makes its view of)."""
    src = Path(data_path) if data_path else None
    if src is None or not (src / "phontab").exists():
        debian = ("/usr/lib/x86_64-linux-gnu/espeak-ng-data", "/usr/share/espeak-ng-data")
        candidates = [Path(p) for p in debian]
        src = next((p for p in candidates if (p / "phontab").exists()), None)
        if src is None:
            raise SpeechError("espeak-ng data directory not found (set ESPEAK_DATA_PATH)")
    return src


def _engine_instance() -> _Engine:
    """This process's engine, made anew where none is, or its data view was removed under it (see
    `espeak_view.DataView.gone`); its view marked as used."""
    global _engine
    if _engine is None or _engine_pid != os.getpid() or _engine._data_dir.gone():
        _set_engine(_Engine())
    _engine._data_dir.mark_used()
    return _engine


_engine_pid = -1


def _set_engine(engine: _Engine) -> None:
    global _engine, _engine_pid
    _engine, _engine_pid = engine, os.getpid()


def check_text(text: str | bytes) -> str:
    """Return the text as str, or raise SpeechError for empty or non-UTF-8 input, or one with a NUL."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpeechError(f"text is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise SpeechError(f"text must be str, got {type(text).__name__}")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise SpeechError("text is not valid UTF-8 (contains surrogate characters)")
    if "\0" in text:
        # espeak-ng reads C strings: the rest would be neither spoken nor counted. Refused rather
        # than spoken without it: a NUL has no spoken form, and one in a text is a client's bug
        # (a whole C buffer sent), what follows it as likely garbage as words
        raise SpeechError(f"text contains a NUL character (at character {text.index(chr(0))}); remove it")
    if not text.strip():
        raise SpeechError("text is empty")
    return text


# espeak's pause and language-switch marks in `clauses`: "_", "_!", "_:", ";", "(en)"
_NOT_SPOKEN = re.compile(r"[_:;!]+|\(\w+\)")
CLAUSE_PUNCTUATION = ",;:.!?"  # what closes a clause with a pause: "," ";" ":" shorter, "." "!" "?" longer


@dataclass(frozen=True)
class PhonemeCount:
    """What espeak-ng speaks for a text, counted from its text-to-phoneme translation."""

    unstressed: int  # phonemes without a stress mark: consonants, unstressed and reduced vowels
    stressed: int  # vowels with espeak's primary or secondary stress mark
    comma_pauses: int  # clauses closed by "," ";" or ":" before the last (its pause ends nothing)
    stop_pauses: int  # clauses closed by "." "!" or "?" before the last, of more than one word
    # one-word clauses closed by "." "!" or "?" ("Wow! Really?"): a short exclamation's last syllable
    # is not drawn out as a sentence's is; its pause is still a full stop's (332-374 ms)
    short_stop_pauses: int = 0
    abbreviation_dots: int = 0  # clauses closed by an abbreviation's dot ("Dr."), 10 ms of pause

    @property
    def phonemes(self) -> int:
        return self.unstressed + self.stressed


def count_phonemes(text: str | bytes, voice: Voice | None = None) -> PhonemeCount:
    """The phonemes espeak-ng speaks for `text` with `voice`, and the pauses between its clauses,
    from its text-to-phoneme translation (~3 ms for 750 characters, a few % of their synthesis)."""
    voice = voice or Voice()
    voice.validate()
    text = check_text(text)
    with _lock:
        clauses = _engine_instance().clauses(text, voice)
    names = [name for clause in clauses for name in clause.names if not _NOT_SPOKEN.fullmatch(name)]
    stressed = sum(1 for name in names if name[0] in "',")
    ended = clauses[:-1]  # (the last clause's pause ends nothing)
    stops = [c for c in ended if c.closing in (".", "!", "?") and not c.abbreviation]
    # as characters: a clause espeak cut where no punctuation closes it is "", in every string
    short = sum(1 for c in stops if c.words == 1)
    return PhonemeCount(
        unstressed=len(names) - stressed,
        stressed=stressed,
        # an ellipsis pauses less than a full stop (249 ms to 345), more than a comma (179 ms)
        comma_pauses=sum(1 for c in ended if c.closing in (",", ";", ":", "…")),
        stop_pauses=len(stops) - short,
        short_stop_pauses=short,
        abbreviation_dots=sum(1 for c in ended if c.abbreviation),
    )


def resample_to_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """int16 or float PCM at `rate` -> float32 at 16 kHz in [-1, 1]."""
    from math import gcd

    from scipy.signal import resample_poly

    x = pcm.astype(np.float32)
    if pcm.dtype == np.int16:
        x /= 32768.0
    if rate != SAMPLE_RATE and len(x):
        g = gcd(SAMPLE_RATE, rate)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return np.clip(x, -1.0, 1.0)


def synthesize(text: str | bytes, voice: Voice | None = None) -> Utterance:
    """Speak `text` with `voice`; returns 16 kHz audio with phoneme and word timings in seconds."""
    voice = voice or Voice()
    voice.validate()
    text = check_text(text)
    with _lock:
        engine = _engine_instance()
        pcm, events = engine.synthesize(text, voice)
        native = engine.native_rate
    if not pcm.any():  # ("...", "-", a zero-width space: a speak of it was answered as spoken)
        raise SpeechError(f"nothing to speak: espeak-ng makes no sound of {text[:40]!r}")
    audio = resample_to_16k(pcm, native)
    duration = len(audio) / SAMPLE_RATE
    encoded = text.encode("utf-8")
    phonemes: list[Phoneme] = []
    words: list[Word] = []
    for kind, sample, text_pos, payload in events:
        t = min(sample / native, duration)
        if kind == _EVENT_PHONEME:
            symbol = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            if phonemes:
                phonemes[-1].end = t
            phonemes.append(Phoneme(symbol, t, duration))
        else:
            length = int.from_bytes(payload, "little")
            # text_position counts characters from 1 (espeak); the slice is best effort for display
            start = max(text_pos - 1, 0)
            words.append(Word(encoded.decode("utf-8")[start : start + length], t))
    # espeak reports an empty phoneme name for pauses; keep them as silence "_"
    for p in phonemes:
        if not p.symbol.strip():
            p.symbol = "_"
    return Utterance(text, voice, audio, phonemes, words)
