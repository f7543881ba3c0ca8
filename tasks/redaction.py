"""Tracking URIs fit to print or store: credentials in a URI never reach a log line, tag, link or error.

Credentials belong in MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, but a URI such as
http://user:pw@host works too (requests takes them from it), so everything that names the
tracking URI shows it through `redact_uri`, and error messages that may quote one through
`redact_text`.
"""

from __future__ import annotations

import re

_URI_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


def redact_uri(uri: str) -> str:
    """`uri` with its user info (`user:password@`, `token@`) replaced by `***@`.

    It cuts to the last `@`, not to what urllib parses as the host: a password with an unencoded
    `/`, `?` or `#` fools the parser.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact_text(text: str) -> str:
    """Every URI in free text (an error message quoting a request URL) through `redact_uri`."""
    return _URI_IN_TEXT.sub(lambda uri: redact_uri(uri.group()), text)
