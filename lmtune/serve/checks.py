"""What every lmtune service checks in a request's text, and what of an error it may log."""
from __future__ import annotations

from pathlib import Path

from lmtune.data.readers import is_invisible


def text_problem(text: str, max_chars: int) -> tuple[int, str] | None:
    """Why a text cannot be predicted (status, reason), or None. Checked per request, before it is
    queued, so one bad text costs its own request a 4xx and never a batch."""
    if len(text) > max_chars:
        return 413, f"has {len(text)} characters; the limit is {max_chars}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return 422, f"is not valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}); send UTF-8 text"
    if not text.strip() or is_invisible(text):
        return 422, "is empty or only invisible characters (NUL, zero-width, control)"
    return None


def error_origin(e: BaseException) -> str:
    """The exception's type and where it was raised, never its message: messages (a tokenizer's, a
    JSON decoder's) can quote the user's text, which the log must not hold."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(e).__name__}{where}"
