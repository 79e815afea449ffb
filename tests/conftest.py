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
