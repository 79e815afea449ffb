"""A request target in absolute form held while it may be one (server/request_heads.AbsoluteTarget)."""

import pytest

from server import request_heads
from server.request_heads import AbsoluteTarget


class CountedPattern:
    """ABSOLUTE_START, counting the bytes it is given to match."""

    def __init__(self, pattern) -> None:
        self.pattern, self.looked_at = pattern, 0

    def match(self, data):
        self.looked_at += len(data)
        return self.pattern.match(data)


@pytest.mark.parametrize("target", [b"http://" + b"a" * 20_000, b"h" * 20_000, b"http://[" + b"1:" * 10_000],
                         ids=["authority", "scheme", "ipv6"])  # fmt: skip
def test_a_long_target_sent_a_byte_at_a_time_is_looked_at_a_few_times_a_byte(monkeypatch, target):
    """Each read matched the target's bytes held so far again: a 64 KiB target sent a byte at a time
    (within the head's bound and deadline) took the event loop 19 s. Each byte is looked at a few times."""
    counted = CountedPattern(request_heads.ABSOLUTE_START)
    monkeypatch.setattr(request_heads, "ABSOLUTE_START", counted)
    absolute = AbsoluteTarget()
    parsed = [absolute.feed(b"GET ")] + [absolute.feed(target[at : at + 1]) for at in range(len(target))]
    assert b"".join(parsed) == b"GET "  # (all of it held: it may yet be an absolute target's beginning)
    parsed.append(absolute.feed(b"/a HTTP/1.1\r\n"))
    assert counted.looked_at < 10 * len(target)
    expected = b"GET /a HTTP/1.1\r\n" if target.startswith(b"http:") else b"GET " + target + b"/a HTTP/1.1\r\n"
    assert b"".join(parsed) == expected


@pytest.mark.parametrize("line", [b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n", b"OPTIONS * HTTP/1.1\r\n\r\n"])
def test_a_target_in_origin_form_is_passed_as_it_came(line):
    """The common request is given to the parser at once, its bytes not copied."""
    absolute = AbsoluteTarget()
    assert absolute.feed(line) is line
    assert absolute.feed(b"more") == b"more" and absolute.authority is None
