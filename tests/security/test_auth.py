"""Who may do what, in-process (no port): every route and endpoint against every kind
of credential, the cookie hand-off, security headers, Origin checks, exposure, the
admin token file, and the caps on what one client may take."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from tests.conftest import MS, LiveServer
from trainwire.exceptions import ConfigError
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Hello,
    Row,
    RunSpec,
    ServerToTrainer,
    Welcome,
)
from trainwire.server import auth
from trainwire.server.app import create_app
from trainwire.server.auth import COOKIE, AccessScope, Authenticator
from trainwire.server.runner import admin_token, check_exposure
from trainwire.settings import Limits, Settings
from trainwire.storage.tokens import TokenStore

ADMIN_TOKEN: Final = "security-admin-token"
RUN: Final = RunSpec(id="run-1", project="digits", name="cnn", config={"lr": 0.003})
STORED_ROWS: Final[list[Row]] = [(0, 1.0, {"loss": 1.0})]

# -- helpers ---------------------------------------------------------------------------


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


ADMIN: Final = bearer(ADMIN_TOKEN)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"token": ADMIN_TOKEN, **overrides}
    return Settings(data_dir=tmp_path / "server", **options)


def send(ws: WebSocketTestSession, message: object) -> None:
    ws.send_bytes(msgspec.msgpack.encode(message))


def receive(ws: WebSocketTestSession) -> ServerToTrainer:
    message: ServerToTrainer = msgspec.msgpack.decode(ws.receive_bytes(), type=ServerToTrainer)
    return message


def hello(spec: RunSpec = RUN, **fields: Any) -> Hello:
    return Hello(v=PROTOCOL_VERSION, run=spec, **fields)


def closed(ws: WebSocketTestSession) -> tuple[int, str]:
    """The code and reason of the close that must be the socket's next message."""
    message = ws.receive()
    assert message["type"] == "websocket.close", f"expected a close, got {message}"
    return int(message["code"]), str(message.get("reason", ""))


@contextlib.contextmanager
def open_trainer(
    client: TestClient, spec: RunSpec = RUN, headers: dict[str, str] = ADMIN, **fields: Any
) -> Iterator[WebSocketTestSession]:
    """A trainer connection, already welcomed."""
    with client.websocket_connect("/ws/ingest", headers=headers) as ws:
        send(ws, hello(spec, **fields))
        welcome = receive(ws)
        assert isinstance(welcome, Welcome) and welcome.run_id == spec.id
        yield ws


def store_run(
    client: TestClient,
    spec: RunSpec = RUN,
    rows: list[Row] = STORED_ROWS,
    headers: dict[str, str] = ADMIN,
) -> None:
    with open_trainer(client, spec, headers) as ws:
        send(ws, Batch(seq=1, rows=rows))
        assert receive(ws) == Ack(seq=1)


def websocket_refusal(client: TestClient, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """Open ``path`` expecting a refusal: the code and reason it is closed with."""
    with client.websocket_connect(path, headers=headers) as ws:
        if path == "/ws/ingest":
            # Trainers speak first: one admitted by mistake gets a welcome, not a hang.
            send(ws, hello())
        return closed(ws)


def dashboard_hello(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """Open a dashboard socket that must be served: its first message."""
    with client.websocket_connect("/ws/dashboard", headers=headers) as ws:
        first: dict[str, Any] = ws.receive_json()
    return first


def assert_security_headers(response: Any) -> None:
    [policy] = response.headers.get_list("content-security-policy")
    directives = {
        name: sources
        for name, *sources in (part.split() for part in policy.split(";") if part.strip())
    }
    sources = [source for values in directives.values() for source in values]
    assert "'unsafe-inline'" not in sources and "'unsafe-eval'" not in sources, policy
    assert not [s for s in sources if s == "*" or s.lower().startswith(("http:", "https:"))]
    assert directives.get("script-src", directives.get("default-src")) == ["'self'"], policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def assert_refused(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="trainwire"'
    else:
        assert "www-authenticate" not in response.headers
    assert "set-cookie" not in response.headers
    assert_security_headers(response)


# -- the auth matrix -----------------------------------------------------------------------


@dataclass
class Secured:
    """An app with a stored run, and a token of every kind."""

    client: TestClient
    tokens: dict[str, str | None]


# What each credential grants; None: nothing (401).
GRANTS: Final[dict[str, int | None]] = {
    "no token": None,
    "wrong token": None,
    "expired token": None,
    "revoked token": None,
    "read": 1,
    "write": 2,
    "admin": 3,
    "server token": 3,  # Settings(token=...)
}
NEEDS: Final = {"read": 1, "write": 2, "admin": 3}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    settings = settings_for(tmp_path)
    with TestClient(create_app(settings), follow_redirects=False) as client:
        now = time.time()
        tokens = TokenStore(settings.db_path)
        try:
            _, read = tokens.create("read", now, None, "a dashboard link")
            _, write = tokens.create("write", now, now + 3600, "a trainer")
            _, admin = tokens.create("admin", now, None)
            # Both would be admin if valid: the scope they were made with must not matter.
            _, expired = tokens.create("admin", now - 7200, now - 3600)
            revoked_id, revoked = tokens.create("admin", now, None)
            assert tokens.revoke(revoked_id)
        finally:
            tokens.close()
        store_run(client)
        yield Secured(
            client,
            {
                "no token": None,
                "wrong token": "not-a-token-of-this-server",
                "expired token": expired,
                "revoked token": revoked,
                "read": read,
                "write": write,
                "admin": admin,
                "server token": ADMIN_TOKEN,
            },
        )


@dataclass(frozen=True)
class Route:
    method: str  # an HTTP method, or "WS"
    path: str
    needs: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES: Final = [
    Route("GET", "/", "read"),
    Route("GET", "/app.js", "read"),
    Route("GET", "/api/health", "read"),
    Route("GET", "/api/runs", "read"),
    Route("GET", "/api/runs/run-1", "read"),
    Route("GET", "/api/runs/run-1/metrics", "read"),
    Route("GET", "/api/runs/run-1/csv?key=loss", "read"),
    Route("DELETE", "/api/runs/run-1", "admin"),
    Route("GET", "/openapi.json", "read"),
    Route("WS", "/ws/ingest", "write"),
    Route("WS", "/ws/dashboard", "read"),
]


def assert_content(route: Route, response: Any) -> None:
    """What each route serves, once admitted."""
    match str(route):
        case "GET /":
            assert response.headers["content-type"].startswith("text/html")
            assert 'type="module"' in response.text
        case "GET /app.js":
            assert "javascript" in response.headers["content-type"]
        case "GET /api/health":
            assert response.json()["app"] == "trainwire"
        case "GET /api/runs":
            assert [run["id"] for run in response.json()] == ["run-1"]
        case "GET /api/runs/run-1":
            assert response.json()["keys"] == ["loss"]
        case "GET /api/runs/run-1/metrics":
            assert response.json()["series"]["loss"]["step"] == [0]
        case "GET /api/runs/run-1/csv?key=loss":
            assert response.headers["content-type"].startswith("text/csv")
            assert response.text.splitlines() == ["step,time,value", "0,1.0,1.0"]
        case "DELETE /api/runs/run-1":
            assert response.content == b""
        case "GET /openapi.json":
            assert "/api/runs" in response.json()["paths"]
        case other:
            raise AssertionError(f"no check for {other}")


def assert_served(client: TestClient, route: Route, headers: dict[str, str]) -> None:
    if route.path == "/ws/ingest":
        with open_trainer(client, headers=headers) as ws:
            send(ws, Batch(seq=2, rows=[(1, 2.0, {"loss": 0.5})]))
            assert receive(ws) == Ack(seq=2)
        return
    if route.path == "/ws/dashboard":
        assert dashboard_hello(client, headers)["type"] == "hello"
        return
    response = client.request(route.method, route.path, headers=headers)
    assert response.status_code == (204 if route.method == "DELETE" else 200), response.text
    assert_security_headers(response)
    assert_content(route, response)
    if route.method == "DELETE":
        assert client.get(route.path, headers=ADMIN).status_code == 404


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("credential", list(GRANTS))
def test_every_route_serves_exactly_the_credentials_with_enough_scope(
    secured: Secured, route: Route, credential: str
) -> None:
    """No, wrong, expired or revoked token: 401 / 4401; too small a scope: 403 / 4403."""
    headers = bearer(secured.tokens[credential])
    granted = GRANTS[credential]
    if granted is not None and granted >= NEEDS[route.needs]:
        assert_served(secured.client, route, headers)
        return
    status = 401 if granted is None else 403
    if route.method == "WS":
        code, reason = websocket_refusal(secured.client, route.path, headers)
        assert (code, bool(reason)) == (status + 4000, True), (code, reason)
        if status == 403:
            assert f"needs {route.needs}" in reason
    else:
        response = secured.client.request(route.method, route.path, headers=headers)
        assert_refused(response, status)
    # A refusal changed nothing.
    assert secured.client.get("/api/runs/run-1/metrics", headers=ADMIN).json()["series"] == {
        "loss": {"step": [0], "time": [1.0], "value": [1.0], "sampled": False}
    }


def test_a_bearer_header_wins_over_a_valid_cookie_and_query(secured: Secured) -> None:
    """A wrong token is refused even when another credential would have been valid."""
    valid = secured.tokens["admin"]
    response = secured.client.get(
        f"/api/runs?token={valid}",
        headers={**bearer("wrong"), "Cookie": f"{COOKIE}={valid}"},
    )
    assert_refused(response, 401)


# -- the token in a URL, then in a cookie ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "location"),
    [("/?token={}", "/"), ("/?run=run-1&token={}", "/?run=run-1"), ("/app.js?token={}", "/app.js")],
)
def test_a_token_in_a_page_url_moves_to_an_http_only_strict_cookie(
    secured: Secured, path: str, location: str
) -> None:
    token = secured.tokens["read"]
    assert token is not None
    response = secured.client.get(path.format(token))
    assert response.status_code == 303
    assert response.headers["location"] == location
    assert response.headers["cache-control"] == "no-store"
    assert_security_headers(response)
    [header] = response.headers.get_list("set-cookie")
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(header)
    morsel = cookie[COOKIE]
    assert morsel.value == token
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert not morsel["secure"]  # plain http here; test_tls checks Secure under https


@pytest.mark.parametrize(
    ("base_url", "origins"),
    [
        # README's nginx setup: TLS ends at the proxy, which passes the Host it got.
        ("http://proxy.example", ("https://proxy.example/",)),
        ("http://proxy.example:8443", ("https://proxy.example:8443",)),
        # A proxy that says X-Forwarded-Proto: https, which uvicorn makes the scheme.
        ("https://testserver", ()),
    ],
)
def test_behind_a_proxy_terminating_tls_the_token_cookie_is_secure(
    tmp_path: Path, base_url: str, origins: tuple[str, ...]
) -> None:
    settings = settings_for(tmp_path, allowed_origins=origins)
    with TestClient(create_app(settings), base_url=base_url, follow_redirects=False) as client:
        response = client.get(f"/?token={ADMIN_TOKEN}")
    assert response.status_code == 303
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    assert cookie[COOKIE]["secure"] is True


def test_an_https_origin_does_not_make_the_cookie_of_other_hosts_secure(tmp_path: Path) -> None:
    """The same server reached over plain http by another name (an SSH tunnel's
    127.0.0.1): a Secure cookie from an http page would not be kept there."""
    settings = settings_for(tmp_path, allowed_origins=("https://proxy.example",))
    with TestClient(create_app(settings), follow_redirects=False) as client:
        response = client.get(f"/?token={ADMIN_TOKEN}")
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    assert not cookie[COOKIE]["secure"]


def test_the_cookie_alone_then_authenticates_pages_api_and_the_dashboard_socket(
    secured: Secured,
) -> None:
    client = secured.client
    token = secured.tokens["read"]
    response = client.get(f"/?run=run-1&token={token}")
    assert response.status_code == 303
    client.cookies.clear()  # explicit below: the cookie is the only credential sent
    cookie = {"Cookie": response.headers["set-cookie"].split(";")[0]}
    assert client.get(response.headers["location"], headers=cookie).status_code == 200
    assert client.get("/app.js", headers=cookie).status_code == 200
    assert client.get("/api/runs/run-1", headers=cookie).json()["id"] == "run-1"
    assert dashboard_hello(client, cookie)["type"] == "hello"
    # The cookie carries the token's scope, no more.
    assert websocket_refusal(client, "/ws/ingest", cookie)[0] == 4403
    assert_refused(client.delete("/api/runs/run-1", headers=cookie), 403)


def test_a_wrong_token_in_a_page_url_sets_no_cookie(secured: Secured) -> None:
    assert_refused(secured.client.get("/?token=not-a-token"), 401)


def test_a_token_in_an_api_url_is_accepted_without_a_redirect(secured: Secured) -> None:
    client = secured.client
    token = secured.tokens["read"]
    response = client.get(f"/api/runs?token={token}")
    assert response.status_code == 200
    assert [run["id"] for run in response.json()] == ["run-1"]
    assert "set-cookie" not in response.headers
    assert_refused(client.get("/api/runs?token=not-a-token"), 401)
    with client.websocket_connect(f"/ws/dashboard?token={token}") as ws:
        assert ws.receive_json()["type"] == "hello"


@pytest.mark.parametrize(
    "path",
    [
        "//evil.example/",
        "/%5Cevil.example/",
        "/runs/evil.example/",
        "/a%0d%0aSet-Cookie:%20x=1",
    ],
)
def test_the_cookie_redirect_never_leaves_this_server(secured: Secured, path: str) -> None:
    """A link to this server with a valid token must not bounce the browser elsewhere,
    nor, with a line break in its path, make a header the server cannot send (it
    answered 500, with a traceback)."""
    response = secured.client.get(f"http://testserver{path}?token={secured.tokens['read']}")
    assert response.status_code == 303
    location = response.headers["location"]
    # Browsers read "//host" and "/\host" (and "\\host") as another host.
    assert location.startswith("/") and location[1:2] not in ("/", "\\"), location
    assert "\r" not in location and "\n" not in location


# -- security headers on every answer --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/style.css", 200),
        ("GET", "/api/runs/ghost", 404),
        ("GET", "/api/runs/ghost/metrics", 404),
        ("GET", "/api/runs/ghost/csv?key=x", 404),
        ("GET", "/no-such-file.js", 404),
        ("POST", "/api/runs", 405),
        ("DELETE", "/api/runs/ghost", 404),
    ],
)
def test_security_headers_are_on_every_answer(
    secured: Secured, method: str, path: str, status: int
) -> None:
    """Refusals are checked in the matrix above; here successes and errors."""
    response = secured.client.request(method, path, headers=ADMIN)
    assert response.status_code == status
    assert_security_headers(response)
    assert response.headers["x-frame-options"] == "DENY"


# -- Origin ------------------------------------------------------------------------------------


def test_a_dashboard_socket_from_another_origin_is_closed_4403_naming_it(secured: Secured) -> None:
    headers = {**ADMIN, "Origin": "http://evil.example"}
    code, reason = websocket_refusal(secured.client, "/ws/dashboard", headers)
    assert code == 4403
    assert "http://evil.example" in reason
    # The cookie a browser would attach does not help either.
    code, _ = websocket_refusal(
        secured.client,
        "/ws/dashboard",
        {"Origin": "http://evil.example", "Cookie": f"{COOKIE}={ADMIN_TOKEN}"},
    )
    assert code == 4403


def test_the_servers_own_origin_is_accepted(secured: Secured) -> None:
    assert dashboard_hello(secured.client, {**ADMIN, "Origin": "http://testserver"})["v"] == 1


@pytest.mark.parametrize("configured", ["https://proxy.example", "https://proxy.example/"])
def test_a_configured_origin_is_accepted_and_others_still_refused(
    tmp_path: Path, configured: str
) -> None:
    """Given as copied from an address bar (a trailing slash), it is the same origin."""
    settings = settings_for(tmp_path, allowed_origins=(configured,))
    with TestClient(create_app(settings)) as client:
        headers = {**ADMIN, "Origin": "https://proxy.example"}
        assert dashboard_hello(client, headers)["type"] == "hello"
        refused = {**ADMIN, "Origin": "https://proxy.example.evil.example"}
        assert websocket_refusal(client, "/ws/dashboard", refused)[0] == 4403


# -- authentication off, exposure, the admin token file ---------------------------------------


# A server with auth off serves loopback Host names alone (DNS rebinding, below).
LOOPBACK_URL = "http://127.0.0.1:8765"
LOOPBACK = {"Host": "127.0.0.1:8765"}


def test_with_auth_off_everything_is_served_without_a_token(tmp_path: Path) -> None:
    with TestClient(
        create_app(settings_for(tmp_path, token=None, auth=False)), base_url=LOOPBACK_URL
    ) as client:
        # TestClient names "testserver" as the Host of its WebSockets, whatever base_url.
        with client.websocket_connect("/ws/ingest", headers=LOOPBACK) as ws:
            send(ws, hello())
            assert isinstance(receive(ws), Welcome)
        assert dashboard_hello(client, LOOPBACK)["type"] == "hello"
        for path in ("/", "/api/runs", "/api/runs/run-1", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        assert client.delete("/api/runs/run-1").status_code == 204


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "trainwire.example"])
def test_auth_off_is_refused_on_a_reachable_address(host: str) -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        check_exposure(Settings(host=host, auth=False))
    check_exposure(Settings(host=host, auth=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_auth_off_is_allowed_on_loopback(host: str) -> None:
    check_exposure(Settings(host=host, auth=False))


def test_the_admin_token_file_is_made_once_readable_by_its_owner_alone(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh" / "data")
    token = admin_token(settings)
    assert token is not None and len(token) >= 32
    assert stat.S_IMODE(os.stat(settings.token_path).st_mode) == 0o600
    contents = settings.token_path.read_text()
    assert admin_token(settings) == token
    assert admin_token(Settings(data_dir=settings.data_dir)) == token
    assert settings.token_path.read_text() == contents
    # The token made on first start is the server's admin token.
    with TestClient(create_app(Settings(data_dir=settings.data_dir, token=token))) as client:
        assert client.delete("/api/runs/ghost", headers=bearer(token)).status_code == 404


def test_a_given_admin_token_or_auth_off_writes_no_token_file(tmp_path: Path) -> None:
    given = Settings(data_dir=tmp_path, token="given")
    assert admin_token(given) == "given"
    assert admin_token(Settings(data_dir=tmp_path, auth=False)) is None
    assert not given.token_path.exists()


# -- limits --------------------------------------------------------------------------------------


def test_a_websocket_past_the_per_address_cap_is_closed_1008_and_the_others_keep_working(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, limits=Limits(max_connections_per_address=2))
    with TestClient(create_app(settings), headers=ADMIN) as client:
        with (
            client.websocket_connect("/ws/dashboard") as first,
            client.websocket_connect("/ws/dashboard") as second,
        ):
            for ws in (first, second):
                assert [ws.receive_json()["type"] for _ in "ab"] == ["hello", "runs"]
            for path in ("/ws/dashboard", "/ws/ingest"):
                code, reason = websocket_refusal(client, path, {})
                assert code == 1008
                assert "too many connections" in reason and "limit 2" in reason
            for ws in (first, second):
                ws.send_json({"type": "subscribe", "run": "run-1"})
                assert ws.receive_json()["type"] == "points"
            assert client.get("/api/health").status_code == 200  # HTTP is not capped
        # Closed ones no longer count.
        assert dashboard_hello(client, {})["type"] == "hello"


def test_a_new_run_past_the_per_minute_cap_is_closed_1008_and_reopening_is_not_counted(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, limits=Limits(max_new_runs_per_minute=2))
    with TestClient(create_app(settings)) as client:
        for run_id in ("a", "a", "a", "b"):  # one new run, reopened twice, then a second
            with open_trainer(client, RunSpec(id=run_id, project="p", name=run_id)):
                pass
        with client.websocket_connect("/ws/ingest", headers=ADMIN) as ws:
            send(ws, hello(RunSpec(id="c", project="p", name="c")))
            code, reason = closed(ws)
        assert (code, reason) == (1008, "more than 2 new runs a minute")
        assert client.get("/api/runs/c", headers=ADMIN).status_code == 404
        with open_trainer(client, RunSpec(id="b", project="p", name="b")) as ws:
            send(ws, Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))
            assert receive(ws) == Ack(seq=1)


WELL_BEHAVED: Final = RunSpec(id="good", project="p", name="good")
OFFENDER: Final = RunSpec(id="bad", project="p", name="bad")


@pytest.mark.parametrize(
    ("limits", "rows", "reason"),
    [
        pytest.param(
            Limits(max_rows_per_batch=3),
            [(step, 1.0, {"loss": 1.0}) for step in range(4)],
            "batch of 4 rows exceeds 3",
            id="rows per batch",
        ),
        pytest.param(
            Limits(max_key_length=8),
            [(0, 1.0, {"k" * 9: 1.0})],
            "metric keys must have 1 to 8 characters",
            id="key too long",
        ),
        pytest.param(
            Limits(), [(0, 1.0, {"": 1.0})], "metric keys must have 1 to 200", id="empty key"
        ),
        pytest.param(
            Limits(), [(0, 1.0, {"bad\x00key": 1.0})], "has control characters", id="NUL in key"
        ),
        pytest.param(
            Limits(), [(0, 1.0, {"bad\nkey": 1.0})], "has control characters", id="newline in key"
        ),
    ],
)
def test_a_trainer_over_a_limit_alone_is_closed_1008_with_a_reason(
    tmp_path: Path, limits: Limits, rows: list[Row], reason: str
) -> None:
    with TestClient(create_app(settings_for(tmp_path, limits=limits))) as client:
        with open_trainer(client, WELL_BEHAVED) as good:
            send(good, Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))
            assert receive(good) == Ack(seq=1)
            with open_trainer(client, OFFENDER) as bad:
                send(bad, Batch(seq=1, rows=rows))
                code, said = closed(bad)
            assert code == 1008
            assert reason in said
            send(good, Batch(seq=2, rows=[(1, 2.0, {"loss": 0.5})]))
            assert receive(good) == Ack(seq=2)
        metrics = client.get("/api/runs/good/metrics", headers=ADMIN).json()["series"]
        assert metrics["loss"]["step"] == [0, 1]
        assert client.get("/api/runs/bad/metrics", headers=ADMIN).json()["series"] == {}


def test_keys_past_the_series_cap_are_refused_by_name_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    """The key limit is the run's: a writer cannot know what its other ranks, or its
    own earlier life, gave the run. So a key past it must not close the connection,
    whose batch would then be refused at every resend with every batch after it: the
    values of that key are left out, the writer told which, and the rest stored."""
    limits = Limits(max_series_per_run=3)
    with TestClient(create_app(settings_for(tmp_path, limits=limits))) as client:
        with open_trainer(client, RUN) as ws:
            rows: list[Row] = [(0, 1.0, {"a": 1.0, "b": 2.0}), (1, 2.0, {"c": 3.0, "d": 4.0})]
            send(ws, Batch(seq=1, rows=rows))
            assert receive(ws) == Ack(seq=1, refused=["d"])
            send(ws, Batch(seq=2, rows=[(2, 3.0, {"a": 5.0, "e": 6.0})]))
            assert receive(ws) == Ack(seq=2, refused=["e"])
        series = client.get(f"/api/runs/{RUN.id}/metrics", headers=ADMIN).json()["series"]
        assert {key: s["value"] for key, s in series.items()} == {
            "a": [1.0, 5.0],
            "b": [2.0],
            "c": [3.0],
        }


def test_the_series_cap_counts_every_rank_of_a_run(tmp_path: Path) -> None:
    limits = Limits(max_series_per_run=3)
    with TestClient(create_app(settings_for(tmp_path, limits=limits))) as client:
        acks = []
        for rank in (0, 1):
            with open_trainer(client, RUN, rank=rank, stream=f"rank-{rank}") as ws:
                send(ws, Batch(seq=1, rows=[(0, 1.0, {"a": 1.0, "b": 1.0})]))
                acks.append(receive(ws))
        # Rank 1's keys are rank1/a and rank1/b: the run's 3rd and 4th.
        assert acks == [Ack(seq=1), Ack(seq=1, refused=["b"])]
        keys = client.get(f"/api/runs/{RUN.id}", headers=ADMIN).json()["keys"]
        assert sorted(keys) == ["rank0/a", "rank0/b", "rank1/a"]


def test_the_series_cap_counts_writers_that_opened_the_run_together(tmp_path: Path) -> None:
    limits = Limits(max_series_per_run=3)
    with TestClient(create_app(settings_for(tmp_path, limits=limits))) as client:
        with (
            open_trainer(client, RUN, stream="first") as first,
            open_trainer(client, RUN, stream="second") as second,
        ):
            send(first, Batch(seq=1, rows=[(0, 1.0, {"a": 1.0, "b": 1.0, "c": 1.0})]))
            assert receive(first) == Ack(seq=1)
            send(second, Batch(seq=1, rows=[(0, 1.0, {"a": 2.0, "d": 1.0})]))
            assert receive(second) == Ack(seq=1, refused=["d"])


def test_a_long_foreign_origin_is_still_closed_4403_with_a_reason(live_server: LiveServer) -> None:
    """The reason names the origin, which the client chose: a long one must not
    overflow the close frame (125 bytes) and crash the refusal into a bare drop and
    an "Exception in ASGI application" traceback in the server's log."""
    origin = "https://" + "a" * 200 + ".example"
    with connect(
        f"{live_server.ws_url}/ws/dashboard",
        additional_headers={**live_server.auth, "Origin": origin},
        open_timeout=10_000 * MS,
    ) as ws:
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=10_000 * MS)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4403
    assert info.value.rcvd.reason.startswith("origin https://aaa")


def test_a_revoked_share_token_ends_the_dashboard_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: `trainwire token revoke ID` ends a share link, and a revoked token gets
    close 4401. A dashboard opened with it before must not go on receiving every new
    run and point."""
    monkeypatch.setattr(auth, "RECHECK_SECONDS", 0.0)  # read at every frame
    settings = settings_for(tmp_path)
    with TestClient(create_app(settings)) as client:
        tokens = TokenStore(settings.db_path)
        try:
            token_id, secret = tokens.create("read", time.time(), None, "a colleague")
            with client.websocket_connect(
                "/ws/dashboard", headers={"Authorization": f"Bearer {secret}"}
            ) as ws:
                assert ws.receive_json()["type"] == "hello"
                assert ws.receive_json() == {"type": "runs", "runs": []}
                assert tokens.revoke(token_id)
                store_run(client, RunSpec(id="secret-run", project="p", name="unpublished"))
                code, _ = closed(ws)
                assert code == 4401
        finally:
            tokens.close()


@pytest.mark.parametrize("path", ["/api/runs", "/api/runs/run-1/metrics"])
def test_with_auth_off_a_page_of_another_site_rebound_to_loopback_reads_nothing(
    tmp_path: Path, path: str
) -> None:
    """--no-auth is allowed on loopback only because only this machine can reach it.
    A web page the user opens elsewhere can still get there by DNS rebinding
    (attacker.example resolving to 127.0.0.1): its requests then carry
    ``Host: attacker.example:8765``, and same-origin rules let the page read the
    answers. A loopback-only server must refuse any other Host."""
    settings = settings_for(tmp_path, token=None, auth=False)
    with TestClient(create_app(settings), base_url=LOOPBACK_URL) as client:
        store_run(client, headers=LOOPBACK)
        assert client.get(path).status_code == 200  # the user's own browser, via 127.0.0.1
        rebound = client.get(path, headers={"Host": "attacker.example:8765"})
        assert rebound.status_code in (400, 403), rebound.text
        # The refusal names the Host it was sent, quotes and all, in valid JSON.
        quoted = client.get(path, headers={"Host": 'evil"example'})
        assert quoted.json() == {"detail": 'host evil"example is not this machine'}
        origin = {"Host": "attacker.example:8765", "Origin": "http://attacker.example:8765"}
        with client.websocket_connect("/ws/dashboard", headers=origin) as ws:
            message = ws.receive()
        assert message["type"] == "websocket.close", message


def test_an_empty_token_file_is_not_an_admin_token_nobody_can_send(tmp_path: Path) -> None:
    """A first start cut short after the token file was made but before its line was
    written (a full disk, a kill) leaves it empty. The server then started with the
    admin token "", which no request can match: its printed link carried no token and
    every client of this data directory was refused, with nothing said."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    settings.token_path.write_text("")
    try:
        token = admin_token(settings)
    except ConfigError as exc:  # refusing, with a clear word, would do too
        assert str(settings.token_path) in str(exc)
        return
    assert token, "an empty admin token"


def test_a_share_tokens_scope_is_read_again_at_most_once_a_recheck_interval() -> None:
    """Hundreds of dashboards on one share link must not cost a query a frame each."""
    reads: list[str] = []
    revoked = False

    def lookup(token: str, now: float) -> str | None:
        reads.append(token)
        return None if revoked else "read"

    authenticator = Authenticator(admin_token=ADMIN_TOKEN, lookup=lookup)
    assert authenticator.still_grants("share", AccessScope.READ, now=100.0)
    revoked = True
    assert authenticator.still_grants("share", AccessScope.READ, now=100.5)  # as read
    assert not authenticator.still_grants("share", AccessScope.WRITE, now=100.5)
    assert not authenticator.still_grants("share", AccessScope.READ, now=101.0)
    assert reads == ["share", "share"]


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "[::1]", "[::1]:8765", "[0:0:0:0:0:0:0:1]", "localhost:80"]
)
def test_with_auth_off_every_spelling_of_a_loopback_host_is_served(
    tmp_path: Path, host: str
) -> None:
    """A browser at http://[::1]/ (port 80, or a local proxy) sends ``Host: [::1]``,
    the bracketed address with no port, as it sends ``Host: localhost`` for
    http://localhost/. Both name this machine: the DNS-rebinding check must let them."""
    settings = settings_for(tmp_path, token=None, auth=False)
    with TestClient(create_app(settings), base_url=LOOPBACK_URL) as client:
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200
