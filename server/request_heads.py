"""What a request head's bytes may be, looked at as they come, before either parser has them.

uvicorn's two HTTP parsers took the same bytes differently: httptools (llhttp) refused a lowercase
or unknown method, a header folded onto a line of its own (obs-fold), a line ended by a bare LF and
a control character in a header's value, as a request that did not parse (400), where h11 served
them (a 405 'get is not allowed', a 200), and h11 refused the empty line before a request line that
httptools skipped, as RFC 9112 2.2 has a server do. Each is the same answer here, whichever parser
runs (`ConnectionLimits.data_received`): the empty lines skipped, the others a 400 saying which.
"""

from __future__ import annotations

import re

# the methods llhttp (httptools' parser) knows, which h11 must take no more of: one of them that the
# API has no route for is the app's 405 or 404 under either parser (PRI, HTTP/2's preface, is a 505)
METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND "
    b"REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE "
    b"MKCALENDAR LINK UNLINK SOURCE QUERY PRI".split()
)
LONGEST_METHOD = max(map(len, METHODS))
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
FOLDED = ("a header line begins with a space or tab (a value folded onto a line of its own, obs-fold): "
          "send each header on one line (RFC 9112, 5.2)")  # fmt: skip
BARE_LF = "a line of the request head ends in a bare LF: end each line with CRLF (RFC 9112, 2.2)"
CONTROL = "the request head has a control character, other than a tab, in its request line or a header (RFC 9110, 5.5)"
CONNECT = "CONNECT asks for a tunnel, a proxy's work: this server is not a proxy"
# (llhttp refused any other request line of PRI as a request that did not parse, once the line had
# ended without the preface's; h11 served it to the app: a 405 'PRI is not allowed on /healthz')
PRI = ("PRI is no HTTP/1.1 method: it begins HTTP/2's connection preface ('PRI * HTTP/2.0', RFC 9113, 3.4), which "
       "this server does not speak: send HTTP/1.1")  # fmt: skip
# (CR and LF are the lines' own; a CR alone both parsers refuse alike)
CONTROL_CHARACTER = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
BARE_LF_END = re.compile(rb"(?<!\r)\n")
LINE_FOLDED = re.compile(rb"\n[ \t]")
# the beginning of a request target in absolute form (RFC 9112 3.2.2), so far: its scheme, '://', its authority
ABSOLUTE_START = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*(?::(?:/(?:/([^/?#\s]*))?)?)?")


def method_refused(method_so_far: bytes, whole: bool) -> str | None:
    """Why a request line's method (its bytes so far; `whole` once its space has come) is refused,
    None for one llhttp knows or may yet be. A method that is not a token is a request that does
    not parse (`not_parsed`)."""
    if whole and method_so_far == b"CONNECT":  # (h11 took its authority for a path: a 404, kept alive)
        return CONNECT
    if (method_so_far in METHODS) if whole else any(m.startswith(method_so_far) for m in METHODS):
        return None
    if not TOKEN.fullmatch(method_so_far):
        return "not_parsed"
    name = method_so_far.decode("latin-1")[: LONGEST_METHOD + 8]
    return (f"unknown method {name!r}: methods are case-sensitive, and this server's are GET, HEAD, POST, PATCH, "
            "DELETE and OPTIONS")  # fmt: skip


def lines_refused(head: bytes, looked_at: int = 0) -> str | None:
    """Why a head's bytes (some of its lines, with the few before them: a CRLF may come split) are
    refused, or None. The first `looked_at` of them were looked at before: an LF among them ended a
    line whose CR may be gone from `head` (which took one read's boundary 2 bytes after a CRLF,
    '\\nCo' + 'nnection', for a bare LF)."""
    if BARE_LF_END.search(head, looked_at):  # (its look-behind sees the bytes before `looked_at`)
        return BARE_LF
    if LINE_FOLDED.search(head):
        return FOLDED
    if CONTROL_CHARACTER.search(head):
        return CONTROL
    return None


def version_refused(request_line_tail: bytes, spaces: int) -> str | None:
    """Why a request line (its last bytes, and how many spaces it had) names an HTTP version not
    spoken here, or None: HTTP/0.9's (no version: h11 refused it as one that did not parse, httptools
    served it to the app's 505), or one other than 1.0 and 1.1 (h11 served HTTP/1.2, httptools said
    505 without naming it). A version that is none (`http/1.1`) is a request that does not parse."""
    if spaces == 1:
        return "HTTP/0.9 is not spoken here: send HTTP/1.1"
    version = request_line_tail.rstrip(b"\r").rpartition(b" ")[2]
    if VERSION.fullmatch(version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return f"{version.decode()} is not spoken here: send HTTP/1.1"
    return None


class AbsoluteTarget:
    """A request line's bytes for the parser, a request target in absolute form (RFC 9112 3.2.2:
    `GET http://host/path?q`, as to a proxy) taken apart before either parser, which read it
    differently: llhttp refused one without a path ('http://host?x=1'), with an empty port
    ('http://host:/'), or whose host has RFC 3986's other characters ('a_b', 'a!b', '%31'), as a
    request that did not parse (a 400), where h11 served them, and gave the app the whole target as
    its path (a percent-encoded host cut the path's first letters: 'nothing at /ealthz'). Its
    `scheme` and `authority` are kept here (the request's host: ConnectionLimits._target_refused),
    the parser given its path and query as an origin form's ('/' where it has no path, RFC 9110
    4.2.3). A target's first bytes are held while they may be a scheme's and authority's (within the
    head's bound and deadline): its line's end ends them."""

    def __init__(self) -> None:
        self.in_target = False  # the method's space has come
        self.held = bytearray()  # the target's bytes so far, while they may be an absolute one's scheme and authority
        self.colon = None  # where the held bytes' first ':' (their scheme's end) is, once it has come
        self.decided = False
        self.scheme = self.authority = None  # (None: a target in another form)

    def feed(self, data: bytes) -> bytes:
        """The bytes of `data` (and those held before it) for the parser now."""
        if self.decided:
            return data
        passed = b""
        if not self.in_target:
            space = data.find(b" ")
            if space < 0:
                self.decided = b"\n" in data  # (a line without a space: the parser's to refuse)
                return data
            if data[space + 1 : space + 2] and not data[space + 1 : space + 2].isalpha():  # (origin form, '*')
                self.decided = True
                return data  # (as it came: no copy of the common request's bytes)
            self.in_target, passed, data = True, data[: space + 1], data[space + 1 :]
        # the held bytes, each an absolute target's so far, are not matched again: a few stand for
        # them ('a', its ':', '/' and '//'), as matching them all at each read took a 64 KiB target
        # sent a byte at a time 19 s of the event loop's time (quadratic)
        context = b"a" + self.held[self.colon : self.colon + 3] if self.colon is not None else b"a"[: len(self.held)]
        start = ABSOLUTE_START.match(context + data)
        if not (context or data) or (start and start.end() == len(context) + len(data)):  # (it may yet be one's beginning)
            if self.colon is None and (colon := data.find(b":")) >= 0:
                self.colon = len(self.held) + colon
            self.held += data
            return passed
        self.decided = True
        target, self.held = bytes(self.held) + data, bytearray()
        start = ABSOLUTE_START.match(target)  # (once)
        if not start or start[1] is None:  # (not in absolute form)
            return passed + target
        self.scheme, self.authority = target[: target.index(b":")], start[1].removesuffix(b":")  # (an empty port: none)
        rest = target[start.end() :]
        return passed + (b"" if rest.startswith(b"/") else b"/") + rest


class ContentLengths:
    """A head's Content-Length lines, counted as its bytes come: h11 merged a list of equal values
    ('2, 2') and repeated equal headers into one before anything read its headers, where httptools
    refused both. More than one, or a list, is refused under either parser. Its Transfer-Encoding
    lines are noted too: h11 refused one other than chunked beside a Content-Length for its coding
    before anything read its headers, where httptools refused it for having both."""

    NAME = b"content-length:"
    CODINGS = b"transfer-encoding:"
    # (RFC 9112 6.3 lets a server take repeated equal values as one, or refuse them: httptools refused them)
    REFUSED = "a request must have one Content-Length header, its value one number (RFC 9112, 6.3)"

    def __init__(self) -> None:
        self.line_start = b""  # the first bytes of the line that has not ended yet (enough for the names)
        self.line_has_comma = False
        self.lines = 0
        self.listed = False
        self.codings = False  # a Transfer-Encoding line came

    def refused(self, head_data: bytes) -> str | None:
        """Why the head's lines so far, with `head_data` (its bytes that came now), are refused, or None."""
        for ended, piece in enumerate(head_data.split(b"\n")):
            if ended:  # (a line ended before this piece)
                name = self.line_start.lower()
                if name.startswith(self.NAME):
                    self.lines += 1
                    self.listed = self.listed or self.line_has_comma
                self.codings = self.codings or name == self.CODINGS
                self.line_start, self.line_has_comma = b"", False
            self.line_start += piece[: len(self.CODINGS) - len(self.line_start)]
            self.line_has_comma = self.line_has_comma or b"," in piece
        return self.REFUSED if self.lines > 1 or self.listed else None
