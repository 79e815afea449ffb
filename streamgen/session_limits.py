"""What a stream's start takes, in one place for the API, the WebSocket protocol, the commands and
the stream itself; no heavy imports, so that argument parsing and the wire format stay light."""

# seeds are whole numbers in [0, SEED_END): what a stream draws when given none, and what the API
# and the commands take (numpy's generators refuse a negative one, torch's one of 64 bits or more)
SEED_END = 2**31
SEED_RANGE = f"[0, 2**{SEED_END.bit_length() - 1})"  # as the error messages write it

# the longest caption the API and the commands take: the text encoder keeps its first 128 tokens,
# and a longer one lost its end without a word
MAX_CAPTION_CHARS = 500


class CaptionError(ValueError):
    """A caption a stream cannot take (too long, not text, or text the model has no encoder for):
    the API's 422 `bad_caption`, told from a stream's other ValueErrors, which are not the caption's."""


class CaptionsUnavailable(RuntimeError):
    """Captions this install cannot encode (the caption encoder's package, the 'text' extra, is not
    there): the server's fault, not the caption's: the API's 503 `captions_unavailable`."""


def text_problem(text: str) -> str | None:
    """Why `text` cannot be spoken or used as a caption, or None. JSON's "\\ud800" and a command
    line's invalid UTF-8 bytes (decoded with surrogateescape) give strings with lone surrogates,
    which no encoder takes: the tokenizer raised a TypeError (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not Unicode text"
    return None


def caption_problem(text: str) -> str | None:
    """Why `text` cannot be a caption, or None: `text_problem`, or a NUL character, which a speak's
    text is refused for too (streamgen.data.speech.check_text): it has no meaning in a caption, and
    one there is a client's bug (a whole C buffer sent), what follows it as likely garbage as words."""
    if "\0" in text:
        return f"text contains a NUL character (at character {text.index(chr(0))}); remove it"
    return text_problem(text)
