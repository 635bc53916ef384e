"""``WorkerSettings``: what a deployment of ``workers.app`` is configured with.

Every field is read from the environment variable ``SAGA_<FIELD>`` (pydantic-settings).
Importing this module has no side effects, unlike ``workers.app``, which builds the app.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENV_PREFIX = "SAGA_"
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class WorkerSettings(BaseSettings):
    """What a worker deployment is configured with: ``SAGA_<FIELD>`` environment variables.

    Unset or empty variables take the defaults.  Validated when ``workers.app`` is imported,
    so a misconfigured process refuses to start instead of failing inside a task.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True,
                                      frozen=True, extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    """Where saga state lives (``SAGA_REDIS_URL``): ``redis://``, ``rediss://`` or ``unix://``;
    with ``redis_cluster``, any node of the cluster; with ``redis_sentinels``, only its
    database, user, password and TLS count (Sentinel names the master's address)."""
    redis_cluster: bool = False
    """``SAGA_REDIS_CLUSTER=true``: saga state is on a Redis Cluster."""
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    """``SAGA_REDIS_SENTINELS=host:port,host:port``: saga state is on the master these
    sentinels name ``redis_sentinel_master``."""
    redis_sentinel_master: str | None = None
    """The name the sentinels watch the saga state's master under
    (``SAGA_REDIS_SENTINEL_MASTER``)."""
    durable_replicas: int = Field(default=0, ge=0)
    """``SAGA_DURABLE_REPLICAS``: each saga write waits until that many replicas have it
    (``WAIT``), and fails if they do not confirm within ``durable_timeout_ms`` (README, "Redis
    topologies"); 0 does not wait."""
    durable_timeout_ms: int = Field(default=1000, gt=0)
    """How long a saga write waits for its replicas (``SAGA_DURABLE_TIMEOUT_MS``)."""
    broker_url: str = DEFAULT_REDIS_URL
    """Celery's broker (``SAGA_BROKER_URL``); defaults to ``redis_url``."""
    prefix: str = Field(default="saga:", min_length=1)
    """Key prefix of saga state (``SAGA_PREFIX``): never evict keys under it."""
    steps_queue: str = Field(default="saga.steps", min_length=1)
    """Queue of forward steps (``SAGA_STEPS_QUEUE``)."""
    rollbacks_queue: str = Field(default="saga.rollbacks", min_length=1)
    """Queue of rollbacks, coordination and the recovery sweep (``SAGA_ROLLBACKS_QUEUE``)."""
    imports: Annotated[tuple[str, ...], NoDecode] = ("workers.shop",)
    """Modules that declare steps and sagas (``SAGA_IMPORTS``, comma-separated)."""
    visibility_timeout: int = Field(default=3600, gt=0)
    """The Redis transport's visibility timeout in seconds (``SAGA_VISIBILITY_TIMEOUT``): it
    must exceed every step's longest retry delay plus its timeout."""
    recovery_interval: int = Field(default=30, gt=0)
    """Seconds between two recovery sweeps sent by beat (``SAGA_RECOVERY_INTERVAL``)."""
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """Server certificate check for ``rediss://`` URLs (``SAGA_SSL_CERT_REQS``); ``none`` is
    refused."""
    ssl_ca_certs: str | None = None
    """CA bundle that signed Redis's certificate (``SAGA_SSL_CA_CERTS``)."""
    ssl_certfile: str | None = None
    """Client certificate, for Redis with ``tls-auth-clients`` (``SAGA_SSL_CERTFILE``)."""
    ssl_keyfile: str | None = None
    """Key of the client certificate (``SAGA_SSL_KEYFILE``)."""
    flower_user: str | None = None
    """Flower's basic-auth user (``SAGA_FLOWER_USER``); set with ``flower_password``."""
    flower_password: SecretStr | None = None
    """Flower's basic-auth password (``SAGA_FLOWER_PASSWORD``)."""
    write_format: int | None = None
    """The format new sagas are created in (``SAGA_WRITE_FORMAT``): the newest when unset; 1
    while processes of 0.1.0 may still run (README, "Upgrading")."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """Settings from ``environ`` (default ``os.environ``); unset or empty means default."""
        if environ is None:
            return cls()
        given = {name.upper(): value for name, value in environ.items() if value}
        # Every field passed, None for unset: init values win over os.environ's, and the
        # "before" validator turns None back into the default.
        values: dict[str, Any] = {name: given.get(f"{ENV_PREFIX}{name.upper()}")
                                  for name in cls.model_fields}
        return cls(**values)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        data.setdefault("broker_url", data.get("redis_url") or DEFAULT_REDIS_URL)
        return data

    @field_validator("imports", mode="before")
    @classmethod
    def _split_imports(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            modules = tuple(str(m).strip() for m in value if str(m).strip())
            bad = [m for m in modules if not _MODULE_PATH.match(m)]
            if bad:
                raise ValueError(f"SAGA_IMPORTS: not a dotted module path: {bad}")
            return modules
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        addresses = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            host, _, port = part.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"SAGA_REDIS_SENTINELS: not a host:port address: {part!r}")
            addresses.append((host.strip("[]"), int(port)))
        return tuple(addresses)

    @model_validator(mode="after")
    def _check_topology(self) -> WorkerSettings:
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError("set SAGA_REDIS_CLUSTER or SAGA_REDIS_SENTINELS, not both: saga "
                             "state is on a Redis Cluster or behind Sentinel")
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError("set both SAGA_REDIS_SENTINELS (host:port,...) and "
                             "SAGA_REDIS_SENTINEL_MASTER (the name they watch), or neither")
        if (self.redis_cluster or self.redis_sentinels) and self.broker_url == self.redis_url:
            raise ValueError(
                "set SAGA_BROKER_URL to Celery's broker: with SAGA_REDIS_CLUSTER or "
                "SAGA_REDIS_SENTINELS, SAGA_REDIS_URL is not a broker Celery can use")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> WorkerSettings:
        tls_urls = [u for u in (self.redis_url, self.broker_url) if u.startswith("rediss://")]
        if tls_urls and self.ssl_cert_reqs == "none":
            raise ValueError(
                "SAGA_SSL_CERT_REQS=none would accept any certificate from the rediss:// "
                "server, so TLS would not protect the saga state or the broker: refused. "
                "Use required (with SAGA_SSL_CA_CERTS for a private CA) or optional.")
        if any(_query(u).get("ssl_cert_reqs") in ("none", "CERT_NONE") for u in tls_urls):
            raise ValueError("ssl_cert_reqs=none in a rediss:// URL turns certificate checks "
                             "off: refused. Drop it from the URL and use SAGA_SSL_CERT_REQS.")
        files = {f: getattr(self, f) for f in _TLS_FILES if getattr(self, f)}
        if files and not tls_urls:
            raise ValueError(f"{', '.join(f'SAGA_{f.upper()}' for f in files)} set, but "
                             "neither SAGA_REDIS_URL nor SAGA_BROKER_URL is rediss://: "
                             "use rediss:// URLs for TLS, or unset them.")
        missing = [f"SAGA_{f.upper()}={p}" for f, p in files.items() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"no such file: {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _check_flower_auth(self) -> WorkerSettings:
        password = self.flower_password.get_secret_value() if self.flower_password else ""
        if bool(self.flower_user) != bool(password):
            raise ValueError("set both SAGA_FLOWER_USER and SAGA_FLOWER_PASSWORD, or neither")
        if set(self.flower_user or "") & {":", ","} or "," in password:
            raise ValueError("SAGA_FLOWER_USER may not contain ':' or ',', "
                             "SAGA_FLOWER_PASSWORD not ','")
        return self

    def tls_options(self) -> dict[str, Any]:
        """The ``ssl`` options of a ``rediss://`` connection (``broker_use_ssl`` style)."""
        options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[self.ssl_cert_reqs]}
        options.update({f: getattr(self, f) for f in _TLS_FILES if getattr(self, f)})
        return options

    @property
    def state_url(self) -> str:
        """``redis_url`` with the TLS settings added as query parameters when it is rediss://."""
        if not self.redis_url.startswith("rediss://"):
            return self.redis_url
        present = _query(self.redis_url)
        wanted = {"ssl_cert_reqs": self.ssl_cert_reqs,
                  **{f: getattr(self, f) for f in _TLS_FILES if getattr(self, f)}}
        extra = {k: v for k, v in wanted.items() if k not in present}
        parts = urlsplit(self.redis_url)
        query = "&".join(filter(None, [parts.query, urlencode(extra)]))
        return urlunsplit(parts._replace(query=query))

    @property
    def flower_basic_auth(self) -> str | None:
        """``user:password`` for Flower's ``--basic-auth``, or None when not configured."""
        if self.flower_user is None or self.flower_password is None:
            return None
        return f"{self.flower_user}:{self.flower_password.get_secret_value()}"


def _query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
