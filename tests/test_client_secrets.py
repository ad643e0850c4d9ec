"""`POST /v1/realtime/client_secrets` over real HTTP, and its `ek_` tokens at the relay's `/ws`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from app.api.client_secrets import client_secrets_router
from app.auth.credentials import Authenticator, Identity
from tests.helpers import (
    JWT_SECRET,
    PRO_KEY,
    TOKEN_SECRET,
    auth_settings,
    hs256,
    jwt_claims,
    loopback_socket,
    relay_settings,
    start_server,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

START_TIMEOUT = 10.0
WAIT = 10.0
# The relay's `_model` must apply a token's model before these pass (see Identity in
# app/auth/credentials.py).
ServerFactory = Callable[[FastAPI], Awaitable[str]]


@pytest.fixture
async def http_server_factory() -> AsyncIterator[ServerFactory]:
    """Serves ASGI apps under uvicorn on pre-bound loopback sockets; returns their base URLs and
    stops them after the test."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: FastAPI) -> str:
        sock = loopback_socket()
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off")
        running.append(await start_server(config, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, task in reversed(running):
        server.should_exit = True
        with anyio.fail_after(START_TIMEOUT):
            await task


@pytest.fixture
async def secrets_url(http_server_factory: ServerFactory) -> str:
    config = auth_settings()
    app = FastAPI()
    app.include_router(client_secrets_router(Authenticator(config), config))
    return await http_server_factory(app) + "/v1/realtime/client_secrets"


async def post(url: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", {"Authorization": f"Bearer {PRO_KEY}"})
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, **kwargs)


async def test_client_key_mints_a_token_for_its_tier(secrets_url: str) -> None:
    """A good client key gets an `ek_` token, in OpenAI's shape, that authenticates to its tier."""
    response = await post(secrets_url)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["session"] == {"type": "realtime", "model": "gpt-realtime"}
    assert body["value"].startswith("ek_")
    assert time.time() + 590 < body["expires_at"] <= time.time() + 600
    auth = Authenticator(auth_settings())
    identity = auth.authenticate(body["value"])
    assert (identity.tier, identity.client_id) == ("pro", auth.authenticate(PRO_KEY).client_id)
    assert identity.model is None  # no model asked for: any of the tier's models


async def test_bad_key_gets_401(secrets_url: str) -> None:
    """An unknown, missing or non-key credential gets a 401 with an OpenAI-shaped error body."""
    token, _ = Authenticator(auth_settings()).mint(Identity("pro", "key:abc"))
    for headers in ({"Authorization": "Bearer ck-nope"}, {}, {"Authorization": f"Bearer {token}"}):
        response = await post(secrets_url, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_lifetime_and_model_requests(secrets_url: str) -> None:
    """`expires_after` is honoured up to the configured TTL, a tier model may be chosen and binds
    the token to it, and a bad body or a model outside the tier gets a 400."""
    short = await post(
        secrets_url,
        json={
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "model": "gpt-realtime-mini"},
        },
    )
    long = await post(secrets_url, json={"expires_after": {"seconds": 7200}})
    bad_model = await post(secrets_url, json={"session": {"model": "gpt-5"}})
    bad_body = await post(secrets_url, content=b"{not json")
    assert short.status_code == 200
    assert short.json()["expires_at"] <= time.time() + 60
    assert short.json()["session"]["model"] == "gpt-realtime-mini"
    assert Authenticator(auth_settings()).authenticate(short.json()["value"]).model == (
        "gpt-realtime-mini"
    )
    assert long.status_code == 200
    assert long.json()["expires_at"] <= time.time() + 600
    assert bad_model.status_code == 400
    assert bad_model.json()["error"]["code"] == "model_not_allowed"
    assert bad_body.status_code == 400
    assert bad_body.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize(
    ("seconds", "code"),
    [
        (0, "integer_below_min_value"),
        (9, "integer_below_min_value"),
        (-600, "integer_below_min_value"),
        (7201, "integer_above_max_value"),
        (10**12, "integer_above_max_value"),
    ],
)
async def test_lifetime_outside_openais_range_gets_400(
    secrets_url: str, seconds: int, code: str
) -> None:
    """`expires_after.seconds` outside 10-7200 gets OpenAI's 400 naming the parameter, and no
    token."""
    response = await post(secrets_url, json={"expires_after": {"seconds": seconds}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "expires_after.seconds")
    assert str(seconds) in error["message"]
    assert "value" not in response.json()


async def test_lifetime_bounds_and_types(secrets_url: str) -> None:
    """10 and 7200 s are accepted, as is no lifetime (the default); one that is not an integer
    is a malformed body."""
    for seconds in (10, 7200, None):
        response = await post(secrets_url, json={"expires_after": {"seconds": seconds}})
        assert response.status_code == 200
    for malformed in ("60", 60.5, True):
        response = await post(secrets_url, json={"expires_after": {"seconds": malformed}})
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid")


# ek_ tokens at the relay's WebSocket

MODELS = ["gpt-realtime", "gpt-realtime-mini"]


async def first_event(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        event: dict[str, Any] = json.loads(await ws.recv())
        return event


async def close_code(ws: Any) -> int | None:
    async with asyncio.timeout(WAIT):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return int(ws.close_code) if ws.close_code is not None else None


@pytest.fixture
async def token_relay(relay_factory: Any, upstream: Any) -> Any:
    """A relay whose `gold` tier has two models, sharing the tests' token and JWT secret."""
    config = relay_settings(
        upstream.url,
        tiers={"default": {}, "gold": {"models": MODELS}},
        client_keys={PRO_KEY: "gold"},
        token_secret=TOKEN_SECRET,
        jwt={"secret": JWT_SECRET},
    )
    return await relay_factory(config)


async def mint(relay: Any, model: str | None = None) -> str:
    body: dict[str, Any] = {"expires_after": {"anchor": "created_at", "seconds": 60}}
    if model is not None:
        body["session"] = {"type": "realtime", "model": model}
    response = await post(f"{relay.http_url}/v1/realtime/client_secrets", json=body)
    assert response.status_code == 200
    token: str = response.json()["value"]
    return token


def browser(token: str) -> list[Subprotocol]:
    """The subprotocols a browser offers to present `token`."""
    return [Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{token}")]


async def test_token_for_a_model_opens_that_model_only(token_relay: Any, upstream: Any) -> None:
    """A token minted for the tier's second model opens it without `?model=` and with
    `?model=` naming it, and is refused `model_not_allowed` (1008) for the other model."""
    token = await mint(token_relay, "gpt-realtime-mini")
    async with connect(token_relay.ws_url, subprotocols=browser(token)) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    url = token_relay.ws_url + "?model=gpt-realtime-mini"
    async with connect(url, subprotocols=browser(token)) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    assert [c.query["model"] for c in upstream.connections] == ["gpt-realtime-mini"] * 2
    url = token_relay.ws_url + "?model=gpt-realtime"
    async with connect(url, subprotocols=browser(token)) as ws:
        error = await first_event(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "model_not_allowed")
        assert await close_code(ws) == 1008
    assert len(upstream.connections) == 2  # the refused session opened nothing upstream


async def test_token_without_a_model_opens_any_tier_model(token_relay: Any, upstream: Any) -> None:
    """A token minted without a session model opens the tier's default, or any model of the
    tier named by `?model=`."""
    token = await mint(token_relay)
    async with connect(token_relay.ws_url, subprotocols=browser(token)) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    url = token_relay.ws_url + "?model=gpt-realtime-mini"
    async with connect(url, subprotocols=browser(token)) as ws:
        assert (await first_event(ws))["type"] == "session.created"
    assert [c.query["model"] for c in upstream.connections] == MODELS


async def test_forged_tokens_are_unauthorized_at_the_websocket(
    token_relay: Any, upstream: Any
) -> None:
    """A tampered `ek_` token, an expired one, an app JWT given the `ek_` prefix and an `ek_`
    token's JWS without it each get `unauthorized` and a 1008 close, and open nothing upstream."""
    token = await mint(token_relay, "gpt-realtime")
    header, payload, signature = token[3:].split(".")
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B")
    tampered = f"ek_{header}.{payload}.{flipped}{signature[middle + 1 :]}"
    auth = token_relay.relay.auth
    expired, _ = auth.mint(auth.authenticate(PRO_KEY), 10, now=time.time() - 60)
    app_jwt = hs256(jwt_claims(tier="gold"))
    messages = []
    for credential in (tampered, expired, "ek_" + app_jwt, token[3:]):
        async with connect(token_relay.ws_url, subprotocols=browser(credential)) as ws:
            error = await first_event(ws)
            assert (error["type"], error["error"]["code"]) == ("error", "unauthorized")
            assert await close_code(ws) == 1008
            messages.append(error["error"]["message"])
    assert "expired" in messages[1]
    assert upstream.connections == []
    async with connect(token_relay.ws_url, subprotocols=browser(app_jwt)) as ws:
        assert (await first_event(ws))["type"] == "session.created"  # the JWT itself is good
