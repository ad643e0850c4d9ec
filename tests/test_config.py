"""Settings from the environment: names, JSON fields, TOML file, and errors naming variables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.config import ConfigError, Settings, load_settings


@pytest.fixture
def env(monkeypatch):
    for name in ("OPENAI_API_KEY", "RELAY_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env-key-0000")
    return monkeypatch


def test_only_the_key_gives_working_defaults(env):
    """A fresh start with only OPENAI_API_KEY set has one default tier and OpenAI upstream."""
    settings = load_settings()
    assert settings.upstream.url == "wss://api.openai.com/v1/realtime"
    assert list(settings.tiers) == ["default"] and settings.anonymous_tier == "default"
    assert settings.tier_models("default") == ["gpt-realtime-mini"]


def test_nested_and_json_variables(env):
    """RELAY_UPSTREAM__URL, RELAY_SESSION__TOOLS and RELAY_TIERS are read as documented."""
    env.setenv("RELAY_UPSTREAM__URL", "ws://127.0.0.1:1/v1/realtime")
    env.setenv("RELAY_UPSTREAM__KIND", "azure")
    env.setenv("RELAY_SESSION__MODEL", "gpt-4o-mini-realtime-preview")
    env.setenv("RELAY_SESSION__TOOLS", '[{"type": "function", "name": "lookup"}]')
    env.setenv(
        "RELAY_TIERS",
        '{"free": {"models": ["gpt-4o-mini-realtime-preview"], "max_sessions": 3},'
        ' "pro": {"models": ["gpt-4o-realtime-preview", "gpt-realtime"]}}',
    )
    env.setenv("RELAY_CLIENT_KEYS", '{"k1": "pro"}')
    env.setenv("RELAY_ANONYMOUS_TIER", "free")
    settings = load_settings()
    assert settings.upstream.url.startswith("ws://127.0.0.1:1")
    assert settings.upstream.kind == "azure"
    assert settings.session.tools[0]["name"] == "lookup"
    assert settings.tiers["free"].max_sessions == 3
    assert settings.tier_models("pro")[0] == "gpt-4o-realtime-preview"


def test_missing_key_is_named(env):
    """Without OPENAI_API_KEY the relay refuses to start and says which variable."""
    env.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        load_settings()


def test_bad_nested_value_names_the_variable(env):
    """A bad value fails at start-up naming its variable."""
    env.setenv("RELAY_UPSTREAM__URL", "https://not-a-websocket")
    with pytest.raises(ConfigError, match="RELAY_UPSTREAM__URL"):
        load_settings()


def test_client_key_to_unknown_tier_is_refused(env):
    """A client key mapped to a tier that does not exist is a start-up error."""
    env.setenv("RELAY_CLIENT_KEYS", '{"k1": "nope"}')
    with pytest.raises(ConfigError, match="RELAY_CLIENT_KEYS"):
        load_settings()


def test_toml_file_is_read_under_the_environment(env, tmp_path):
    """RELAY_CONFIG_FILE names a TOML file; the environment wins over it."""
    path = tmp_path / "relay.toml"
    path.write_text(
        '[session]\ninstructions = "from toml"\nvoice = "ash"\n'
        '[tiers.gold]\nmodels = ["gpt-realtime"]\n'
    )
    env.setenv("RELAY_CONFIG_FILE", str(path))
    env.setenv("RELAY_SESSION__VOICE", "verse")
    settings = load_settings()
    assert settings.session.instructions == "from toml"
    assert settings.session.voice == "verse"
    assert "gold" in settings.tiers


def test_secret_does_not_show(env):
    """The key is a SecretStr: it does not appear in the settings' repr."""
    assert "sk-test-env-key-0000" not in repr(load_settings())


@pytest.mark.parametrize("key", ["sha256:zz", "sha256:abcd"])
def test_malformed_hashed_client_key_is_refused(env, key):
    """A `sha256:` key that is not 64 hex digits could never match: refuse it at start-up."""
    env.setenv("RELAY_CLIENT_KEYS", f'{{"{key}": "default"}}')
    with pytest.raises(ConfigError, match="RELAY_CLIENT_KEYS"):
        load_settings()


def test_the_server_refuses_to_start_without_a_key():
    """`python -m app` (the image's command) never falls back to the demo: it names the key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RELAY_"))}
    done = subprocess.run(
        [sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "OPENAI_API_KEY" in done.stderr


@pytest.mark.parametrize(
    "rule", ["alloy", {"min": "5"}, {"least": 1}, {}], ids=["string", "text-bound", "key", "empty"]
)
def test_allowed_values_rules_are_checked_at_start_up(rule):
    """A rule that is neither a list nor numeric bounds stops the relay, naming the field."""
    tiers = {"default": {"allowed_values": {"audio.output.voice": rule}}}
    with pytest.raises(ValidationError, match="allowed_values"):
        Settings(openai_api_key="x", tiers=tiers)


def test_a_cost_limit_needs_a_price_for_each_model():
    """A cost budget over a model with no price would count $0: refused at start-up."""
    tiers = {"default": {"models": ["gpt-realtime-2"], "max_cost_usd_per_session": 1.0}}
    with pytest.raises(ValidationError, match="no price"):
        Settings(openai_api_key="x", tiers=tiers)
    priced = {"gpt-realtime-2": "gpt-realtime"}
    assert Settings(openai_api_key="x", tiers=tiers, price_aliases=priced)
