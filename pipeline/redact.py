"""The one URL redactor: every message, log line or status output that shows a URL passes it
through :func:`redact_url` (free text through :func:`redact_text`).

What it removes, and why each case exists:

- userinfo: ``scheme://user:password@host`` → ``scheme://user:***@host``; a userinfo with no
  ``:`` (``https://TOKEN@host``, where the "user" is often the token itself) → ``***@host``.
  The host part is kept as written (IPv6 brackets, port), it never holds credentials.
- query and fragment parameters whose (percent-decoded) name looks like a credential
  (``password``, ``pass``, ``pwd``, ``secret``, ``token``, ``auth…``, ``…key``, ``credential``,
  ``signature``, ``sig``, ``session``) → ``name=***``. redis-py's ``Redis.from_url`` accepts
  ``?password=…`` (redis-py docs, "Connecting to Redis": URL query arguments override the
  ``from_url`` keyword arguments), and presigned S3 URLs carry ``X-Amz-Signature`` /
  ``X-Amz-Credential`` / ``X-Amz-Security-Token`` in the query.
- anything it cannot split unambiguously → ``<unparsable url>``, never the input: urlsplit
  raises ValueError (an unclosed IPv6 bracket, a bad port), or an ``@`` appears after the
  authority although the authority has none — an unencoded ``/``, ``?`` or ``#`` in a password
  (``redis://:pa/ss@host``) moves the rest of the password into the path, query or fragment.

It never raises. Non-``str`` input is converted with ``str()`` first.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

UNPARSABLE = "<unparsable url>"
MASK = "***"

_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|auth|key|credential|signature|^sig$|session", re.I)
# a URL inside free text: scheme://… up to whitespace or a quote/bracket that usually ends it
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>]*""")


def _redact_params(text: str) -> str:
    if not text:
        return text
    out = []
    for part in text.split("&"):
        name, eq, _value = part.partition("=")
        if _SECRET_PARAM.search(unquote(name.replace("+", " "))):
            out.append(f"{name}={MASK}")
        else:
            out.append(part if eq or not _SECRET_PARAM.search(unquote(part)) else MASK)
    return "&".join(out)


def redact_url(url: Any) -> str:
    """``url`` (``str``; anything else is ``str()``-ed) with credentials removed; see the module
    doc for the rules. Returns ``"<unparsable url>"`` when the URL cannot be split safely.
    Never raises."""
    try:
        text = url if isinstance(url, str) else str(url)
        parts = urlsplit(text)
        parts.port  # noqa: B018 — raises ValueError for a non-numeric or out-of-range port
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        start = text.find("//")
        rest = text[start + 2 + len(netloc):] if start >= 0 else text
        if not at and "@" in rest:
            return UNPARSABLE  # a password with an unencoded / ? or # spilled past the authority
        if at:
            user, colon, _password = userinfo.partition(":")
            hostport = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
        out = f"{parts.scheme}:" if parts.scheme else ""
        if netloc or text[len(out):].startswith("//"):
            out += "//" + hostport
        out += parts.path
        if parts.query or "?" in text:
            out += "?" + _redact_params(parts.query)
        if parts.fragment or "#" in text:
            out += "#" + _redact_params(parts.fragment)
        return out
    except Exception:  # noqa: BLE001 — a redactor must never raise nor echo its input
        return UNPARSABLE


def _redact_match(match: re.Match) -> str:
    url = match.group(0)
    core = url.rstrip(".,;:)]}!")  # sentence punctuation after a URL is not part of it
    return redact_url(core) + url[len(core):]


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://…`` URL in it passed through :func:`redact_url` (for
    exception messages and log values, which may embed a connection URL). Never raises."""
    if "://" not in text:
        return text
    try:
        return _URL_IN_TEXT.sub(_redact_match, text)
    except Exception:  # noqa: BLE001
        return UNPARSABLE


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def redact_message(text: str) -> str:
    """A library's error message about a URL it failed to parse, safe to show: URLs redacted
    (:func:`redact_text`) and every quoted value replaced by ``'…'`` — parsers quote the piece
    they rejected, which may be part of a password (urllib: "Port could not be cast to integer
    value as 'pa'" for ``redis://:pa/ss@host``). Never raises."""
    try:
        return _QUOTED.sub("'…'", redact_text(text))
    except Exception:  # noqa: BLE001
        return "<message withheld>"
