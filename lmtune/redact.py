"""Secrets out of everything a run writes, logs, tracks or pushes.

A config holds what the run needs in memory, credentials included (`tune.storage:
postgresql://user:pw@host/db`). Its serialised forms (config.yaml, model/lmtune.json, which `lmtune
push` uploads, tracker params, logs) go through `redact`: the password of a URL's user info, query
parameters and `key=value` pairs with secret names (token, password, api_key, signature ...), and
values of config keys with such names become `***`. The same rules as log shippers and MLflow's own
URI masking, applied once here so every writer agrees.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_WORDS = r"password|passwd|pwd|secret|token|access_token|auth_token|api_?key|apikey|access_key|private_key|" \
                r"credentials?|signature|sig|x-amz-signature|x-amz-credential|x-amz-security-token|sas"
# scheme://user:password@host -> scheme://user:***@host ; scheme://token@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s]*)(?::(?P<password>[^/?#\s]*))?@")
# ?token=...&x=1, password=... in a libpq DSN: the value up to a separator (not "word: ", which prose has)
_NAMED = re.compile(rf"(?P<name>(?<![A-Za-z0-9])(?:{_SECRET_WORDS}))(?P<sep>\s*=\s*)(?P<value>[^\s&;,'\"]+)", re.IGNORECASE)
# config keys whose whole value is a secret: hub_token, api_key, db_password (not max_new_tokens)
_SECRET_KEY = re.compile(rf"(^|_)({_SECRET_WORDS})$", re.IGNORECASE)


def _mask_userinfo(m: re.Match) -> str:
    if m.group("password") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)


def redact_text(text: str) -> str:
    """`text` with the credentials in its URLs and `secret=value` pairs masked."""
    if "@" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _NAMED.sub(lambda m: f"{m.group('name')}{m.group('sep')}{MASK}", text)
    return text


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` (dicts, lists, strings, anything else as is) safe to write: values under
    secret-named keys masked, credentials inside strings masked."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if isinstance(value, str):
        return MASK if value and is_secret_key(key) else redact_text(value)
    return value
