r"""File names that are not valid UTF-8. On Linux a name is bytes; Python hands us each byte
that does not decode as a lone surrogate (os.fsdecode's "surrogateescape"), which opens the
file but cannot be written as UTF-8 (JSON, Parquet, a terminal, Postgres text).

`printable` writes each such byte as `\xNN` (Python's "backslashreplace" of the name's real
bytes): b"caf\xe9.jpg" is stored, exported and printed as the text `caf\xe9.jpg`. Valid names
are unchanged. `restore` is the inverse: it gives back the str that opens the file. The one
ambiguity: a valid name that itself contains a backslash, an `x` and two hex digits 80-ff is
read by `restore` as an escaped byte."""

from __future__ import annotations

import re

_ESCAPED = re.compile(rb"\\x([89a-f][0-9a-f])")


def has_control(text: str) -> bool:
    """A control character (a line break, a tab, DEL): an id or name with one cannot be
    named in an HTTP path, nor printed on one line."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def printable(name: str) -> str:
    """The name as valid UTF-8 text, undecodable bytes written as `\\xNN`."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the bytes the name was decoded from
    except UnicodeEncodeError:  # lone surrogates from elsewhere (e.g. JSON): show their code
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def restore(text: str) -> str:
    """The name `printable` made `text` from (`\\xNN` back to the byte), ready to open."""
    if "\\x" not in text:
        return text
    raw = _ESCAPED.sub(lambda m: bytes.fromhex(m[1].decode()), text.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")
