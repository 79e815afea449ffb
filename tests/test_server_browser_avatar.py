"""The web page's choice of face in real headless Chromium (as test_server_browser.py; skipped
without it): an avatar button, or a picture of one's own."""

from __future__ import annotations

import json

import pytest
from server_helpers import png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def test_the_face_chosen_last_is_the_one_streamed(browser_page, tmp_path, served):
    """A picture chosen and then an avatar clicked: the avatar's button said it was the one, and the
    picture was streamed (the upload went whenever a file was chosen). The one chosen last goes
    now, and only its button (none, for a picture) says so; and none is chosen while it streams."""
    picture = tmp_path / "me.png"
    picture.write_bytes(png_bytes())
    with served(max_sessions=2) as (url, app):
        page = browser_page.new_page()
        created: list[str] = []  # how each POST /v1/sessions chose its face
        page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/sessions") and created.append(
            "upload" if "multipart" in r.headers["content-type"] else json.loads(r.post_data)["avatar"]))  # fmt: skip
        try:
            page.goto(f"{url}/?mic=0&transport=ws&avatar=sample")
            page.wait_for_selector("#avatars button[title='Ada']")
            pressed = "[...document.querySelectorAll('#avatars button')].filter((b) => b.ariaPressed === 'true').map((b) => b.title)"

            def connect_and_hang_up():
                page.click("#connect")
                page.wait_for_function("window.streamgenStats.state.startsWith('streaming')", timeout=60_000)
                # not to be changed while it streams: a button clicked then was pressed, and changed
                # nothing on the stage
                for control in ("#avatars button[title='Bo']", "#upload", "#caption"):
                    assert page.is_disabled(control), control
                # and looks it: the faces were as bright as ever, and clicking them did nothing
                faded = "Number(getComputedStyle(document.querySelector(\"#avatars button[title='Bo']\")).opacity)"
                assert page.evaluate(faded) < 1
                page.click("#hangup")
                assert page.is_enabled("#avatars button[title='Bo']") and page.evaluate(faded) == 1

            page.set_input_files("#upload", str(picture))
            assert page.evaluate(pressed) == []
            page.click("#avatars button[title='Ada']")
            assert page.evaluate(pressed) == ["Ada"]
            connect_and_hang_up()
            page.set_input_files("#upload", str(picture))
            assert page.evaluate(pressed) == []
            connect_and_hang_up()
            assert created == ["ada", "upload"]
        finally:
            page.close()


def test_an_avatar_the_server_does_not_have_is_said_in_the_pages_words(browser_page, served):
    """`?avatar=nobody` was sent, and the page showed the server's words for programs ("unknown
    avatar 'nobody'; see GET /v1/avatars") after a connect. The page says it as it loads, refuses
    a connect with it (no session made), and an avatar clicked then is the one streamed."""
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        created: list[str] = []
        page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/sessions") and created.append(
            json.loads(r.post_data)["avatar"]))  # fmt: skip
        try:
            page.goto(f"{url}/?mic=0&transport=ws&avatar=nobody")
            page.wait_for_selector("#avatars button[title='Ada']")
            said = 'no avatar "nobody" on this server'
            assert said in page.text_content("#notice")
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=30_000)
            assert said in page.text_content("#status") and "GET /v1/avatars" not in page.text_content("#status")
            assert created == [] and page.is_enabled("#connect")
            page.click("#avatars button[title='Ada']")
            page.click("#connect")
            page.wait_for_function("window.streamgenStats.state.startsWith('streaming')", timeout=60_000)
            assert created == ["ada"] and page.text_content("#notice") == ""
            page.click("#hangup")
        finally:
            page.close()


def test_a_picture_chosen_instead_of_an_unknown_avatar_takes_its_notice_away(browser_page, tmp_path, served):
    """`?avatar=nobody` is said as the page loads ('... choose one'); a picture chosen then left it
    there, asking for a face already chosen, until a connect (an avatar clicked took it away)."""
    picture = tmp_path / "me.png"
    picture.write_bytes(png_bytes())
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?mic=0&transport=ws&avatar=nobody")
            page.wait_for_selector("#avatars button[title='Ada']")
            assert 'no avatar "nobody" on this server' in page.text_content("#notice")
            page.set_input_files("#upload", str(picture))
            assert page.text_content("#notice") == ""
        finally:
            page.close()


def statuses_for_pictures(browser_page, served, pictures) -> list[str]:
    """The page's status after a connect with each of `pictures` chosen in turn, each refused (the
    page left ready for the next); and that the server made no session of any."""
    said = []
    with served(max_sessions=1) as (url, app):
        page = browser_page.new_page()
        try:
            page.goto(f"{url}/?mic=0&transport=ws")
            page.wait_for_selector("#avatars button[title='Ada']")
            for picture in pictures:
                page.set_input_files("#upload", str(picture))
                page.click("#connect")
                page.wait_for_function("window.streamgenStats.state.startsWith('failed')", timeout=30_000)
                said.append(page.text_content("#status"))
                assert page.is_enabled("#connect") and page.is_enabled("#upload")
                page.evaluate("window.streamgenStats.state = ''")
            assert not app.state.registry.sessions
        finally:
            page.close()
    return said


def test_a_picture_too_large_is_said_in_the_pages_words_with_the_limit(browser_page, tmp_path, served):
    """A picture over 4 MiB, or over 16 Mpixel, was refused in the server's words for programs:
    'failed: 413: request body of 4.84 MiB; the limit is 4 MiB', 'failed: 413: reference image is
    4100x4100 pixels; at most 16777216 pixels are accepted'. The page says what is wrong with the
    picture, and the server's limit, in a user's words now."""
    import numpy as np
    from PIL import Image

    heavy = tmp_path / "heavy.png"  # noise does not compress: 4.84 MiB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1300, 1300, 3), np.uint8)).save(heavy)
    wide = tmp_path / "wide.png"  # one colour: 48 KiB, but 16.8 Mpixel
    Image.new("RGB", (4100, 4100)).save(wide)
    assert statuses_for_pictures(browser_page, served, [heavy, wide]) == [
        "failed: your picture is 4.84 MiB, larger than this server takes (at most 4 MiB): choose a smaller one",
        "failed: your picture is 4100x4100 pixels, more than this server takes (at most 16.8 megapixels,"
        " as 4096x4096): choose a smaller one",
    ]


def test_a_file_that_is_no_picture_is_said_as_the_users_picture(browser_page, tmp_path, served):
    """A file chosen that is not an image (or is cut short, or too small) was said in the API's
    words for its field: 'failed: 415: reference is not an image (...)'. It is 'your picture' now,
    as the page calls it."""
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png_bytes()[:60])
    assert statuses_for_pictures(browser_page, served, [notes, cut]) == [
        "failed: your picture is not an image (PNG, JPEG, WebP, BMP or GIF)",
        "failed: your picture could not be decoded: image file is truncated",
    ]
