"""Debian's firefox-esr driven over WebDriver BiDi, with the part of Playwright's Page the browser
tests use (goto, evaluate, wait_for_function, add_init_script, click, check, console events), so that
a test runs its page in Firefox as in Chromium. Playwright drives only its own Firefox build (which
cannot be downloaded here), and its BiDi driver asks firefox-esr 153 for commands it does not have
(emulation.setMediaFeaturesOverride).

Not here: Playwright's clock, routes and request events; a test that needs them runs in Chromium only.
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,  # a generated microphone, granted without asking
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    # WebRTC to the server on this machine: loopback candidates, host addresses not hidden behind
    # mDNS names (Chromium's --allow-loopback-in-peer-connection, WebRtcHideLocalIpsWithMdns off)
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "browser.startup.homepage_override.mstone": "ignore",
}
START_S = 60.0  # firefox's start, to its BiDi line (a few seconds; more on a loaded machine)
COMMAND_S = 60.0  # one command's answer (a navigation waits for the page's load)


class BidiError(AssertionError):
    pass


class FirefoxBrowser:
    """One firefox-esr (headless, a profile of its own with FIREFOX_PREFS), its BiDi session."""

    def __init__(self, prefs: dict | None = None):
        from websockets.sync.client import connect

        self.closing = ExitStack()
        self.profile = tempfile.mkdtemp(prefix="streamgen-firefox-")
        Path(self.profile, "user.js").write_text(
            "".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in {**FIREFOX_PREFS, **(prefs or {})}.items())
        )
        self.process = subprocess.Popen(
            [FIREFOX, "--headless", "--no-remote", "--remote-debugging-port=0", "--profile", self.profile],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        address: queue.Queue[str] = queue.Queue()

        def read_stderr():  # (read to its end: a full pipe would stop firefox)
            for line in self.process.stderr:
                found = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
                if found:
                    address.put(found.group(1))

        threading.Thread(target=read_stderr, daemon=True).start()
        try:
            socket = connect(address.get(timeout=START_S) + "/session", max_size=None, open_timeout=START_S)
            self.socket = self.closing.enter_context(socket)  # (closed by stop)
        except queue.Empty:
            self.stop()
            raise BidiError(f"firefox did not start its WebDriver BiDi in {START_S:.0f} s") from None
        self.ids = itertools.count(1)
        self.answers: dict[int, queue.Queue] = {}
        self.listeners: dict[str, list] = {}  # browsing context -> callbacks of its events
        self.lock = threading.Lock()
        self.connected = True  # (until the reader meets the socket's end)
        threading.Thread(target=self._read, daemon=True).start()
        self.send("session.new", {"capabilities": {}})
        self.send("session.subscribe", {"events": ["log.entryAdded"]})

    def _read(self):
        from websockets.exceptions import ConnectionClosed

        try:
            for text in self.socket:
                message = json.loads(text)
                if "id" in message and message["id"] in self.answers:
                    self.answers[message["id"]].put(message)
                elif message.get("type") == "event":
                    source = message["params"].get("source", {}).get("context")
                    for listener in self.listeners.get(source, []):
                        listener(message["method"], message["params"])
        except ConnectionClosed:
            pass
        finally:
            self.connected = False
            for answer in list(self.answers.values()):  # (a command of a browser gone fails now, not in COMMAND_S)
                answer.put({"type": "error", "error": "no browser", "message": "firefox's WebDriver BiDi closed"})

    def send(self, method: str, params: dict) -> dict:
        with self.lock:
            number = next(self.ids)
            answer: queue.Queue = queue.Queue()
            self.answers[number] = answer
            self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        try:
            message = answer.get(timeout=COMMAND_S)
        except queue.Empty:
            raise BidiError(f"firefox did not answer {method} in {COMMAND_S:.0f} s") from None
        finally:
            self.answers.pop(number, None)
        if message.get("type") == "error":
            raise BidiError(f"{method}: {message.get('error')}: {message.get('message')}")
        return message["result"]

    def new_page(self) -> FirefoxPage:
        context = self.send("browsingContext.create", {"type": "tab"})["context"]
        return FirefoxPage(self, context)

    def alive(self) -> bool:
        return self.process.poll() is None and self.connected

    def tabs(self) -> set[str]:
        """The browsing contexts of its top level (a tab each; a page's frames are their children)."""
        return {context["context"] for context in self.send("browsingContext.getTree", {"maxDepth": 0})["contexts"]}

    def close_tab(self, context: str) -> None:
        self.listeners.pop(context, None)
        self.send("browsingContext.close", {"context": context})

    def stop(self):
        try:
            if getattr(self, "socket", None) is not None:
                try:
                    self.send("browser.close", {})
                except Exception:
                    pass  # (a browser that does not close is ended below)
            self.closing.close()
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


class ConsoleMessage:
    def __init__(self, kind: str, text: str):
        self.type, self.text = kind, text


class RealClock:
    """Playwright's page.clock as far as the tests use it, on the real clock: Firefox's page keeps its
    own timers, so time run for is waited for (a test so run takes that much longer)."""

    def install(self) -> None:
        pass

    def run_for(self, milliseconds: float) -> None:
        time.sleep(milliseconds / 1000)


class FirefoxPage:
    """A tab, used as a Playwright Page is: a script added runs in each document it loads, before
    the page's own; evaluate answers what JSON carries."""

    def __init__(self, browser: FirefoxBrowser, context: str):
        self.browser, self.context = browser, context
        self.clock = RealClock()
        self.handlers: dict[str, list] = {"console": [], "pageerror": []}
        browser.listeners[context] = [self._event]

    def _event(self, method: str, params: dict):
        if method != "log.entryAdded":
            return
        # an uncaught error or rejection, Playwright's "pageerror"; and more than that: an error Firefox
        # reports for the page's scripts (a fetch's body stream that failed, read or not) comes here too
        if params.get("type") == "javascript":
            for handler in self.handlers["pageerror"]:
                handler(params.get("text", ""))
            return
        kind = {"warn": "warning"}.get(params.get("method", "log"), params.get("method", "log"))
        for handler in self.handlers["console"]:
            handler(ConsoleMessage(kind, params.get("text", "")))

    def on(self, event: str, handler) -> None:
        self.handlers[event].append(handler)

    def add_init_script(self, source: str) -> None:
        # (run by indirect eval, as a script of the page's: its functions and vars are the page's globals;
        # not in the document of no address Firefox makes in a new tab as its first navigation starts,
        # where Chromium runs none)
        self.browser.send("script.addPreloadScript", {
            "functionDeclaration": f"() => {{ if (location.href) (0, eval)({json.dumps(source)}); }}",
            "contexts": [self.context],
        })  # fmt: skip

    def goto(self, url: str) -> None:
        self.browser.send("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str):
        """`expression`, or a function's source (called), awaited; its value through JSON."""
        # (a script's completion value, statements allowed, as in Playwright; a function is called)
        is_function = re.match(r"^\s*(async\s*)?(\([^)]*\)|\w+)\s*=>|^\s*(async\s+)?function\b", expression)
        source = f"({expression})" if is_function else expression
        call = f"(0, eval)({json.dumps(source)})" + ("()" if is_function else "")
        result = self.browser.send("script.evaluate", {
            "expression": f"(async () => JSON.stringify(await {call}))()",
            "target": {"context": self.context}, "awaitPromise": True, "resultOwnership": "none",
        })  # fmt: skip
        if result["type"] == "exception":
            raise BidiError(f"evaluate {expression!r}: {result['exceptionDetails'].get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value.get("type") == "string" else None

    def wait_for_function(self, expression: str, timeout: float = 30_000) -> None:
        deadline = time.monotonic() + timeout / 1000
        while not self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise BidiError(f"timed out ({timeout / 1000:.0f} s) waiting for {expression}")
            time.sleep(0.1)

    def wait_for_selector(self, selector: str, timeout: float = 30_000) -> None:
        self.wait_for_function(f"document.querySelector({json.dumps(selector)})", timeout)

    def wait_for_timeout(self, milliseconds: float) -> None:
        time.sleep(milliseconds / 1000)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def check(self, selector: str) -> None:
        if not self.evaluate(f"document.querySelector({json.dumps(selector)}).checked"):
            self.click(selector)

    def uncheck(self, selector: str) -> None:
        if self.evaluate(f"document.querySelector({json.dumps(selector)}).checked"):
            self.click(selector)

    def is_enabled(self, selector: str) -> bool:
        return not self.evaluate(f"document.querySelector({json.dumps(selector)}).disabled")

    def is_disabled(self, selector: str) -> bool:
        return not self.is_enabled(selector)

    def text_content(self, selector: str) -> str:
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")

    def input_value(self, selector: str) -> str:
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).value")

    def fill(self, selector: str, text: str) -> None:
        self.evaluate(f"""() => {{
            const field = document.querySelector({json.dumps(selector)});
            field.value = {json.dumps(text)};
            field.dispatchEvent(new Event("input", {{ bubbles: true }}));
        }}""")

    def close(self) -> None:
        self.browser.close_tab(self.context)


class FirefoxOfAProcess:
    """The one firefox-esr of a test process (tests/conftest.py): a start took 12-14 s on a loaded
    2-core machine, once per test file before. Started when a test first asks for it; one that died
    (or lost its BiDi socket) is replaced by a new one at the next file's start."""

    def __init__(self):
        self.browser: FirefoxBrowser | None = None
        self.first_tabs: set[str] = set()  # (left open: closing a window's last tab closes the window)

    @contextmanager
    def for_a_file(self):
        """The browser for one file's tests, as if it were theirs alone: it has no tab but its first
        when they begin, and the tabs they leave open (a page still streaming would load the next
        file's tests) are closed at the file's end."""
        if self.browser is not None and not self.browser.alive():
            self.stop()
        if self.browser is None:
            self.browser = FirefoxBrowser()
            self.first_tabs = self.browser.tabs()
        browser = self.browser
        self.close_tabs_opened_since_its_start()
        try:
            yield browser
        finally:
            if browser is self.browser and browser.alive():
                self.close_tabs_opened_since_its_start()

    def close_tabs_opened_since_its_start(self) -> None:
        for context in self.browser.tabs() - self.first_tabs:
            self.browser.close_tab(context)

    def stop(self):
        if self.browser is not None:
            browser, self.browser = self.browser, None
            browser.stop()
