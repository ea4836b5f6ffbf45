"""The checks every request passes before any route: the Host header, the token, the POST header.

Host: a web page that rebinds its DNS name to 127.0.0.1 is same-origin with the dashboard, so it could
send the X-Lmtune-UI header, start jobs and read their event streams. Its requests still carry its own
name in Host, so, like Jupyter's check_host and the Vite / webpack dev servers, only the names the
dashboard was bound to are answered: localhost, the loopback addresses, and the configured --host
(bound to every interface, 0.0.0.0 or ::, any IP address too: a rebinding page always has a name).
"""
from __future__ import annotations

import ipaddress

from fastapi import Request
from fastapi.responses import JSONResponse

from lmtune.serve.security import key_ok

COOKIE = "lmtune_ui_token"
LOCAL_NAMES = ("localhost",)
WILDCARDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The name in a Host header, without its port and IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:7860
        name, sep, rest = header[1:].partition("]")
        return name if sep and (not rest or rest[0] == ":") else ""
    if header.count(":") == 1:  # name:port (a bare IPv6 address without brackets is not a valid Host)
        header = header.split(":")[0]
    return header.rstrip(".") if ":" not in header else ""


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host header names this dashboard (see the module docstring)."""
    name = host_name(header or "")
    if not name:
        return False
    ip = _ip(name)
    if name in LOCAL_NAMES or (ip is not None and ip.is_loopback):
        return True
    bound = bound.strip("[]").lower().rstrip(".")
    if bound in WILDCARDS:
        return ip is not None
    bound_ip = _ip(bound)
    return name == bound or (ip is not None and bound_ip is not None and ip == bound_ip)


async def guard(request: Request, call_next):
    """Host, then token, then the X-Lmtune-UI header on POST; the token is kept in a cookie once given."""
    settings = request.app.state.ui.settings
    if not host_allowed(request.headers.get("host"), settings.host):
        return JSONResponse({"detail": "unknown Host: open the dashboard by the name it was started on "
                                       "(localhost, 127.0.0.1 or its --host)"}, 403)
    if settings.token:
        given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                 or request.cookies.get(COOKIE) or request.query_params.get("token"))
        if not key_ok(given, [settings.token]):
            return JSONResponse({"detail": "missing or invalid token (open the UI with ?token=...)"}, 401)
    if request.method == "POST" and request.headers.get("x-lmtune-ui") != "1":
        return JSONResponse({"detail": "POST calls need the X-Lmtune-UI: 1 header"}, 403)
    response = await call_next(request)
    if settings.token and request.query_params.get("token"):  # remember it for the page's own calls
        response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
    return response
