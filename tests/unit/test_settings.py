"""Settings: defaults, sources, validation messages and the production guard rails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forgeline.errors import ConfigurationError
from forgeline.settings import Settings, get_settings

#: A database URL with a real-looking password, for prod settings that must pass.
PROD_DATABASE_URL = "postgresql://forgeline:s3cr3t-Pa55@db.internal:5432/forgeline"


@pytest.fixture
def set_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Sets ``FORGELINE_*`` variables from keyword arguments (``port=1`` → FORGELINE_PORT)."""

    def set_values(**values: object) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"FORGELINE_{name.upper()}", str(value))

    return set_values


@pytest.fixture
def write_env_file(tmp_path: Path) -> Callable[..., Path]:
    """Writes a ``.env`` file in the working directory (the autouse fixture's tmp_path)."""

    def write(text: str) -> Path:
        path = tmp_path / ".env"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def configuration_problems(**overrides: Any) -> list[str]:
    """The lines of the ConfigurationError that ``get_settings(**overrides)`` raises."""
    with pytest.raises(ConfigurationError) as caught:
        get_settings(**overrides)
    message: str = caught.value.message
    return message.splitlines()


def prod(**overrides: Any) -> dict[str, Any]:
    """Settings values for a prod deployment that passes every check, plus ``overrides``."""
    return {
        "environment": "prod",
        "database_url": PROD_DATABASE_URL,
        "secret_key": "k3y-for-hashing-api-keys",
        **overrides,
    }


# -- defaults ---------------------------------------------------------------


def test_defaults_describe_a_local_development_setup() -> None:
    """With nothing configured: dev, embedded database migrated at start, local model server."""
    settings = get_settings()

    assert settings.environment == "dev"
    assert settings.log_level == "info"
    assert settings.database_url is None
    assert settings.embedded_database
    assert settings.should_auto_migrate
    assert settings.storage_url is None
    assert settings.backend == "builtin"
    assert settings.builtin_model_path is None
    assert settings.openai_base_url == "http://localhost:11434/v1"
    assert settings.openai_api_key is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.pipelines == []
    assert settings.max_attempts == 3


def test_default_timings_are_consistent() -> None:
    """The default stall threshold exceeds the default drain timeout plus two heartbeats."""
    settings = get_settings()

    assert settings.stall_threshold_s > settings.drain_timeout_s + 2 * settings.heartbeat_interval_s


def test_auto_migrate_defaults_off_for_an_external_database() -> None:
    """A configured database is not migrated at start unless asked; asking turns it on."""
    assert not get_settings(database_url=PROD_DATABASE_URL).should_auto_migrate
    assert get_settings(database_url=PROD_DATABASE_URL, auto_migrate=True).should_auto_migrate
    assert not get_settings(auto_migrate=False).should_auto_migrate


def test_effective_storage_url_defaults_into_the_data_dir(tmp_path: Path) -> None:
    """Without FORGELINE_STORAGE_URL, artifacts go to an ``artifacts`` folder of the data dir."""
    settings = get_settings(data_dir=tmp_path / "data")

    assert settings.effective_storage_url == (tmp_path / "data" / "artifacts").resolve().as_uri()
    assert settings.effective_storage_url.startswith("file:///")


def test_effective_storage_url_prefers_the_configured_one() -> None:
    """A configured storage URL is used as given."""
    settings = get_settings(storage_url="s3://bucket/prefix")

    assert settings.effective_storage_url == "s3://bucket/prefix"


# -- sources ----------------------------------------------------------------


def test_reads_prefixed_environment_variables(set_env: Callable[..., None]) -> None:
    """``FORGELINE_*`` variables set the matching settings, converted to their types."""
    set_env(port=9123, log_level="debug", worker_concurrency=3, auto_migrate="true")

    settings = get_settings()

    assert settings.port == 9123
    assert settings.log_level == "debug"
    assert settings.worker_concurrency == 3
    assert settings.auto_migrate is True


def test_ignores_variables_without_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unprefixed ``PORT`` does not configure forgeline."""
    monkeypatch.setenv("PORT", "9999")

    assert get_settings().port == 8000


def test_reads_a_dotenv_file(write_env_file: Callable[..., Path]) -> None:
    """A ``.env`` file in the working directory is read."""
    write_env_file("FORGELINE_PORT=9200\nFORGELINE_OPENAI_MODEL=qwen2.5\n")

    settings = get_settings()

    assert settings.port == 9200
    assert settings.openai_model == "qwen2.5"


def test_environment_wins_over_dotenv(
    write_env_file: Callable[..., Path], set_env: Callable[..., None]
) -> None:
    """A variable set in the environment overrides the same one in ``.env``."""
    write_env_file("FORGELINE_PORT=9200\n")
    set_env(port=9300)

    assert get_settings().port == 9300


def test_overrides_win_over_the_environment(set_env: Callable[..., None]) -> None:
    """Keyword overrides (what tests and the CLI pass) beat the environment."""
    set_env(port=9300)

    assert get_settings(port=9400).port == 9400


def test_pipelines_is_a_comma_separated_list(set_env: Callable[..., None]) -> None:
    """FORGELINE_PIPELINES splits on commas, trimming blanks and dropping empty items."""
    set_env(pipelines=" pkg.a:One, pkg.b:Two ,, ")

    assert get_settings().pipelines == ["pkg.a:One", "pkg.b:Two"]


def test_pipelines_accepts_a_list() -> None:
    """A list passed directly is kept as is."""
    assert get_settings(pipelines=["pkg.a:One"]).pipelines == ["pkg.a:One"]


def test_empty_database_url_variable_means_embedded(set_env: Callable[..., None]) -> None:
    """An empty FORGELINE_DATABASE_URL (as `.env.example` leaves it) selects the embedded server."""
    set_env(database_url="")

    assert get_settings().embedded_database


# -- invalid values ---------------------------------------------------------


def test_invalid_values_give_one_line_per_problem_naming_the_variable(
    set_env: Callable[..., None],
) -> None:
    """Every invalid variable gets its own line, starting with its name."""
    set_env(port="not-a-port", environment="production", worker_concurrency=0)

    with pytest.raises(ConfigurationError) as caught:
        get_settings()

    lines = caught.value.message.splitlines()
    assert len(lines) == 3
    assert sorted(line.split(":", 1)[0] for line in lines) == [
        "FORGELINE_ENVIRONMENT",
        "FORGELINE_PORT",
        "FORGELINE_WORKER_CONCURRENCY",
    ]
    assert caught.value.code == "configuration_error"


def test_invalid_value_in_dotenv_names_the_variable(write_env_file: Callable[..., Path]) -> None:
    """A bad value read from ``.env`` is reported like one from the environment."""
    write_env_file("FORGELINE_MAX_ATTEMPTS=0\n")

    assert [line.split(":", 1)[0] for line in configuration_problems()] == [
        "FORGELINE_MAX_ATTEMPTS"
    ]


def test_cross_field_problems_are_reported_together_without_pydantic_prefixes() -> None:
    """Several consistency problems come back at once, each line naming its variable."""
    lines = configuration_problems(
        environment="prod",
        stall_threshold_s=1.0,
        openai_base_url="https://api.openai.com/v1",
    )

    names = [line.split(":", 1)[0] for line in lines]
    assert names == [
        "FORGELINE_STALL_THRESHOLD_S",
        "FORGELINE_OPENAI_API_KEY",
        "FORGELINE_DATABASE_URL",
        "FORGELINE_SECRET_KEY",
    ]
    assert not any("Value error" in line for line in lines)


def test_base_url_must_be_a_url() -> None:
    """An OPENAI_BASE_URL without a host is refused by name."""
    (line,) = configuration_problems(openai_base_url="localhost-11434")

    assert line.startswith("FORGELINE_OPENAI_BASE_URL: not a URL")


# -- timing consistency -----------------------------------------------------


def test_stall_threshold_equal_to_drain_plus_two_heartbeats_is_refused() -> None:
    """The stall threshold must be strictly above drain timeout + 2 heartbeats."""
    (line,) = configuration_problems(
        drain_timeout_s=10.0, heartbeat_interval_s=2.0, stall_threshold_s=14.0
    )

    assert line.startswith("FORGELINE_STALL_THRESHOLD_S:")
    assert "14 s" in line


def test_stall_threshold_just_above_the_bound_is_accepted() -> None:
    """A threshold slightly above drain timeout + 2 heartbeats passes."""
    settings = get_settings(drain_timeout_s=10.0, heartbeat_interval_s=2.0, stall_threshold_s=14.1)

    assert settings.stall_threshold_s == 14.1


# -- model backend key ------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    ["https://api.openai.com/v1", "https://generativelanguage.googleapis.com/v1beta/openai/"],
)
def test_hosted_backends_require_an_api_key(base_url: str) -> None:
    """Hosted model services without FORGELINE_OPENAI_API_KEY are refused by name."""
    (line,) = configuration_problems(openai_base_url=base_url)

    assert line.startswith("FORGELINE_OPENAI_API_KEY: required by")


def test_hosted_backend_with_a_key_is_accepted() -> None:
    """The same URL passes once a key is set."""
    settings = get_settings(openai_base_url="https://api.openai.com/v1", openai_api_key="sk-real")

    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-real"


def test_local_backend_needs_no_key() -> None:
    """A local model server runs without a key."""
    assert get_settings(openai_base_url="http://127.0.0.1:8001/v1").openai_api_key is None


# -- production guard rails -------------------------------------------------


def test_prod_refuses_the_embedded_database() -> None:
    """Prod without FORGELINE_DATABASE_URL fails, naming the variable."""
    (line,) = configuration_problems(environment="prod", secret_key="k3y-for-hashing-api-keys")

    assert line.startswith("FORGELINE_DATABASE_URL: required in prod")


def test_prod_needs_a_secret_key_and_refuses_a_placeholder() -> None:
    """Prod needs the API key hash's key, a real one; and refuses a CORS wildcard."""
    missing = configuration_problems(**prod(secret_key=None))
    placeholder = configuration_problems(**prod(secret_key="changeme"))
    wildcard = configuration_problems(**prod(allowed_origins="*"))

    assert [line.split(":")[0] for line in missing] == ["FORGELINE_SECRET_KEY"]
    assert placeholder == ["FORGELINE_SECRET_KEY: holds a placeholder value"]
    assert [line.split(":")[0] for line in wildcard] == ["FORGELINE_ALLOWED_ORIGINS"]


def test_bad_rates_and_proxies_are_named() -> None:
    """A rate limit or trusted proxy that cannot be parsed is refused, naming the variable."""
    lines = configuration_problems(rate_limit_per_key="lots", trusted_proxies="10.0.0.0/8,nope")

    assert [line.split(":")[0] for line in lines] == [
        "FORGELINE_RATE_LIMIT_PER_KEY",
        "FORGELINE_TRUSTED_PROXIES",
    ]


def test_prod_with_real_secrets_is_accepted() -> None:
    """Prod with an external database and a real password passes."""
    settings = get_settings(**prod(openai_api_key="sk-live-abc123"))

    assert settings.environment == "prod"
    assert not settings.embedded_database


@pytest.mark.parametrize("password", ["changeme", "password", "CHANGE-ME", "secret"])
def test_prod_refuses_a_placeholder_database_password(password: str) -> None:
    """A placeholder password inside the database URL is refused in prod, whatever its case."""
    url = f"postgresql://forgeline:{password}@db.internal/forgeline"

    (line,) = configuration_problems(**prod(database_url=url))

    assert line == "FORGELINE_DATABASE_URL: holds a placeholder value"
    assert password not in line


@pytest.mark.parametrize("key", ["changeme", "example", "", "Secret"])
def test_prod_refuses_a_placeholder_api_key(key: str) -> None:
    """A placeholder (or empty) API key is refused in prod."""
    (line,) = configuration_problems(**prod(openai_api_key=key))

    assert line == "FORGELINE_OPENAI_API_KEY: holds a placeholder value"


def test_placeholders_are_allowed_outside_prod() -> None:
    """Dev and staging accept example secrets (the guard is for prod)."""
    url = "postgresql://forgeline:changeme@localhost/forgeline"

    for environment in ("dev", "staging"):
        settings = get_settings(environment=environment, database_url=url, openai_api_key="x")
        assert settings.environment == environment


# -- redaction --------------------------------------------------------------


def test_redacted_never_shows_a_secret_value(tmp_path: Path) -> None:
    """``redacted()`` masks the database URL (with its password) and the API key."""
    settings = get_settings(
        database_url="postgresql://forgeline:hunter2-db@db.internal/forgeline",
        openai_api_key="sk-hunter2-key",
        data_dir=tmp_path,
    )

    shown = settings.redacted()

    joined = "\n".join(f"{name}={value}" for name, value in shown.items())
    assert "hunter2" not in joined
    assert shown["FORGELINE_DATABASE_URL"] == "**********"
    assert shown["FORGELINE_OPENAI_API_KEY"] == "**********"


def test_redacted_lists_every_setting_by_variable_name(tmp_path: Path) -> None:
    """Every field appears under its variable name; unset values say so."""
    settings = get_settings(data_dir=tmp_path)

    shown = settings.redacted()

    assert set(shown) == {f"FORGELINE_{name.upper()}" for name in Settings.model_fields}
    assert shown["FORGELINE_DATABASE_URL"] == "(unset)"
    assert shown["FORGELINE_PORT"] == "8000"
    assert shown["FORGELINE_STORAGE_URL"] == (tmp_path / "artifacts").resolve().as_uri()


def test_transformers_backend_needs_a_model_path() -> None:
    """FORGELINE_BACKEND=transformers without a model folder fails, naming the variable."""
    (line,) = configuration_problems(backend="transformers")

    assert line.startswith("FORGELINE_LOCAL_MODEL_PATH:")
