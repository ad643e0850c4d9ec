"""Upstream URL forms and headers for OpenAI, Azure and compatible servers."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from app.config import ConfigError, Settings, load_settings
from app.transport.upstream import build_target

KEY = "sk-test-0123456789abcdef"


def target(**upstream):
    return build_target(Settings(openai_api_key=KEY, upstream=upstream), "gpt-realtime")


def test_openai_form_uses_bearer_and_model_query():
    """OpenAI: /v1/realtime?model=..., Authorization: Bearer, no OpenAI-Beta header."""
    t = target()
    assert t.url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert dict(t.headers) == {"Authorization": f"Bearer {KEY}"}


def test_azure_ga_form_uses_api_key_and_deployment():
    """Azure GA: /openai/v1/realtime?model=<deployment>, api-key header."""
    t = target(
        url="wss://res.openai.azure.com", kind="azure", deployments={"gpt-realtime": "my-rt"}
    )
    parts = urlsplit(t.url)
    assert parts.path == "/openai/v1/realtime"
    assert parse_qs(parts.query) == {"model": ["my-rt"]}
    assert dict(t.headers) == {"api-key": KEY}


def test_compatible_server_keeps_its_query():
    """A custom URL keeps its own query parameters and gets the model added."""
    t = target(url="ws://127.0.0.1:9/v1/realtime?tenant=a&model=old")
    assert parse_qs(urlsplit(t.url).query) == {"tenant": ["a"], "model": ["gpt-realtime"]}


def test_target_repr_hides_the_key():
    """The key never shows in a repr (and so in logs or tracebacks)."""
    assert KEY not in repr(target())


def test_azure_api_version_is_refused_at_startup():
    """The Azure GA path takes no api-version; the error names the variable."""
    with pytest.raises(ConfigError, match="RELAY_UPSTREAM__URL"):
        load_settings(
            openai_api_key=KEY,
            upstream={"url": "wss://r.openai.azure.com/openai/v1/realtime?api-version=x",
                      "kind": "azure"},
        )  # fmt: skip
