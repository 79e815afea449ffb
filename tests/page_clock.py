"""A test-side clock for the page's bounds (the give-ups of web/*.js: "no answer from the server in
20 s") that moves exactly the bound under test: Playwright's clock (page.clock) moves every timer of
the page, which would change what the page does (a stream's silence limit, its frames' play times),
and a Firefox page (tests/firefox_pages.py) has only the real clock, whose run_for waits it out.

A bound is the delay its timer is set with and the function of the page's that sets it, as named in
the stack as it is set (a name of web/*.js, the same in Chromium's stacks and Firefox's). The clock is
an init script, run before the page's modules in both browsers: the timers of its bounds keep real
time, and `run_for(ms)` moves theirs on by `ms` and fires those due, as Playwright's run_for does for
all; every other timer, and the page's words (its constants), are the page's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    ms: int  # the delay the page sets the timer with
    set_in: str  # the page's function that sets it


SPEAK_ANSWER = Bound(20_000, "sendSpeak")  # websocket.js: SPEAK_ANSWER_MS, a WebSocket speak's answer
SESSION_ANSWER = Bound(10_000, "sessionAnswer")  # api.js: ANSWER_MS, a session's creation
WHEP_ANSWER = Bound(10_000, "connectWebRTC")  # webrtc.js: WHEP_ANSWER_MS (its 5 s to connect not: 5000)
SESSION_CHECK = Bound(5_000, "checkSessionAlive")  # webrtc.js: SESSION_CHECK_MS
CONNECTION_LOST = Bound(5_000, "onconnectionstatechange")  # webrtc.js: a disconnected peer's 5 s to come back

BOUND_SET_MS = 10_000  # run_for's wait for the page to have set a bound's timer (it has, in the tests, when they run it)

# (%s: the bounds, [[ms, function], ...])
BOUND_CLOCK = """
(() => {
  const bounds = %s;
  const setAsAsked = window.setTimeout, clearAsAsked = window.clearTimeout;
  const named = (name) => new RegExp(`(^|[^\\\\w$])${name}([^\\\\w$]|$)`, "m");
  const isBound = (ms) => bounds.some(([bound, name]) => ms === bound && named(name).test(new Error().stack));
  let ahead = 0;  // the ms the test has run the bounds' clock for
  const now = () => performance.now() + ahead;
  const pending = new Map();  // the id the page was given -> {due, fire, real (the timer that fires it now)}
  let set = 0;  // the bounds' timers set so far
  window.setTimeout = function (callback, ms, ...args) {
    if (typeof callback !== "function" || !isBound(ms)) return setAsAsked(callback, ms, ...args);
    const timer = { due: now() + ms, fire: () => { pending.delete(id); callback(...args); } };
    const id = timer.real = setAsAsked(timer.fire, ms);
    pending.set(id, timer);
    set++;
    return id;
  };
  window.clearTimeout = function (id) {
    const timer = pending.get(id);
    if (timer) {
      pending.delete(id);
      clearAsAsked(timer.real);
    }
    return clearAsAsked(id);
  };
  window.boundClock = {
    set: () => set,
    runFor(ms) {
      ahead += ms;
      const soonestFirst = [...pending.entries()].sort(([, a], [, b]) => a.due - b.due);
      for (const [id, timer] of soonestFirst) {
        if (pending.get(id) !== timer) continue;  // (cleared by one fired before it)
        clearAsAsked(timer.real);
        if (timer.due <= now()) timer.fire();
        else timer.real = setAsAsked(timer.fire, timer.due - now());
      }
    },
  };
})();
"""


class BoundClock:
    """The clock of `bounds` on a page (Chromium's or Firefox's), added before it loads."""

    def __init__(self, page, *bounds: Bound):
        self.page = page
        self.bounds = [f"{bound.set_in} {bound.ms} ms" for bound in bounds]
        page.add_init_script(BOUND_CLOCK % json.dumps([[bound.ms, bound.set_in] for bound in bounds]))

    def run_for(self, milliseconds: int) -> None:
        """Moves the bounds' timers on; first waits (bounded) for one to have been set: a bound the
        page no longer sets as named (its function renamed) fails here, where the test would
        otherwise wait its real time out and pass."""
        try:
            self.wait_for_bound(timeout=BOUND_SET_MS)
        except Exception as e:
            raise AssertionError(f"no timer of the bounds {self.bounds} was set in {BOUND_SET_MS / 1000:.0f} s: "
                                 f"does web/*.js still set them so? ({type(e).__name__})") from None  # fmt: skip
        self.page.evaluate(f"window.boundClock.runFor({int(milliseconds)})")

    def wait_for_bound(self, timeout: float = 30_000) -> None:
        """Until one of the bounds' timers has been set (fired since or not: a run_for then moves nothing)."""
        self.page.wait_for_function("window.boundClock.set() > 0", timeout=timeout)


def installed_clock(page, *bounds: Bound):
    """The clock a test runs the page's bounds with: Playwright's, installed (every timer of the
    page's), where the page has it; on a Firefox page, whose clock is the real one, the bounds'."""
    from firefox_pages import RealClock

    if isinstance(page.clock, RealClock):
        return BoundClock(page, *bounds)
    page.clock.install()
    return page.clock
