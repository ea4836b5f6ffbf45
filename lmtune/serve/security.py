"""API keys and PII masking for the service.

Keys come from an environment variable (comma-separated) or a file (one per line); they are
compared in constant time and never logged. Log lines pass through a filter that masks e-mail
addresses, phone numbers and long digit runs (card / ID numbers) whatever logged them.
"""
from __future__ import annotations

import hmac
import logging
import os
import re
from pathlib import Path

from lmtune.errors import InputError

KEYS_ENV = "LMTUNE_API_KEYS"

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"\b(?:\d[ -]?){12,19}\b")  # card and account numbers
_ID = re.compile(r"\b\d{6}(?:19|20)\d{9}[\dXx]\b|\b\d{3}-\d{2}-\d{4}\b")  # CN resident ID, US SSN
# No dots inside and none around: "26123.5ms" (a latency) and "127.0.0.1" (an address) are not phone numbers.
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d[\d ()-]{6,}\d(?![\w.])")
STRUCTURED = "lmtune_structured"  # LogRecord attribute: fields we format ourselves (status, latency, ids), never masked


def _phone(m: re.Match) -> str:
    return "<phone>" if sum(c.isdigit() for c in m.group()) >= 8 else m.group()


def mask_pii(text: str) -> str:
    text = _EMAIL.sub("<email>", text)
    text = _ID.sub("<id>", text)
    text = _CARD.sub("<number>", text)
    return _PHONE.sub(_phone, text)


class PiiFilter(logging.Filter):
    """Masks free text in every record; records marked STRUCTURED carry only fields we produced
    ourselves (their free-text parts already masked) and pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, STRUCTURED, False):
            return True
        msg = record.getMessage()
        masked = mask_pii(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


def load_keys(key_file: str | None = None) -> list[str]:
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise InputError(f"{p}: API key file not found.")
        keys += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    short = [k for k in keys if len(k) < 16]
    if short:
        raise InputError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return keys


def key_ok(given: str | None, keys: list[str]) -> bool:
    """Constant-time check against every key (no early exit that would leak which one matched)."""
    if not given:
        return False
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok
