"""Which sessions' chunks the worker generates together, and when a session's chunks fall due.

Batching only happens among sessions whose chunks are due at the same time: a chunk
is never generated before it is due (its audio up to the cut-off may still be on its
way). Sessions start whenever their viewers connect, so left alone their chunk
schedules are spread over the chunk period and almost never meet: at 64x64 on the
2-core machine, 2 to 12 served sessions each cost the worker about a single
stream's 27-30 ms a chunk, where 8 generated together cost about 17 ms each. Two
things line them up:

- `join_schedule`: a session that starts streaming on a lane takes the schedule of
  the lane's sessions, its start moved by less than one chunk period (its first
  frame waits that long, once), and its playout delay sized for the batch it joins.
- `plan_batch`: when chunks are due, the worker waits for the lane's chunks due
  soon after them if every chunk of the batch still arrives before it plays. This
  gathers sessions whose schedules drifted apart (a late transport moves a session's
  clock, and its schedule with it).
- `pull_into_batch`: where waiting does not fit, sessions due soon after the batch are
  generated with it, and sooner from then on (their delay grows by as much).

`BatchTimes` is what both go by: the worker's measured times for a batch of k sessions, to
publish its chunks (what a play time waits for) and in all (their clean re-encodes after
publishing too: what the lane's chunk period must hold).
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

import numpy as np

HOLD_MARGIN = 1.2  # a held batch must fit 1.2x its expected time before the first of its play times
DELAY_MARGIN, DELAY_SLACK = 1.3, 0.02  # a playout delay: room for 1.3x a batch's time, plus 20 ms
SAME_SCHEDULE = 0.005  # seconds: sessions due this close together are on one schedule
# seconds: a session due this soon after a batch is generated with it, sooner from then on
# (`pull_into_batch`): two frame periods and a little, for a clock moved by a repeated frame.
REGROUP_WINDOW = 0.09


class BatchTimes:
    """Seconds the worker takes for a batch of k sessions' chunks, a moving average per k. A
    batch size not seen yet is estimated from its neighbours: between two, linearly; above the
    largest, at that one's time per session (generating together costs no more per session than
    apart); below the smallest, at that one's time (a smaller batch takes no longer).

    A size not timed in the last `stale_after` batches is taken no slower than that from the
    largest size below it timed since. A size timed too slow to fit (in a slowdown: another
    process on the cores) is not timed again, since the capacity then admits fewer sessions, and
    its old time held the capacity down for good (4 sessions where 9 fit: test_server_batching). A size
    that is truly slower in a bigger batch is thus admitted again after a while, and timed again."""

    def __init__(self, weight: float = 0.2, stale_after: int = 200):
        self.weight = weight
        self.stale_after = stale_after
        self._seconds: dict[int, float] = {}
        self._timed_at: dict[int, int] = {}  # size -> the count of batches timed when it was last timed
        self._timed = 0
        self._lock = threading.Lock()

    def observe(self, sessions: int, seconds: float) -> None:
        with self._lock:
            old = self._seconds.get(sessions)
            self._seconds[sessions] = seconds if old is None else old + self.weight * (seconds - old)
            self._timed += 1
            self._timed_at[sessions] = self._timed

    def estimate(self, sessions: int) -> float | None:
        """None until a batch has been timed."""
        with self._lock:
            known = dict(self._seconds)
            stale = {k for k, at in self._timed_at.items() if self._timed - at >= self.stale_after}
        for k in sorted(stale):
            fresher = [j for j in known if j < k and j not in stale]
            if fresher:
                j = max(fresher)
                known[k] = min(known[k], known[j] * k / j)
        if not known:
            return None
        if sessions in known:
            return known[sessions]
        below = [k for k in known if k < sessions]
        above = [k for k in known if k > sessions]
        if below and above:
            lo, hi = max(below), min(above)
            return known[lo] + (known[hi] - known[lo]) * (sessions - lo) / (hi - lo)
        if below:
            lo = max(below)
            return known[lo] * sessions / lo
        return known[min(above)]


@dataclass(frozen=True)
class Due:
    """One session as the planning sees it: when its next chunk falls due and when that chunk plays."""

    next_due: float
    plays_at: float  # next_due + the session's playout delay


def lane_dues(sessions) -> list[Due]:
    """The sessions' clocks as the planning sees them, each read at once (`Session.due_and_delay`)."""
    return [Due(next_due, next_due + delay) for next_due, delay in (s.due_and_delay() for s in sessions)]


def plan_batch(now: float, sessions: list[Due], ready_time) -> tuple[list[int], float | None]:
    """The batch to generate now, as indices into `sessions`, or ([], seconds to wait).

    Every session due by `now` is in it. Sessions due later join, in order, while the batch
    generated when the last of them falls due is still published (by `ready_time(k)`, with
    HOLD_MARGIN) before the first of their play times; if any joined, the answer is to
    wait for them (then plan again). None: nothing to wait for."""
    order = sorted(range(len(sessions)), key=lambda i: sessions[i].next_due)
    due = [i for i in order if sessions[i].next_due <= now]
    if not due:
        return [], (sessions[order[0]].next_due - now if order else None)
    plays_at = min(sessions[i].plays_at for i in due)
    hold_until = now
    for i in order[len(due) :]:
        s = sessions[i]
        expected = ready_time(len(due) + 1)
        first_play = min(plays_at, s.plays_at)
        if expected is None or s.next_due + HOLD_MARGIN * expected > first_play:
            break
        due.append(i)
        plays_at, hold_until = first_play, s.next_due
    if hold_until > now:
        return [], hold_until - now
    return due, None


def pull_into_batch(
    batch: list[int], sessions: list[Due], batch_time, chunk_seconds: float, max_delay: float,
    headroom: float = 0.85, ready_time=None, now: float | None = None,
) -> list[tuple[int, float]]:  # fmt: skip
    """The sessions not in `batch` (indices into `sessions`) to generate with it now although their
    chunks fall due up to REGROUP_WINDOW after the batch's, each with how much sooner: from then on
    it generates that much sooner (its delay grows by as much, up to its most; it plays as before,
    `Session.generate_sooner`), on the schedule of the sessions it is batched with.

    A group falls apart when some of its sessions' clocks move and others' do not: a frame
    repeated while a chunk came late (40 ms), a transport that connected after its first play
    time. `plan_batch` holds a batch for them only while every play time allows, which a small
    batch's delay does not for a repeated frame. In order of due time, while the grown batch takes
    at most `headroom` of the chunk period (`batch_time`: the worker's whole time for it). A
    session whose delay would grow past `max_delay` is pulled only when it cannot wait for the
    group's next batch instead (published, with HOLD_MARGIN, before its play time and before the
    group's next ones, as `plan_batch` holds it): pulled, its delay stops at the most and the rest
    is skipped; left out, one near its most ran a batch of its own every period with a 0.64 s
    period, and with 0.32 s beside a group at the floor of a batch of its own (too short to hold
    the batch); where the group's delay allows, its batch waits, skipping nothing
    (test_server_alignment_worker).

    With `ready_time` (what publishing a batch of k takes) and `now`, none is pulled that makes a
    batch that was to be published in time late for its first play time (or one pulled into it):
    `plan_batch` holds a batch for a later session only while the grown batch is in time, but the
    pulls grew it past that, and on random lanes its sessions came late (test_server_alignment_worker)."""
    due = max(sessions[i].next_due for i in batch)
    starts = due if now is None else max(now, due)
    first_play = min(sessions[i].plays_at for i in batch)
    next_plays_at = first_play + chunk_seconds  # the batch's next chunks
    # the first play time of the batch grown so far: a pull checked against the batch's own alone made
    # one pulled before it, playing sooner (a shorter delay), late (test_server_batching_review)
    in_time_for = first_play
    taken = set(batch)
    pulled: list[tuple[int, float]] = []
    for i in sorted(range(len(sessions)), key=lambda i: sessions[i].next_due):
        s = sessions[i]
        if i in taken:
            continue
        if s.next_due > due + REGROUP_WINDOW:
            break
        expected = batch_time(len(batch) + len(pulled) + 1)
        if expected is None or expected > headroom * chunk_seconds:
            break
        if ready_time is not None and _pull_makes_late(ready_time, len(batch) + len(pulled), starts,
                                                       min(in_time_for, s.plays_at)):  # fmt: skip
            continue
        # (`plan_batch` holds that batch for it only while the group's play times allow it too)
        waits_until = due + chunk_seconds + HOLD_MARGIN * expected
        if s.plays_at - due > max_delay and waits_until <= min(s.plays_at, next_plays_at):
            continue  # it waits for the group's next batch: nothing skipped
        pulled.append((i, s.next_due - due))
        in_time_for = min(in_time_for, s.plays_at)
    return pulled


def _pull_makes_late(ready_time, size: int, starts: float, plays_at: float) -> bool:
    """Whether a batch of `size` started at `starts`, published by `plays_at`, is not once grown
    by one. (A batch that is late already may grow: skipping the pull leaves the session a batch
    of its own, which costs the lane a pass.)"""
    grown, before = ready_time(size + 1), ready_time(size)
    if grown is None or before is None:
        return False
    return starts + before <= plays_at < starts + grown


def playout_delay(batch_seconds: float) -> float:
    """The delay a session needs when a batch of this many seconds generates its chunks (0.1 s
    at least, 1 s at most: beyond that a stream skips ahead instead)."""
    return min(1.0, max(0.1, DELAY_MARGIN * batch_seconds + DELAY_SLACK))


@dataclass(frozen=True)
class Schedule:
    """When a starting session's chunk 0 plays (`base`), how far ahead of playing its chunks are
    generated (`delay`), and the due time of the lane's group it joins (None: none)."""

    base: float
    delay: float
    joins: float | None = None


def join_schedule(
    base: float, delay: float, chunk_index: int, chunk_seconds: float, lane: list[Due], batch_time,
    ready_time=None, headroom: float = 0.85, fixed_delay: bool = False, max_delay: float = 1.0,
) -> Schedule:  # fmt: skip
    """The schedule of a session starting to stream on a lane whose sessions' clocks are `lane`
    (`lane_dues`): that of the group whose joining costs its viewer least, or as
    given (`base`, `delay`: the session's own, unaligned schedule) when the lane streams nothing
    or every group's batch would outgrow `headroom` of the chunk period. The cost counts the
    one-time wait for the first frame (`shift`) and the lasting delay alike, so a group due a
    little later can win over the soonest one when its smaller batch needs a shorter delay.

    Joining moves `base` later by less than one chunk period; the next chunk (`chunk_index`)
    then falls due with the group's. The delay is the one the grown batch needs to be published
    (`ready_time(k)`; default `batch_time`, which counts the whole of the worker's time for it)
    after the worker's hold for the group's later sessions (`LaneGroup.held`), unless
    `fixed_delay` (the operator set it) or the given one is smaller. The group's sessions need it
    too (`Session.hold_back`). Sized for the batch alone, a session joining a batch held 76 ms and
    the group's first were late every period (test_server_alignment_worker).

    A group is what the worker generates as one batch (`lane_group_indices`, with `max_delay`:
    `Session.MAX_DELAY`), as the capacity counts. By
    due times 5 ms apart, a session joined one of a batch's sessions as a batch of 2, its delay
    sized for that, while the worker made a batch of 4 of them, and its chunks came late every
    period (test_server_alignment_worker)."""
    ready_time = ready_time or batch_time
    best = Schedule(base, delay)
    for group in lane_groups(lane, chunk_seconds, batch_time, ready_time, max_delay):
        group_due = lane[group.members[0]].next_due
        expected, ready = batch_time(len(group.members) + 1), ready_time(len(group.members) + 1)
        if expected is None or ready is None or expected > headroom * chunk_seconds:
            continue
        # its chunks wait as long as the worker holds the batch for the group's later sessions
        joined_delay = delay if fixed_delay else min(delay, playout_delay(ready) + group.held)
        own_due = base - joined_delay + chunk_index * chunk_seconds
        shift = (group_due - own_due) % chunk_seconds
        if math.isclose(shift, chunk_seconds, abs_tol=1e-9):
            shift = 0.0
        if best.joins is None or shift + joined_delay < best.base - base + best.delay:
            best = Schedule(base + shift, joined_delay, group_due)
    return best


def phase_groups(
    dues: list[float], chunk_seconds: float, window: float = REGROUP_WINDOW
) -> list[list[float]]:
    """Due times grouped by `pull_into_batch`'s window alone: sessions that fall due together, this
    period or another (one that joined a group falls due with it a period later, the first time).
    `window`: how far after a batch's time a due time is still generated with it (REGROUP_WINDOW:
    `pull_into_batch`, which pulls those due after the batch, never before, and generates them
    with it from then on). Only after: taken either side of a group's first, due times 80 ms
    before and 80 ms after it were one group, which the worker ran as two batches every period
    when the one before fell due first (test_server_alignment_worker).

    The batches are played out from the earliest due time, as the worker meets them, for
    GROUPING_PERIODS periods: each takes the due times within `window` after its own, which move
    to it. Grouped from the period's start instead, (.28, .30 | .01, .08) were two groups of 2
    where the worker made one batch of 4 (the batch at .01 pulls .08, the one at .28 then both):
    a session joining the .28 pair had its delay sized for 3, and its chunks and the pair's came
    late (test_server_alignment_worker).

    Where the worker lines batches up, the groups are its batches played out (`lane_group_indices`:
    `plan_batch`'s holds, the headroom and the most delay count too); this one is for the batches
    of a worker that does not (`window` SAME_SCHEDULE)."""
    return [[dues[i] for i in group] for group in phase_group_indices(dues, chunk_seconds, window)]


GROUPING_PERIODS = 4  # a chain of pulls (each moves a session to a batch's time) settles within them


def phase_group_indices(
    dues: list[float], chunk_seconds: float, window: float = REGROUP_WINDOW
) -> list[list[int]]:
    """`phase_groups`, as indices into `dues`, each group in due order from its batch's time."""
    # (from the config or the sessions' clocks: a negative or NaN window took nothing and looped
    # forever, a chunk period of 0 divided by it, a negative or infinite one made one group of all)
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be a positive number of seconds, not {chunk_seconds!r}")
    if not (math.isfinite(window) and window >= 0):
        raise ValueError(f"the grouping window must be 0 or more seconds, not {window!r}")
    if not all(math.isfinite(due) for due in dues):
        raise ValueError(f"due times must be finite, not {dues!r}")
    if not dues:
        return []
    first = min(dues)
    # (due time, index): each in the period from the earliest, where the worker meets it
    queue = sorted((first + (due - first) % chunk_seconds, i) for i, due in enumerate(dues))
    batch_times: list[float] = []
    last_batch = [0] * len(dues)
    while queue[0][0] < first + GROUPING_PERIODS * chunk_seconds:
        at = queue[0][0]
        taken = bisect.bisect_right(queue, (at + window + 1e-9, len(dues)))
        members = [i for _, i in queue[:taken]]
        del queue[:taken]
        for i in members:
            last_batch[i] = len(batch_times)
            bisect.insort(queue, (at + chunk_seconds, i))
        batch_times.append(at)
    groups: dict[int, list[int]] = {}
    for i, batch in enumerate(last_batch):
        groups.setdefault(batch, []).append(i)
    return [
        sorted(members, key=lambda i: ((dues[i] - batch_times[batch] + 1e-9) % chunk_seconds, i))
        for batch, members in sorted(groups.items())
    ]


@dataclass(frozen=True)
class LaneGroup:
    """Sessions the worker generates as one batch (indices into the lane, in order of due time
    around the batch's), and how long after the first of them falls due it starts the batch
    (`plan_batch` holds it for the later ones)."""

    members: list[int]
    held: float


def lane_group_indices(
    lane: list[Due], chunk_seconds: float, batch_time, ready_time, max_delay: float,
    periods: int = GROUPING_PERIODS,
) -> list[list[int]]:  # fmt: skip
    """`lane_groups`, their members alone."""
    groups = lane_groups(lane, chunk_seconds, batch_time, ready_time, max_delay, periods)
    return [group.members for group in groups]


def lane_groups(
    lane: list[Due], chunk_seconds: float, batch_time, ready_time, max_delay: float,
    periods: int = GROUPING_PERIODS,
) -> list[LaneGroup]:  # fmt: skip
    """The lane's sessions (indices into `lane`) that the worker generates as one batch: its own
    planning played out on a clock of its own for `periods` chunk periods from the earliest due
    time, each batch taking `batch_time(k)` (the worker's whole time for it; `ready_time(k)`: to
    publish it, what `plan_batch` holds by), each session's pulls grown as `Session.generate_sooner`
    grows them (up to `max_delay`). A group is the sessions whose last batch was one; each in order
    of its due time around that batch's. Played out with `pull_into_batch`'s window alone (not
    `plan_batch`'s holds, the headroom or the most delay), the groups of 156 of 300 random lanes
    were not the worker's batches (test_lane_groups_are_the_batches_the_worker_makes)."""
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise ValueError(f"chunk_seconds must be a positive number of seconds, not {chunk_seconds!r}")
    if not all(math.isfinite(s.next_due) and math.isfinite(s.plays_at) for s in lane):
        raise ValueError(f"due and play times must be finite, not {lane!r}")
    if not lane:
        return []
    # each session's clock kept as `Session` keeps it (due: base - delay + chunks x period): a
    # pulled session falls due with its batch's others, and a rounding apart from them it is in
    # their batch or not (`plan_batch`: due by now); kept otherwise, 1 of 300 random lanes differed
    dues = [s.next_due for s in lane]
    delays = [s.plays_at - s.next_due for s in lane]
    bases, chunks = [s.plays_at for s in lane], [0] * len(lane)
    now = min(dues)
    end = now + periods * chunk_seconds
    batch_times: list[float] = []
    last_batch = [0] * len(lane)
    while now < end:
        sessions = [Due(due, due + delay) for due, delay in zip(dues, delays)]
        batch, wait = plan_batch(now, sessions, ready_time)
        if not batch:
            now += wait
            continue
        pulled = []
        if len(batch) < len(lane):
            pulled = pull_into_batch(batch, sessions, batch_time, chunk_seconds, max_delay,
                                     ready_time=ready_time, now=now)  # fmt: skip
        for i, sooner in pulled:  # as `Session.generate_sooner`: what would grow past the most plays sooner
            grown = min(delays[i] + sooner, max(delays[i], max_delay))
            bases[i] -= delays[i] + sooner - grown
            delays[i] = grown
        members = batch + [i for i, _ in pulled]
        for i in members:  # as `Session.finish_chunk`
            last_batch[i] = len(batch_times)
            chunks[i] += 1
            dues[i] = bases[i] - delays[i] + chunks[i] * chunk_seconds
        batch_times.append(now)
        now += batch_time(len(members)) or 0.0  # the worker plans again once the batch is done

    def around_its_batch(i: int) -> float:  # its due time less the batch's, within half a period
        offset = (lane[i].next_due - batch_times[last_batch[i]]) % chunk_seconds
        return offset - chunk_seconds if offset > chunk_seconds / 2 else offset

    groups: dict[int, list[int]] = {}
    for i, batch in sorted(enumerate(last_batch), key=lambda ib: ib[1]):  # in the order of their batches
        groups.setdefault(batch, []).append(i)
    ordered = (sorted(members, key=lambda i: (around_its_batch(i), i)) for members in groups.values())
    return [LaneGroup(members, max(0.0, -around_its_batch(members[0]))) for members in ordered]


def group_mates(
    others: list[Due], session: Due, chunk_seconds: float, batch_time, ready_time, max_delay: float
) -> list[int]:
    """The indices into `others` of the sessions the worker generates in one batch with `session`
    (`lane_group_indices`)."""
    groups = lane_group_indices(others + [session], chunk_seconds, batch_time, ready_time, max_delay)
    group = next(g for g in groups if len(others) in g)
    return [i for i in group if i < len(others)]


def sessions_that_fit(
    groups: list[int], batch_seconds, room: float, join_room: float, limit: int, joins: bool = True,
) -> int:  # fmt: skip
    """How many sessions a lane generates within `room` seconds a chunk period, when those it
    streams fall due in groups of these sizes: each group is a batch of its own, each batch pays
    its pass's fixed cost (`batch_seconds(k)`: the worker's time for a batch of k). Each session
    more joins a group whose grown batch takes at most `join_room` (`join_schedule`), or else
    starts a group of its own once none does; `joins` False: each starts its own (the worker does
    not align them). The sessions streaming count whatever they take: a lane past its room admits
    none more, and holds at least one.

    Which group a session joins depends on its phase and its delay (`join_schedule`), and several
    may be admitted before any of them streams: n more fit when they do however they are shared
    out among the groups. Counted one after another, each into the group it grew most then,
    batch times with a step (a batch of 5 50 ms slower than one of 4) said two more fitted a
    lane's groups of 2 and 3, and both joined the 3: 0.285 s of a 0.272 s room
    (test_server_batching)."""
    more = max(0, limit - sum(groups))
    seconds = {0: 0.0}

    def batch(k: int) -> float:  # each size's time read once (an estimate takes a lock)
        if k not in seconds:
            seconds[k] = batch_seconds(k)
        return seconds[k]

    def joins_taken(k: int) -> int:  # sessions more a group of k takes before it is full
        n = 0
        while joins and n < more and batch(k + n + 1) <= join_room:
            n += 1
        return n

    if sum(batch(k) for k in groups) > room:
        return max(1, sum(groups))
    # most[n]: the most time the streaming groups take with n sessions more shared out among them
    most = np.zeros(1)
    for k in groups:
        taken = joins_taken(k)
        grown = np.full(len(most) + taken, -np.inf)
        for x in range(taken + 1):  # x of them join this group
            np.maximum(grown[x : x + len(most)], most + batch(k + x), out=grown[x : x + len(most)])
        most = grown[: more + 1]
    # beyond what they take, groups of their own, each joined until it is full
    full = 1 + joins_taken(1)
    fit = 0
    for n in range(1, more + 1):
        if n < len(most):
            load = float(most[n])
        else:
            alone = n - (len(most) - 1)
            load = float(most[-1]) + (alone // full) * batch(full) + batch(alone % full)
        if load > room:
            break
        fit = n
    return max(1, sum(groups) + fit)
