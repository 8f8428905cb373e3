"""Credentials never leave in what clpipe logs, uploads or prints: one function strips them."""

from __future__ import annotations

import re

# `scheme://user:password@host`: the user info of a URI, anywhere in a text.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
# `?token=…` and the like: query parameters whose name says they hold a secret.
_SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&#\s]*(?:token|secret|password|key|credential)[^=&#\s]*=)[^&#\s]*",
                           re.IGNORECASE)


def without_credentials(value):
    """`value` (a text, or a config's dict or list) with the credentials of every URI in it
    removed: user info (`user:pass@`) and secret query parameters. What is logged, uploaded or
    printed goes through this; what connects keeps the real URI."""
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    if not isinstance(value, str):
        return value
    return _SECRET_QUERY.sub(r"\g<name>***", _USER_INFO.sub(r"\g<scheme>", value))
