"""Security checks ``SagaApp`` runs on the Celery app it is given, before it touches anything.

- JSON only: every serializer setting must be ``json`` or Celery's message-signing ``auth``
  serializer (which signs JSON).  A worker that accepts ``pickle`` runs whatever code anyone
  who can write to the broker puts in a message; saga arguments, outputs and params are
  JSON anyway.
- TLS that checks certificates: a ``rediss://`` URL (broker, saga state, result backend) or
  an ``*_use_ssl`` setting with ``ssl_cert_reqs`` none encrypts traffic to whoever answers,
  a man in the middle included: refused.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from saga_celery._errors import SagaConfigError

SAFE_CONTENT = frozenset({"json", "application/json", "auth", "application/data"})
"""Serializer names and content types a saga app may use (``auth`` is Celery's signed JSON)."""

SIGNED = frozenset({"auth", "application/data"})

_SERIALIZER_SETTINGS = ("accept_content", "result_accept_content", "task_serializer",
                        "result_serializer", "event_serializer")
_URL_SETTINGS = ("broker_url", "result_backend")
_SSL_SETTINGS = ("broker_use_ssl", "redis_backend_use_ssl")
_NO_CHECK = frozenset({"none", "cert_none"})


def check_app(conf: Mapping[str, Any], *, redis_url: str | None = None) -> None:
    """Raise ``SagaConfigError`` if the app's settings are unsafe for sagas (see the module)."""
    check_serializers(conf)
    check_tls(conf, redis_url=redis_url)


def check_serializers(conf: Mapping[str, Any]) -> None:
    problems = [f"{name}={value!r}" for name in _SERIALIZER_SETTINGS
                if (value := conf.get(name)) is not None
                and any(str(v).lower() not in SAFE_CONTENT for v in _as_list(value))]
    if problems:
        raise SagaConfigError(
            f"SagaApp refuses a Celery app with {', '.join(problems)}: only JSON, or JSON "
            "signed with Celery's 'auth' serializer, is allowed. A worker that accepts pickle "
            "runs any code that anyone able to write to the broker sends it, and saga "
            "arguments, outputs and params are JSON anyway. Set accept_content=['json'] and "
            "task_serializer / result_serializer / event_serializer='json' (or 'auth' with "
            "app.setup_security() to sign messages).")


def check_tls(conf: Mapping[str, Any], *, redis_url: str | None = None) -> None:
    urls = [(name, url) for name in _URL_SETTINGS for url in _urls(conf.get(name))]
    urls += [("redis_url", url) for url in _urls(redis_url)]
    for name, url in urls:
        if url.startswith("rediss://") and _no_check(_query(url).get("ssl_cert_reqs")):
            raise SagaConfigError(
                f"SagaApp refuses {name} {_safe(url)}: ssl_cert_reqs=none turns off the check "
                "of the Redis server's certificate, so TLS protects nothing against a man in "
                "the middle. Use ssl_cert_reqs=required (redis-py's default for rediss://) "
                "with ssl_ca_certs=<the CA that signed the server's certificate>.")
    for name in _SSL_SETTINGS:
        options = conf.get(name)
        if isinstance(options, Mapping) and _no_check(options.get("ssl_cert_reqs", "required")):
            raise SagaConfigError(
                f"SagaApp refuses {name}={{'ssl_cert_reqs': {options['ssl_cert_reqs']!r}, ...}}: "
                "it turns off the check of the Redis server's certificate, so TLS protects "
                "nothing against a man in the middle. Use ssl.CERT_REQUIRED with "
                "'ssl_ca_certs': <the CA that signed the server's certificate>.")


def signing(conf: Mapping[str, Any]) -> bool:
    """Whether the app signs its task messages (``task_serializer='auth'``)."""
    return str(conf.get("task_serializer") or "").lower() in SIGNED


def _as_list(value: object) -> list[object]:
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, Iterable) else [value]


def _urls(value: object) -> list[str]:
    """A setting's URLs: Celery accepts one, a ``;``-separated string, or a list."""
    if not value:
        return []
    items = value.split(";") if isinstance(value, str) else _as_list(value)
    return [str(item).strip() for item in items if isinstance(item, str) and item.strip()]


def _query(url: str) -> dict[str, str]:
    return {k.lower(): v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def _no_check(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _NO_CHECK
    return value is not None and value == ssl.CERT_NONE


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
