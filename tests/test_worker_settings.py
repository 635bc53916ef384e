"""``WorkerSettings`` (workers/settings.py) and how ``workers.app`` applies them."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]

_APP_PROBE = """
import json, os
from workers.app import app, settings
conf = app.conf
print(json.dumps({
    "acks_late": conf.task_acks_late,
    "broker_use_ssl": conf.broker_use_ssl,
    "redis_backend_use_ssl": conf.redis_backend_use_ssl,
    "flower_basic_auth": os.environ.get("FLOWER_BASIC_AUTH"),
}))
"""


def _probe_app(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "FLOWER_"))}
    clean["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", _APP_PROBE], cwd=REPO_ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """A file standing for a CA bundle (nothing connects, so its content does not matter)."""
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


def test_from_env_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_env(mapping)`` ignores os.environ; the broker defaults to the saga Redis URL."""
    monkeypatch.setenv("SAGA_BROKER_URL", "redis://elsewhere:1/1")
    monkeypatch.setenv("SAGA_IMPORTS", "not.this")

    settings = WorkerSettings.from_env({"SAGA_REDIS_URL": "redis://h:1/2",
                                        "SAGA_IMPORTS": " a.b , c ,", "SAGA_PREFIX": ""})

    assert settings.broker_url == "redis://h:1/2"
    assert settings.imports == ("a.b", "c")
    assert settings.prefix == "saga:"  # empty means default


def test_the_environment_is_read_with_the_saga_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """``WorkerSettings()`` reads SAGA_<FIELD> variables; empty ones take the default."""
    monkeypatch.setenv("SAGA_STEPS_QUEUE", "orders.steps")
    monkeypatch.setenv("SAGA_VISIBILITY_TIMEOUT", "120")
    monkeypatch.setenv("SAGA_BROKER_URL", "")

    settings = WorkerSettings()

    assert (settings.steps_queue, settings.visibility_timeout) == ("orders.steps", 120)
    assert settings.broker_url == settings.redis_url


@pytest.mark.parametrize("env, field", [
    ({"SAGA_VISIBILITY_TIMEOUT": "0"}, "visibility_timeout"),
    ({"SAGA_IMPORTS": "shop sagas"}, "SAGA_IMPORTS"),
    ({"SAGA_SSL_CERT_REQS": "sometimes"}, "ssl_cert_reqs"),
    ({"SAGA_FLOWER_USER": "admin"}, "SAGA_FLOWER_PASSWORD"),
    ({"SAGA_FLOWER_USER": "a:b", "SAGA_FLOWER_PASSWORD": "p"}, "SAGA_FLOWER_USER"),
])
def test_bad_settings_are_refused_naming_the_setting(env: dict[str, str], field: str) -> None:
    """A bad value stops the process at startup with an error naming the setting."""
    with pytest.raises(ValidationError, match=field):
        WorkerSettings.from_env(env)


def test_rediss_with_certificate_checks_off_is_refused() -> None:
    """``rediss://`` with SAGA_SSL_CERT_REQS=none (or ssl_cert_reqs=none in the URL) is refused."""
    with pytest.raises(ValidationError, match="SAGA_SSL_CERT_REQS=none"):
        WorkerSettings.from_env({"SAGA_REDIS_URL": "rediss://h:6380/0",
                                 "SAGA_SSL_CERT_REQS": "none"})
    with pytest.raises(ValidationError, match="ssl_cert_reqs=none in a rediss:// URL"):
        WorkerSettings.from_env({"SAGA_BROKER_URL": "rediss://h:6380/0?ssl_cert_reqs=none"})


def test_tls_files_need_a_rediss_url_and_must_exist(ca_file: str) -> None:
    """TLS files without a rediss:// URL, or that do not exist, are refused."""
    with pytest.raises(ValidationError, match="neither SAGA_REDIS_URL nor SAGA_BROKER_URL"):
        WorkerSettings.from_env({"SAGA_SSL_CA_CERTS": ca_file})
    missing = re.escape("no such file: SAGA_SSL_KEYFILE=/nope/key.pem")
    with pytest.raises(ValidationError, match=missing):
        WorkerSettings.from_env({"SAGA_REDIS_URL": "rediss://h/0",
                                 "SAGA_SSL_KEYFILE": "/nope/key.pem"})


def test_the_saga_store_url_carries_the_tls_settings(ca_file: str) -> None:
    """For rediss:// the store URL gains the TLS options, keeping any the URL already has."""
    settings = WorkerSettings.from_env({
        "SAGA_REDIS_URL": "rediss://:pw@h:6380/0?ssl_cert_reqs=optional",
        "SAGA_SSL_CA_CERTS": ca_file,
    })
    plain = WorkerSettings.from_env({"SAGA_REDIS_URL": "redis://h/0"})

    assert settings.state_url == (f"rediss://:pw@h:6380/0?ssl_cert_reqs=optional&"
                                  f"ssl_ca_certs={ca_file.replace('/', '%2F')}")
    assert settings.tls_options() == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file}
    assert plain.state_url == "redis://h/0"


def test_flower_credentials_stay_secret_until_asked_for() -> None:
    """Flower's password is hidden in the settings' repr and given as ``user:password``."""
    settings = WorkerSettings.from_env({"SAGA_FLOWER_USER": "ops",
                                        "SAGA_FLOWER_PASSWORD": "s3cret"})

    assert "s3cret" not in repr(settings)
    assert settings.flower_basic_auth == "ops:s3cret"
    assert WorkerSettings.from_env({}).flower_basic_auth is None


def test_the_app_applies_tls_acks_late_and_hands_flower_its_auth(ca_file: str) -> None:
    """workers.app puts the TLS options on the broker and backend, acks late, and sets
    FLOWER_BASIC_AUTH from the SAGA_FLOWER_* pair unless the operator set it."""
    probe = _probe_app(SAGA_REDIS_URL="rediss://h:6380/0", SAGA_SSL_CA_CERTS=ca_file,
                       SAGA_FLOWER_USER="ops", SAGA_FLOWER_PASSWORD="s3cret")
    tls = {"ssl_cert_reqs": int(ssl.CERT_REQUIRED), "ssl_ca_certs": ca_file}

    assert probe == {"acks_late": True, "broker_use_ssl": tls, "redis_backend_use_ssl": tls,
                     "flower_basic_auth": "ops:s3cret"}
    preset = _probe_app(SAGA_FLOWER_USER="ops", SAGA_FLOWER_PASSWORD="s3cret",
                        FLOWER_BASIC_AUTH="other:pw")
    assert preset["flower_basic_auth"] == "other:pw"
    assert preset["broker_use_ssl"] is False  # Celery's default: plain redis://


# --- where saga state lives: one Redis, a Redis Cluster, behind Sentinel ------------------

SENTINEL_ENV = {"SAGA_REDIS_URL": "redis://:pw@ignored:1/3", "SAGA_BROKER_URL": "redis://b/0",
                "SAGA_REDIS_SENTINELS": "s1:26379, 10.0.0.2:26380,",
                "SAGA_REDIS_SENTINEL_MASTER": "sagas"}


def test_sentinel_and_cluster_settings_are_read() -> None:
    """SAGA_REDIS_SENTINELS is a list of host:port, SAGA_REDIS_CLUSTER a boolean, and the
    durable-write settings are numbers."""
    sentinel = WorkerSettings.from_env({**SENTINEL_ENV, "SAGA_DURABLE_REPLICAS": "1",
                                        "SAGA_DURABLE_TIMEOUT_MS": "250"})
    cluster = WorkerSettings.from_env({"SAGA_REDIS_CLUSTER": "true",
                                       "SAGA_BROKER_URL": "redis://b/0"})

    assert sentinel.redis_sentinels == (("s1", 26379), ("10.0.0.2", 26380))
    assert sentinel.redis_sentinel_master == "sagas"
    assert (sentinel.durable_replicas, sentinel.durable_timeout_ms) == (1, 250)
    assert cluster.redis_cluster is True and cluster.redis_sentinels == ()


@pytest.mark.parametrize("env, message", [
    ({**SENTINEL_ENV, "SAGA_REDIS_CLUSTER": "true"}, "not both"),
    ({**SENTINEL_ENV, "SAGA_REDIS_SENTINEL_MASTER": ""}, "SAGA_REDIS_SENTINEL_MASTER"),
    ({"SAGA_REDIS_SENTINEL_MASTER": "sagas"}, "SAGA_REDIS_SENTINELS"),
    ({**SENTINEL_ENV, "SAGA_REDIS_SENTINELS": "s1"}, "not a host:port address: 's1'"),
    ({**SENTINEL_ENV, "SAGA_BROKER_URL": ""}, "SAGA_BROKER_URL"),
    ({"SAGA_REDIS_CLUSTER": "true"}, "SAGA_BROKER_URL"),
    ({"SAGA_DURABLE_REPLICAS": "-1"}, "durable_replicas"),
    ({"SAGA_DURABLE_TIMEOUT_MS": "0"}, "durable_timeout_ms"),
])
def test_inconsistent_topology_settings_are_refused(env: dict[str, str], message: str) -> None:
    """Cluster and Sentinel together, half a Sentinel setting, a bad address, a state store
    named as Celery's broker, or bad durable-write numbers stop the process at startup."""
    with pytest.raises(ValidationError, match=message):
        WorkerSettings.from_env(env)


def test_one_redis_is_given_to_the_saga_app_by_url() -> None:
    """Without cluster or sentinels, SagaApp gets SAGA_REDIS_URL, and no durable writes."""
    from workers.state import state_options

    options = state_options(WorkerSettings.from_env({"SAGA_REDIS_URL": "redis://h/2"}))

    assert options["redis_url"] == "redis://h/2" and "redis" not in options
    assert options["durable_replicas"] == 0


def test_sentinel_settings_give_a_master_client_with_the_urls_credentials() -> None:
    """SAGA_REDIS_SENTINELS gives SagaApp a Sentinel master client: its connections take the
    database and password of SAGA_REDIS_URL, and their address from the sentinels (nothing
    connects yet)."""
    from redis.sentinel import SentinelConnectionPool

    from workers.state import state_options

    options = state_options(WorkerSettings.from_env({**SENTINEL_ENV,
                                                     "SAGA_DURABLE_REPLICAS": "1"}))
    pool = options["redis"].connection_pool

    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "sagas"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "pw")
    assert "host" not in pool.connection_kwargs
    assert [s.connection_pool.connection_kwargs["port"]
            for s in pool.sentinel_manager.sentinels] == [26379, 26380]
    assert options["durable_replicas"] == 1


def test_a_cluster_that_cannot_be_reached_stops_the_process_saying_so() -> None:
    """SAGA_REDIS_CLUSTER=true with no cluster at SAGA_REDIS_URL fails when the app is built,
    with a SagaStoreUnavailableError naming the setting and without the password."""
    from saga_celery import SagaStoreUnavailableError
    from workers.state import state_options

    settings = WorkerSettings.from_env({"SAGA_REDIS_CLUSTER": "true",
                                        "SAGA_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
                                        "SAGA_BROKER_URL": "redis://b/0"})
    with pytest.raises(SagaStoreUnavailableError, match="SAGA_REDIS_URL") as raised:
        state_options(settings)
    assert "hunter2" not in str(raised.value)
