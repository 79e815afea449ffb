import os
import time

import pytest

import streamgen  # noqa: F401  (sets the OpenMP wait policy before any test imports torch)
from streamgen.models import ATTENTION_ENV, COMPILE_ENV, DTYPE_ENV, FP8_ENV


@pytest.fixture(autouse=True)
def _model_choices_stay_in_their_test(monkeypatch):
    """`use_attention_backend`, `use_precision` and `use_compile` choose for every model loaded afterwards, through
    the environment (so that model processes and torchrun ranks inherit them): what a test chooses
    is undone after it. (An empty value is no choice.)"""
    for name in (ATTENTION_ENV, DTYPE_ENV, FP8_ENV, COMPILE_ENV):
        monkeypatch.setenv(name, os.environ.get(name, ""))


# The browser tests' (tests/test_server_browser*.py): one Playwright and one Chromium with the
# fake microphone per test file, built only where a test asks for them.
@pytest.fixture(scope="module")
def playwright():
    from test_server_browser import playwright_with_chromium

    with playwright_with_chromium() as p:
        yield p


@pytest.fixture(scope="module")
def browser_page(playwright):
    from test_server_browser import SPEECH_WAV, chromium, chromium_args

    with chromium(playwright, chromium_args(SPEECH_WAV)) as context:
        yield context


@pytest.fixture(scope="module", params=["chromium", "firefox"])
def each_browser(request):
    """browser_page's Chromium, then `firefox`, for what the browsers do each their own way: media,
    WebSockets, fetch bodies."""
    if request.param == "chromium":
        yield request.getfixturevalue("browser_page")
        return
    yield request.getfixturevalue("firefox")


@pytest.fixture(scope="module")
def firefox(firefox_of_this_process):
    """A firefox-esr (tests/firefox_pages.py: the part of Playwright's pages the tests use, its clock
    the real one) for a test file, with no tab of an earlier file's open and none of its own left
    open after it; skipped where it is not installed."""
    with firefox_of_this_process.for_a_file() as browser:
        yield browser


@pytest.fixture(scope="session")
def firefox_of_this_process():
    """One Firefox per test process (`./run test` hands each worker whole files), not one per file: a
    start took 12-14 s here. Built only where a test asks for it; one that died is replaced."""
    from firefox_pages import FIREFOX, FirefoxOfAProcess

    if FIREFOX is None:
        pytest.skip("firefox not installed (apt-get install -y firefox-esr)")
    shared = FirefoxOfAProcess()
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture(scope="module")
def served():
    """`live_server` for a browser test file, one server per configuration, shared by the file's
    tests that ask for the same one: `with served(max_sessions=2) as (url, app)`. A server's start
    took ~1.5 s here, most of it the full collection of this process's heap (torch, Playwright) that
    ends its warm-up (freeze_loaded_heap), undone by each stop. A test gets the server with no session
    left on it by the one before (waited for, up to SESSIONS_GONE_S; a fresh server where one
    stays). Its counters (/metrics) go on from test to test: a test reads differences."""
    from contextlib import ExitStack, contextmanager

    from server_helpers import live_server

    servers: dict[tuple, tuple[ExitStack, tuple]] = {}

    def without_sessions(app) -> bool:
        deadline = time.monotonic() + SESSIONS_GONE_S
        while app.state.registry.sessions:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @contextmanager
    def server(**overrides):
        key = tuple(sorted((name, repr(value)) for name, value in overrides.items()))
        if key in servers and not without_sessions(servers[key][1][1]):
            servers.pop(key)[0].close()
        if key not in servers:
            stack = ExitStack()
            servers[key] = (stack, stack.enter_context(live_server(**overrides)))
        yield servers[key][1]

    try:
        yield server
    finally:
        for stack, _ in servers.values():
            stack.close()


SESSIONS_GONE_S = 10.0  # (a page's hang-up or close ends its session within a second)


def _torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (whatever this machine's default), restored after it."""
    yield from _torch_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it."""
    yield from _torch_threads(1)


@pytest.fixture
def server_reads(monkeypatch):
    """The bytes of each read the server's protocols are given (on the server's thread), counted by
    a wrapped `ConnectionLimits.data_received`: a test whose case is a request sent in several reads
    proves it was (a pause between sends alone lets a loaded machine read the parts at once)."""
    from server.connections import ConnectionLimits

    reads = []
    received = ConnectionLimits.data_received

    def counted(self, data):
        reads.append(len(data))
        return received(self, data)

    monkeypatch.setattr(ConnectionLimits, "data_received", counted)
    return reads


@pytest.fixture(scope="module", params=["httptools", "h11"])
def limited_server(request):
    """The port of a live server with a short deadline on a request's head and a bound of a few
    open connections (HEADER_TIMEOUT_S, MAX_CONNECTIONS), run with each of uvicorn's HTTP parsers:
    the raw-socket tests' (tests/test_server_connection*.py, test_server_http_conformance.py)."""
    from server_helpers import HEADER_TIMEOUT_S, MAX_CONNECTIONS, live_server

    with live_server(http=request.param, header_timeout_s=HEADER_TIMEOUT_S, max_connections=MAX_CONNECTIONS) as (url, _):
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def teachers_of_two_banks(tmp_path_factory):
    """tests/distill_two_banks.py's world, the banks of two autoencoders and a teacher of each (only
    read): test_distill_data's and test_distill_review3's, which made the same ones each, made once
    where both files run in one test process."""
    from distill_two_banks import make_teachers_of_two_banks

    return make_teachers_of_two_banks(tmp_path_factory.mktemp("two-banks"))


# `./run test` hands whole files to its two workers (--dist loadfile) in the order of the items,
# with xdist's own reordering (by number of tests) off: the files recorded as longest go first, so
# that no long file is started last while the other worker has nothing left. The seconds are a
# run's own (scripts/test_file_seconds.py writes tests/file_seconds.json from its --junitxml);
# stale ones cost only balance. Files not recorded go after, in their own order.
FILE_SECONDS = os.path.join(os.path.dirname(__file__), "file_seconds.json")


def pytest_collection_modifyitems(session, config, items):
    import json

    try:
        with open(FILE_SECONDS) as f:
            seconds = json.load(f)["seconds"]
    except (OSError, ValueError, KeyError):
        return
    def file(item) -> str:
        return item.nodeid.split("::")[0]

    first = {}
    for i, item in enumerate(items):
        first.setdefault(file(item), i)
    items.sort(key=lambda item: (-seconds.get(file(item), 0.0), first[file(item)]))  # (stable: a file's own order)
