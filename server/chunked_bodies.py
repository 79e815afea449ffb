"""A chunked request body's framing, looked at as its bytes come, before either parser has them.

uvicorn's two HTTP parsers read a chunked body (RFC 9112 7.1) differently: h11 waited on a chunk
size past 64 bits ('ffffffffffffffffffff', which llhttp refuses at once) for its data until the
body's deadline's 408, took an empty line or a trailer ended by a bare LF, a trailer folded onto a
line of its own or with a control character, and a control character in a chunk's extension, all of
which httptools refused, and refused a size of more than 20 digits ('0000000000000000000002') that
httptools took. Nor did anything find where such a body ends: a request sent after it in the same
read went to the parser with it, none of its head's checks made. `ChunkedBody` reads the framing
(each chunk's size line, its data, the CRLF after it, the trailers and the empty line that ends
them): one that either parser would refuse is refused here, the same under both, and where the
body ends is known, so that the bytes after it are the next request's. Its trailers are looked at
here and dropped, never given to a parser (RFC 9112 7.1.2 lets a recipient discard them, as h11 and
uvicorn did): llhttp refused a Content-Length or Transfer-Encoding among them as a head with both
(a 400), which h11 served.
"""

from __future__ import annotations

import re

from .request_heads import CONTROL_CHARACTER

NOT_PARSED = ("a chunked body's framing could not be parsed: each chunk is its size in hexadecimal (and its "
              "extensions, ';name=value') and CRLF, its data and CRLF, the last one's size 0, then its trailers "
              "and an empty line (RFC 9112, 7.1)")  # fmt: skip
# (each names what was malformed: the request head's words, for a chunk line or the trailers, sent a
# client looking in its headers)
SIZE_LINE_BARE_LF = "a chunk's size line ends in a bare LF: end it with CRLF (RFC 9112, 7.1)"
DATA_BARE_LF = "a chunk's data is followed by a bare LF: end it with CRLF (RFC 9112, 7.1)"
TRAILERS_BARE_LF = ("a line of the chunked body's trailers (or the empty line that ends them) ends in a bare LF: "
                    "end each line with CRLF (RFC 9112, 7.1.2)")  # fmt: skip
TRAILER_FOLDED = ("a line of the chunked body's trailers begins with a space or tab (a value folded onto a line of "
                  "its own, obs-fold): send each trailer on one line (RFC 9112, 5.2)")  # fmt: skip
TRAILER_CONTROL = "the chunked body's trailers have a control character, other than a tab (RFC 9110, 5.5)"
MAX_SIZE_DIGITS = 20  # h11's bound on a chunk size's digits (leading zeros too)
SIZE_TOO_LARGE = (f"a chunk's size must be below 2^64, in at most {MAX_SIZE_DIGITS} hexadecimal digits "
                  "(RFC 9112, 7.1)")  # fmt: skip
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2
QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'  # RFC 9110 5.6.4
# chunk-size [ chunk-ext ] (RFC 9112 7.1.1): no whitespace around its ';' or '=', which llhttp refuses
SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)((?:;%s(?:=(?:%s|%s))?)*)" % (TOKEN, TOKEN, QUOTED))
TRAILER_LINE = re.compile(rb"%s:.*" % TOKEN, re.DOTALL)
SIZE, DATA, DATA_END, TRAILERS, DONE = range(5)


class ChunkedBody:
    """Where a chunked body's framing is, fed its bytes as they come (`feed`): its lines are held to
    their end, within `max_framing_bytes` since the last chunk's data (past them, `too_large`)."""

    def __init__(self, max_framing_bytes: int) -> None:
        self.max_framing_bytes = max_framing_bytes
        self.state = SIZE
        self.line = bytearray()  # the size line's or the trailer's bytes so far
        self.framing_bytes = 0  # since the last chunk's data
        self.data_left = 0  # of the chunk being read
        self.data_end_seen = 0  # of the CRLF after its data
        self.too_large = False  # (why it was refused: its trailers past the bound, not their grammar)

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes) -> tuple[bytes, int, str | None]:
        """(the bytes for the parser, how many of `data`'s are the body's: all of them until its end
        comes, why its framing is refused or None). A line of its framing goes to the parser once it
        has ended and is taken: given it as it came, llhttp refused some of its bytes at once (its
        own 400, before this had the line whole)."""
        at, parsed = 0, bytearray()
        while at < len(data) and self.state != DONE:
            if self.state == DATA:
                taken = min(self.data_left, len(data) - at)
                parsed += data[at : at + taken]
                at, self.data_left = at + taken, self.data_left - taken
                if not self.data_left:
                    self.state, self.data_end_seen = DATA_END, 0
            elif self.state == DATA_END:
                byte = data[at : at + 1]
                if byte != b"\r\n"[self.data_end_seen : self.data_end_seen + 1]:
                    return bytes(parsed), at, DATA_BARE_LF if byte == b"\n" else NOT_PARSED
                parsed += byte
                at, self.data_end_seen = at + 1, self.data_end_seen + 1
                if self.data_end_seen == 2:
                    self.state, self.framing_bytes = SIZE, 0
            else:
                line_end = data.find(b"\n", at)
                piece = data[at : line_end + 1 if line_end >= 0 else len(data)]
                at += len(piece)
                self.line += piece
                self.framing_bytes += len(piece)
                if (refused := self._line_refused(ended=line_end >= 0)) is not None:
                    return bytes(parsed), at, refused
                if self.framing_bytes > self.max_framing_bytes:  # (trailers are fields, a 431; a size line's
                    # extensions are not: its 400 says so)
                    self.too_large = self.state == TRAILERS
                    return bytes(parsed), at, self._too_large()
                if line_end >= 0:
                    if self.state != TRAILERS or self.line == b"\r\n":  # (a trailer is dropped here: below)
                        parsed += self.line
                    self._line_ended()
        return bytes(parsed), at, None

    def _line_refused(self, ended: bool) -> str | None:
        """Why the size line's or the trailer's bytes so far (`ended`: with its LF) are refused, or None.
        A size line is looked at before it ends: a size past the bounds is refused as it comes."""
        line = bytes(self.line)
        if ended:
            if not line.endswith(b"\r\n"):
                return SIZE_LINE_BARE_LF if self.state == SIZE else TRAILERS_BARE_LF
            line = line[:-2]
        if b"\r" in line and (ended or b"\r" in line[:-1]):  # (a CR alone, not its line's end)
            return NOT_PARSED
        if self.state == SIZE:
            digits = re.match(rb"[0-9A-Fa-f]*", line)[0]
            if len(digits) > MAX_SIZE_DIGITS or (digits and int(digits, 16) >= 1 << 64):
                return SIZE_TOO_LARGE
            if ended and not SIZE_LINE.fullmatch(line):
                return NOT_PARSED
            return None
        if line[:1] in (b" ", b"\t"):
            return TRAILER_FOLDED
        if CONTROL_CHARACTER.search(line):
            return TRAILER_CONTROL
        if ended and line and not TRAILER_LINE.fullmatch(line):
            return NOT_PARSED
        return None

    def _too_large(self) -> str:
        bound = f"{self.max_framing_bytes // 1024} KiB"
        if self.too_large:
            return f"request trailers larger than {bound}"
        return f"a chunk's size line (with its extensions) longer than {bound}: send fewer extensions (RFC 9112, 7.1.1)"

    def _line_ended(self) -> None:
        line = bytes(self.line[:-2])
        self.line.clear()
        if self.state == TRAILERS:
            self.state = TRAILERS if line else DONE
            return
        self.data_left = int(SIZE_LINE.fullmatch(line)[1], 16)
        self.state = DATA if self.data_left else TRAILERS
