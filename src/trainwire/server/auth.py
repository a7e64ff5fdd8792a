"""Who may do what: tokens, scopes, and the checks every request passes first.

Scopes are ordered: ``read`` (dashboards, REST reads) < ``write`` (trainers; a
trainer's user may also watch) < ``admin`` (deleting runs). A token arrives as
``Authorization: Bearer <token>``, as a ``token`` query parameter (the browser's
first request; the page is then redirected without it, the token moving to an
HttpOnly, SameSite=Strict cookie, so it stays out of the address bar, history and
logs), or as that cookie.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlencode

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from trainwire.exceptions import _fit_close_reason

__all__ = [
    "COOKIE",
    "AccessScope",
    "Authenticator",
    "AuthMiddleware",
    "SecurityHeadersMiddleware",
    "required_scope",
]

COOKIE: Final = "trainwire_token"

# No inline script, nothing from anywhere but this server: a script injected through
# a run or metric name has nowhere to run and nowhere to send anything.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class AccessScope(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> AccessScope:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown scope {name!r}: read, write or admin") from None


ScopeLookup = Callable[[str, float], str | None]

# How long a revoked or expired share token may still be served on a WebSocket it
# opened before: its scope is read again at most this often (still_grants).
RECHECK_SECONDS: Final = 1.0
MAX_RECENT_TOKENS: Final = 10_000


@dataclass
class Authenticator:
    """Decides the scope a token grants.

    Args:
        admin_token: the server's own token (``--token``, ``TRAINWIRE_TOKEN``, or the
            one made on first start); None with authentication off.
        lookup: finds share tokens made by ``trainwire token create``.
        enabled: False lets every request through with ``admin`` scope (only on
            loopback: the server refuses anything else).
    """

    admin_token: str | None
    lookup: ScopeLookup | None = None
    enabled: bool = True
    # token -> (when read, its scope then): see still_grants.
    _recent: dict[str, tuple[float, AccessScope | None]] = field(default_factory=dict, repr=False)

    def is_admin(self, token: str) -> bool:
        """``token`` is the server's own (compared in constant time)."""
        admin = self.admin_token
        return admin is not None and hmac.compare_digest(token.encode(), admin.encode())

    def still_grants(self, token: str, needed: AccessScope, now: float) -> bool:
        """Whether a share token that opened a WebSocket still grants ``needed``:
        ``trainwire token revoke`` (another process, writing the database) and expiry
        end what it opened. Read again at most every RECHECK_SECONDS per token, so
        that a frame to each of hundreds of dashboards is not a query each."""
        seen = self._recent.get(token)
        if seen is None or now - seen[0] >= RECHECK_SECONDS:
            if len(self._recent) >= MAX_RECENT_TOKENS:
                self._recent.clear()
            seen = self._recent[token] = (now, self.scope_of(token, now))
        return seen[1] is not None and seen[1] >= needed

    def scope_of(self, token: str | None, now: float) -> AccessScope | None:
        if not self.enabled:
            return AccessScope.ADMIN
        if not token:
            return None
        if self.is_admin(token):
            return AccessScope.ADMIN
        if self.lookup is not None:
            scope = self.lookup(token, now)
            if scope is not None:
                return AccessScope.parse(scope)
        return None


def required_scope(kind: str, method: str, path: str) -> AccessScope:
    """The scope a request needs: writes for trainers, admin for deletions, else read."""
    if kind == "websocket":
        return AccessScope.WRITE if path == "/ws/ingest" else AccessScope.READ
    if method == "DELETE":
        return AccessScope.ADMIN
    return AccessScope.READ


class AuthMiddleware:
    """Pure ASGI middleware: every HTTP route and WebSocket endpoint checks the token,
    and dashboard WebSockets their Origin.

    Args:
        allowed_origins: origins allowed besides the server's own (a reverse proxy's).
        secure_cookie: mark the cookie Secure (the server speaks https).
    """

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        *,
        allowed_origins: tuple[str, ...] = (),
        secure_cookie: bool = False,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        # An origin has no path: "https://host/", as copied from an address bar, never
        # matched a browser's Origin, and every dashboard behind the proxy got 4403.
        self.allowed_origins = tuple(origin.rstrip("/") for origin in allowed_origins)
        self.secure_cookie = secure_cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True)
        from_query = next((v for k, v in query if k == "token"), None)
        token = _bearer(headers) or from_query or _cookie(headers)
        granted = self.authenticator.scope_of(token, time.time())
        needed = required_scope(kind, scope.get("method", "GET"), scope["path"])
        if token and granted is not None and self.authenticator.enabled:
            # Who to rate-limit: the token (its digest, never the token itself).
            scope["trainwire.principal"] = hashlib.sha256(token.encode()).hexdigest()[:16]
        if not self.authenticator.enabled and not self._host_allowed(headers):
            # No token to stop it, a page of another site that rebinds its name to
            # 127.0.0.1 (DNS rebinding) could read everything: same-origin rules let
            # it, since the page's origin then matches the Host it sends.
            reason = f"host {headers.get('host', '')} is not this machine"
            if kind == "websocket":
                await _refuse_websocket(receive, send, 4403, reason)
            else:
                await _refuse_http(send, 403, reason)
            return
        if kind == "websocket":
            origin = headers.get("origin")
            if origin is not None and not self._origin_allowed(origin, headers, scope):
                await _refuse_websocket(receive, send, 4403, f"origin {origin} is not allowed")
                return
            if granted is None or granted < needed:
                code, reason = _refusal(token, granted, needed)
                await _refuse_websocket(receive, send, code + 4000, reason)
                return
            if token and self._is_share_token(token):
                receive, send = self._while_valid(token, needed, receive, send)
            await self.app(scope, receive, send)
            return
        if granted is None or granted < needed:
            code, reason = _refusal(token, granted, needed)
            await _refuse_http(send, code, reason)
            return
        if from_query is not None and not scope["path"].startswith("/api/"):
            # A browser arriving with ?token=: keep the token in a cookie, not the URL.
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            # One leading slash only: "//host/..." or "/\\host/..." would send the
            # browser to another server (an open redirect).
            path = "/" + scope["path"].lstrip("/\\")
            # Quoted back: the path comes decoded, and a %0d%0a in it would make a
            # header no server may send (a 500, a traceback in the log).
            location = quote(path, safe="/:@!$&'()*+,;=~") + (f"?{rest}" if rest else "")
            secure = self._served_over_https(scope, headers)
            await self._redirect_with_cookie(send, location, from_query, secure=secure)
            return
        await self.app(scope, receive, send)

    def _is_share_token(self, token: str) -> bool:
        """Neither auth off nor the admin token: one that can be revoked or expire."""
        return self.authenticator.enabled and not self.authenticator.is_admin(token)

    def _while_valid(
        self, token: str, needed: AccessScope, receive: Receive, send: Send
    ) -> tuple[Receive, Send]:
        """``receive`` and ``send`` of a WebSocket opened by a share token, which close
        it (4401) at the first frame either way once the token no longer grants
        ``needed``: revoked or expired, it gets nothing more, and sends nothing more."""
        ended = False
        reason = "token revoked or expired"

        async def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                await send({"type": "websocket.close", "code": 4401, "reason": reason})

        def valid() -> bool:
            return self.authenticator.still_grants(token, needed, time.time())

        async def checked_receive() -> Message:
            if ended:
                return {"type": "websocket.disconnect", "code": 4401}
            message = await receive()
            if message["type"] == "websocket.receive" and not valid():
                await end()
                return {"type": "websocket.disconnect", "code": 4401}
            return message

        async def checked_send(message: Message) -> None:
            if not ended and (message["type"] != "websocket.send" or valid()):
                await send(message)
                return
            await end()
            raise WebSocketDisconnect(4401, reason)

        return checked_receive, checked_send

    def _host_allowed(self, headers: Headers) -> bool:
        """The Host a request names is loopback (auth off is allowed on loopback
        only), or that of a configured origin (a reverse proxy that passes its own)."""
        host = headers.get("host", "")
        if any(origin.split("://", 1)[-1] == host for origin in self.allowed_origins):
            return True
        return is_loopback_name(host)

    def _origin_allowed(self, origin: str, headers: Headers, scope: Scope) -> bool:
        # Cross-site WebSocket hijacking: a page elsewhere could open our socket with
        # the user's cookie. Only our own pages (and configured proxies) may.
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        own = f"{scheme}://{headers.get('host', '')}"
        return origin == own or origin in self.allowed_origins

    def _served_over_https(self, scope: Scope, headers: Headers) -> bool:
        """Whether the browser reached us over https: our own TLS, or a reverse proxy
        terminating it, which says so (X-Forwarded-Proto, taken by uvicorn from a
        proxy on loopback) or names the host of an https ``--allow-origin``. A cookie
        without Secure there went in clear to any http:// URL of the same host (a
        typed address, the proxy's redirect to https), the token with it."""
        if self.secure_cookie or scope.get("scheme") == "https":
            return True
        host = headers.get("host", "")
        return f"https://{host}" in self.allowed_origins

    async def _redirect_with_cookie(
        self, send: Send, location: str, token: str, *, secure: bool
    ) -> None:
        # Quoted: a token of the user's own (--token) may hold what a cookie cannot (a
        # space, a ";"); read back by _cookie.
        cookie = f"{COOKIE}={quote(token, safe='')}; Path=/; HttpOnly; SameSite=Strict"
        if secure:
            cookie += "; Secure"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode()),
                    (b"set-cookie", cookie.encode()),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response."""

    HEADERS: Final = [
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def is_loopback_name(host: str) -> bool:
    """A Host header (``name[:port]``) naming this machine by itself: ``localhost``
    (and ``*.localhost``, RFC 6761) or a loopback address. Never looked up: a name
    that resolves to 127.0.0.1 is what a DNS-rebinding page uses."""
    if host.startswith("["):  # [IPv6] or [IPv6]:port
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return False
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _cookie(headers: Headers) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(raw)
    except Exception:  # noqa: BLE001 - a malformed cookie header is just no token
        return None
    morsel = cookie.get(COOKIE)
    return unquote(morsel.value) if morsel is not None else None


def _refusal(
    token: str | None, granted: AccessScope | None, needed: AccessScope
) -> tuple[int, str]:
    if not token:
        # Also a close reason (at most 123 bytes). Many users never ran `trainwire
        # serve`: init() started their server, and run.url is their link.
        return 401, (
            "token required: open the link trainwire printed (trainwire serve, or run.url), "
            "or send a token"
        )
    if granted is None:
        return 401, "invalid, expired or revoked token"
    return 403, f"this token's scope is {granted.name.lower()}; this needs {needed.name.lower()}"


async def _refuse_http(send: Send, status: int, reason: str) -> None:
    # Encoded, not pasted: a reason may quote the client (its Host), quotes included.
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="trainwire"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(receive: Receive, send: Send, code: int, reason: str) -> None:
    # Accept, then close with a reason: a refused handshake could only say "403",
    # and a client deserves to know why.
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    # The reason may quote the client (its Origin): cut to what a close frame holds.
    await send({"type": "websocket.close", "code": code, "reason": _fit_close_reason(reason)})
