import os

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


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (whatever this machine's default), restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


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
