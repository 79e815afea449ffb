from contextlib import contextmanager, suppress

import numpy as np
import pytest

from streamgen.data.speech import SAMPLE_RATE, SpeechError, Voice, synthesize


@pytest.mark.parametrize("language", ["en-us", "de", "fr", "es", "it"])
def test_languages_give_16k_audio_with_ordered_phonemes(language):
    u = synthesize("Hello, this is a small test of speech.", Voice(language, "f2", pitch=60, rate=170))
    assert u.audio.dtype == np.float32 and u.audio.ndim == 1
    assert 0.5 < u.duration < 5 and np.abs(u.audio).max() <= 1.0
    assert len(u.phonemes) > 10 and u.words
    starts = [p.start for p in u.phonemes]
    assert starts == sorted(starts) and starts[-1] < u.duration
    assert all(p.end >= p.start for p in u.phonemes)


def test_phoneme_timing_matches_the_sound():
    u = synthesize("Mama papa mama papa.", Voice("en-us", "m3"))
    rms = lambda p: float(
        np.sqrt(np.mean(u.audio[int(p.start * SAMPLE_RATE) : int(p.end * SAMPLE_RATE)] ** 2))
    )
    open_vowels = [rms(p) for p in u.phonemes if "ɑ" in p.symbol]
    stops = [rms(p) for p in u.phonemes if p.symbol == "p"]
    # the stop's closure is nearly silent, the open vowel is the loudest sound: timings line up
    assert len(open_vowels) == 4 and len(stops) == 4
    assert min(open_vowels) > 3 * max(stops)


def test_synthesis_is_a_function_of_text_and_voice():
    voice = Voice("en-us", "m1", pitch=40, rate=150)
    a = synthesize("The captain found a blue box.", voice)
    synthesize("Something else in between.", Voice("de", "f4"))
    b = synthesize("The captain found a blue box.", voice)
    assert np.array_equal(a.audio, b.audio)
    c = synthesize("The captain found a blue box.", Voice("en-us", "m1", pitch=70, rate=150))
    assert not np.array_equal(a.audio[: len(c.audio)], c.audio[: len(a.audio)])


@pytest.mark.parametrize(
    "text, voice, message",
    [
        ("hi", Voice("xx-yy"), "unknown language"),
        ("hi", Voice("en-us", "robot9"), "unknown voice variant"),
        ("", Voice(), "empty"),
        ("   \n", Voice(), "empty"),
        (b"\xff\xfe bad", Voice(), "UTF-8"),
        # espeak-ng reads C strings: what follows a NUL was neither spoken nor counted
        ("Hello.\0 And the rest.", Voice(), "NUL character"),
        ("hi", Voice(rate=5), "rate"),
        # punctuation alone, a zero-width space: 8 ms of silence, and a speak of it answered as spoken
        ("...", Voice(), "nothing to speak"),
        ("-", Voice(), "nothing to speak"),
        ("\u200b", Voice(), "nothing to speak"),
    ],
)
def test_bad_input_is_one_clear_error(text, voice, message):
    with pytest.raises(SpeechError, match=message):
        synthesize(text, voice)


def test_a_ctrl_c_during_synthesis_stops_it():
    """A signal that came while espeak-ng spoke was handled in its synthesis callback, where the
    KeyboardInterrupt was "Exception ignored on calling ctypes callback function": printed, and lost
    (`data make` and `data preview` went on after a Ctrl-C or a SIGTERM)."""
    import signal

    before = synthesize("Hello there.")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    handler = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)  # (a long text: still being spoken then)
        with pytest.raises(KeyboardInterrupt):
            synthesize("This sentence is spoken again and again. " * 200)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
    after = synthesize("Hello there.")  # (the engine speaks as before)
    assert np.array_equal(before.audio, after.audio) and before.phonemes == after.phonemes


@pytest.fixture
def own_espeak_engine(tmp_path, monkeypatch):
    """The test's own espeak-ng engine and view, in `tmp_path`; after it, the next speech makes an engine
    anew. espeak-ng is one library a process: the engine monkeypatch put back was no longer the one the
    library called back, on a view it read, so a later test's speech in the same process heard nothing
    ("nothing to speak"), or called back into a collected engine."""
    import tempfile

    from streamgen.data import espeak_view, speech

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(speech, "_engine", None)
    monkeypatch.setattr(espeak_view, "_view", None)  # (made anew in tmp_path)
    yield
    speech._engine_pid = -1  # (torn down before monkeypatch puts the earlier engine back)


@contextmanager
def _where_a_child_waits(folder):
    """`where(pid)`: what a forked child that did not end waits on, the child then killed. Its Python
    threads' stacks come from the faulthandler it inherited, dumped on SIGUSR1 (to a file in
    `folder`), its kernel's wait from /proc. (A CI run's child once did not end in 60 s, beside the
    threads of a live Firefox, and nothing told where it stood.)"""
    import faulthandler
    import os
    import signal
    import time

    with open(folder / "stacks.txt", "w+") as stacks:

        def where(pid: int) -> str:
            try:
                wchan = open(f"/proc/{pid}/wchan").read()
                os.kill(pid, signal.SIGUSR1)
                deadline = time.monotonic() + 10
                while not os.path.getsize(stacks.name) and time.monotonic() < deadline:
                    time.sleep(0.1)  # (the dump is the child's to write)
                return f"kernel wait {wchan!r}; Python:\n{open(stacks.name).read()}"
            except OSError as e:  # (ended meanwhile)
                return f"no state ({e})"
            finally:
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        try:
            yield where
        finally:
            faulthandler.unregister(signal.SIGUSR1)


def _speak_in_the_child() -> None:
    import gc

    synthesize("The child speaks.", Voice("de"))
    gc.collect()  # (the engine it inherited, a reference cycle through its callback, collected)


def test_a_forked_child_that_speaks_leaves_its_parents_espeak_view_and_no_folder_of_its_own(
    tmp_path, own_espeak_engine, tmp_path_factory
):
    """Each process made its espeak-ng data view, a TemporaryDirectory, on its first speech. A forked
    child (a DataLoader's or a fork Pool's worker) made its own and ended with os._exit, which runs no
    clean-up: its view stayed in the temp folder (the streamgen-espeak-* folders test runs left); and
    the engine it inherited, dropped and collected, removed the PARENT's view, whose next voice then
    failed to load. The child now speaks through its parent's view, which only the parent removes."""
    import gc
    import multiprocessing

    synthesize("The parent speaks.")
    views = sorted(p.name for p in tmp_path.iterdir())
    assert len(views) == 1
    # The child's gc.collect() is for the engine it inherits. Garbage this worker's earlier test files
    # left uncollected (browser drivers, event loops, their threads' objects) would be finalised in the
    # child too, away from the threads its finalisers may wait on: collected here first, it is not.
    gc.collect()
    child = multiprocessing.get_context("fork").Process(target=_speak_in_the_child)
    with _where_a_child_waits(tmp_path_factory.mktemp("child-stacks")) as where:
        child.start()
        child.join(60)
        if child.exitcode is None:
            pytest.fail(f"the forked child did not end in 60 s: {where(child.pid)}")
    assert child.exitcode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == views
    assert (tmp_path / views[0] / "voices" / "!v" / "sg_f4").is_file()
    assert len(synthesize("Der Vater spricht.", Voice("de", "f4")).audio) > 0  # a voice not loaded before


def test_the_espeak_view_of_a_killed_process_is_removed_by_the_next_one(tmp_path, own_espeak_engine):
    """A process killed (SIGKILL, the out-of-memory killer, a test's kill of its server) runs no
    clean-up: its view, 244 files, stayed in the temp folder for good, one more at every kill. The
    next view made there removes those whose process has ended, and not a live one's."""
    import os
    import subprocess
    import sys

    from streamgen.files import HOST_TAG

    speak_and_die = "from streamgen.data.speech import synthesize; synthesize('Hi.'); import os; os.kill(os.getpid(), 9)"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", speak_and_die], env=env, timeout=120)
    assert killed.returncode == -9
    (left,) = tmp_path.iterdir()  # (the killed process's view)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        alive = tmp_path / f"streamgen-espeak-{HOST_TAG}-{live.pid}-abcd1234"
        alive.mkdir()
        synthesize("The next one speaks.")
        assert not left.exists() and alive.is_dir()
        assert len(list(tmp_path.iterdir())) == 2  # (the live one's and this one's)
    finally:
        live.stdin.close()
        live.wait(60)


def test_a_child_forked_while_a_thread_speaks_speaks_as_any_process(own_espeak_engine):
    """A fork while another thread spoke: the engine's lock stayed held in the child, where no thread
    releases it, and the child's first speech waited for good; the lock given to the child free, the
    library's state was half a sentence's, and the child's speech crashed it (SIGSEGV) or sounded
    otherwise. A fork now waits for the speech under way to end; each child speaks as any process."""
    import os
    import threading
    import time

    expected = synthesize("The child speaks.").audio
    stop = threading.Event()

    def keep_speaking() -> None:  # (the lock held most of the time: a fork comes mid-synthesis)
        while not stop.is_set():
            synthesize("This sentence is spoken again and again. " * 10)

    speaker = threading.Thread(target=keep_speaking)
    speaker.start()
    exits = []
    try:
        for _ in range(4):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:  # (the child: 0 if it spoke as expected, whatever else happens)
                same = False
                try:
                    same = np.array_equal(synthesize("The child speaks.").audio, expected)
                finally:
                    os._exit(0 if same else 1)
            deadline, ended = time.monotonic() + 60, 0
            while not ended and time.monotonic() < deadline:
                ended, status = os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
            if not ended:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            exits.append(os.waitstatus_to_exitcode(status) if ended else "never ended")
    finally:
        stop.set()
        speaker.join(120)
    assert exits == [0, 0, 0, 0]


def _old_named_view(temp, name: str, our_variants: bool = True, read_ago_s: float = 3 * 86400):
    """A folder of the previous views' naming (a TemporaryDirectory's `streamgen-espeak-XXXXXXXX`),
    written three days ago, its variant last read `read_ago_s` ago."""
    import os
    import time

    view = temp / name
    (view / "voices" / "!v").mkdir(parents=True)
    written = time.time() - 3 * 86400
    if our_variants:
        variant = view / "voices" / "!v" / "sg_default"
        variant.write_text("language variant\nname default\n")
        os.utime(variant, (time.time() - read_ago_s, written))
    for folder in (view / "voices" / "!v", view / "voices", view):
        os.utime(folder, (written, written))
    return view


def test_stale_espeak_views_of_the_previous_naming_are_removed_and_no_other(tmp_path, own_espeak_engine):
    """The views made before each named its process (`streamgen-espeak-XXXXXXXX`, 244 files each) were
    never removed by anyone: the clean-up of ended processes' views reads a PID from the name, which
    these lack. A new view now removes those of them that are ours and stale (a folder of our
    variants, none of them read or written for two days: a process still speaking through one reads
    its variant at every voice it sets); not a fresh one, not a folder of that name of another's."""
    import os
    import time

    stale = _old_named_view(tmp_path, "streamgen-espeak-abcd_123")
    in_use = _old_named_view(tmp_path, "streamgen-espeak-efgh4567", read_ago_s=3600)
    not_a_view = _old_named_view(tmp_path, "streamgen-espeak-ijkl8901", our_variants=False)
    elsewhere = _old_named_view(tmp_path / "elsewhere", "a-view", our_variants=True)
    linked = tmp_path / "streamgen-espeak-mnop2345"
    linked.symlink_to(elsewhere)
    a_file = tmp_path / "streamgen-espeak-qrst6789"
    a_file.write_text("a user's")
    os.utime(a_file, (time.time() - 3 * 86400,) * 2)
    assert len(synthesize("The next one speaks.").audio) > 0
    assert not stale.exists()
    assert in_use.is_dir() and not_a_view.is_dir() and a_file.is_file()
    assert linked.is_symlink() and (elsewhere / "voices" / "!v" / "sg_default").is_file()


def test_a_process_whose_espeak_view_was_removed_makes_another_and_marks_the_one_it_uses(
    tmp_path, own_espeak_engine, monkeypatch
):
    """A view whose process cannot be asked after (another host's, on a shared temp folder) is removed
    once unused for days: a server idle that long found its view gone, and its next voice failed to
    load ("espeak-ng has no voice"). Speech now makes a new view where its own is gone, and marks the
    one it speaks through as used (its folder's time) however its file system keeps read times."""
    import os
    import shutil
    import time

    from streamgen.data import espeak_view

    synthesize("The server speaks.")
    (view,) = tmp_path.iterdir()
    days_ago = time.time() - 3 * 86400
    os.utime(view, (days_ago, days_ago))
    monkeypatch.setattr(espeak_view, "_MARK_EVERY_S", 0.0)  # (marked at most once an hour otherwise)
    synthesize("The server speaks again.")
    assert view.stat().st_mtime > days_ago + 86400
    shutil.rmtree(view)  # (as another host's next view removes it)
    assert len(synthesize("Der Server spricht.", Voice("de", "f4")).audio) > 0  # a voice not loaded before
    (new_view,) = tmp_path.iterdir()
    assert new_view != view and (new_view / "voices" / "!v" / "sg_f4").is_file()


def test_stale_espeak_views_of_other_hosts_are_removed_and_no_live_one(tmp_path, own_espeak_engine):
    """A view's process is asked after on its own host alone (and PID namespace: a container's views
    are another host's): the views of other hosts that share the temp folder (a shared home, a /tmp
    that outlives its containers) were never removed, 244 files each. The next view now removes those
    of them that are ours and unused for two days (`mark_used`: a process marks its view hourly as it
    speaks, and makes another where its own was removed); not a fresh one, nor one of this host
    whose process lives, however old."""
    import subprocess
    import sys

    from streamgen.files import HOST_TAG

    other = "otherhost_0123456789ab"
    stale = _old_named_view(tmp_path, f"streamgen-espeak-{other}-4242-abcd1234")
    in_use = _old_named_view(tmp_path, f"streamgen-espeak-{other}-4243-efgh5678", read_ago_s=3600)
    not_a_view = _old_named_view(tmp_path, f"streamgen-espeak-{other}-4244-ijkl9012", our_variants=False)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        old_but_alive = _old_named_view(tmp_path, f"streamgen-espeak-{HOST_TAG}-{live.pid}-mnop3456")
        assert len(synthesize("The next one speaks.").audio) > 0
        assert not stale.exists()
        assert in_use.is_dir() and not_a_view.is_dir() and old_but_alive.is_dir()
    finally:
        live.stdin.close()
        live.wait(60)
