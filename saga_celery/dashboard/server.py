"""The dashboard's web server: Tornado handlers over a ``SagaApp``'s public reading API.

Pages: ``/`` (the saga list: newest first, ``?status=``, ``?name=``, ``?q=`` an id or part of
one, ``?page=``) and ``/sagas/<id>`` (timeline, step table, events).  JSON: ``/api/sagas``
(the list, same query), ``/api/sagas/<id>`` (the ``SagaState``) and
``/api/sagas/<id>/events``.  Every route, the static files too, asks for basic auth when
users are given (as Flower's ``--basic-auth``).

The store is read with ``sagas.run(id).status()``, ``.events()`` and ``sagas.reader.recent()``
(what ``saga-celery list`` reads), in Tornado's thread pool so that a slow Redis never
stalls the server for other requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from saga_celery._celery.app import SagaApp
from saga_celery._core.model import SagaRun, SagaStatus
from saga_celery._errors import SagaError, SagaNotFoundError
from saga_celery._extras import MissingExtraError
from saga_celery.dashboard.view import OUTCOMES, TERMINAL, Row, list_row, step_lines, timeline

try:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.ioloop import IOLoop
    from tornado.netutil import bind_sockets
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra message
    raise MissingExtraError("dashboard", "tornado",
                            needed_by="saga-celery dashboard") from exc

__all__ = ["PER_PAGE", "SEARCH_WINDOW", "Settings", "make_app", "parse_users", "revision",
           "serve"]

PER_PAGE = 25
"""Sagas on one page of the list."""
MAX_OFFSET = 10_000
"""How deep the list pages: each page reads the sagas before it again."""
SEARCH_WINDOW = 1000
"""A search by part of an id looks among this many of the newest sagas (an exact id: all)."""
REFRESH_MS = 1500
"""How often the page of a running saga asks the JSON API whether the saga changed."""
LIST_REFRESH_MS = 5000
"""How often the list asks whether it changed (a page of the list is dearer to read)."""

HERE = Path(__file__).parent
_KNOWN = frozenset(s.value for s in HTTPStatus)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What ``saga-celery dashboard`` was started with."""

    flower_url: str | None = None
    """Flower's base URL: each step and rollback links to ``<flower>/task/<task id>``."""
    users: Mapping[str, str] | None = None
    """user -> password; None serves without auth."""
    per_page: int = PER_PAGE


def parse_users(values: Sequence[str]) -> dict[str, str]:
    """``["user:pass", "u2:p2,u3:p3"]`` as Flower's ``--basic-auth`` reads them; ``ValueError``
    naming the entry that has no ``:`` or an empty user."""
    users: dict[str, str] = {}
    for value in values:
        for entry in filter(None, (part.strip() for part in value.split(","))):
            user, sep, password = entry.partition(":")
            if not sep or not user:
                raise ValueError(f"basic auth entry {entry.split(':')[0]!r}... is not "
                                 "user:password")
            users[user] = password
    return users


class _Base(tornado.web.RequestHandler):
    """Basic auth on every request, and the app's reads off the event loop."""

    sagas: SagaApp
    settings_: Settings

    def initialize(self, sagas: SagaApp, settings: Settings) -> None:
        self.sagas = sagas
        self.settings_ = settings

    def prepare(self) -> None:
        _check_auth(self, self.settings_.users)

    def send_json(self, body: str) -> None:
        """Answer with the JSON ``body`` and its revision."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("X-Saga-Revision", revision(body))
        self.set_header("Cache-Control", "no-store")
        self.finish(body)

    async def read(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a read of the store) in the thread pool."""
        return await IOLoop.current().run_in_executor(None, fn)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = HTTPStatus(status_code).phrase if status_code in _KNOWN else "Error"
        if isinstance(exc, SagaError):
            message = str(exc)
        elif isinstance(exc, BadQuery):
            message = exc.message
        if self.request.path.startswith("/api/"):
            self.finish({"error": message, "status": status_code})
        else:
            self.render("error.html", status=status_code, message=message)

    def fail(self, exc: SagaError) -> None:
        """Answer 404 for an unknown saga, 503 for any other store error."""
        code = 404 if isinstance(exc, SagaNotFoundError) else 503
        self.send_error(code, exc_info=(type(exc), exc, exc.__traceback__))


def _check_auth(handler: tornado.web.RequestHandler, users: Mapping[str, str] | None) -> None:
    """Answer 401 (and end the request) unless ``users`` is None or the request has one of
    their user:password pairs."""
    if users is None or _authorized(handler.request.headers.get("Authorization"), users):
        return
    handler.set_status(401)
    handler.set_header("WWW-Authenticate", 'Basic realm="saga-celery dashboard"')
    handler.finish("Access denied: this dashboard needs basic auth\n")


def _authorized(header: str | None, users: Mapping[str, str]) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = users.get(user)
    return expected is not None and hmac.compare_digest(expected.encode(), password.encode())


class BadQuery(tornado.web.HTTPError):
    """A 400 whose message says what is wrong with the query."""

    def __init__(self, message: str) -> None:
        super().__init__(400)
        self.message = message


@dataclass(frozen=True, kw_only=True)
class _Query:
    status: str | None
    name: str | None
    q: str | None
    page: int

    def href(self, **changes: Any) -> str:
        values = {"status": self.status, "name": self.name, "q": self.q, "page": self.page,
                  **changes}
        query = {k: v for k, v in values.items() if v not in (None, "", 0)}
        return "/?" + urlencode(query) if query else "/"


class _Listing(_Base):
    def query(self) -> _Query:
        status = self.get_argument("status", "") or None
        if status is not None and status not in {s.value for s in SagaStatus}:
            raise BadQuery(f"unknown status {status!r}: one of "
                           + ", ".join(s.value for s in SagaStatus))
        try:
            page = max(int(self.get_argument("page", "0") or 0), 0)
        except ValueError:
            raise BadQuery("page must be a number") from None
        if page * self.settings_.per_page >= MAX_OFFSET:
            raise BadQuery(f"page {page} is past the {MAX_OFFSET} newest sagas the list "
                           "pages through: narrow it with status, name or id")
        return _Query(status=status, name=self.get_argument("name", "") or None,
                      q=(self.get_argument("q", "") or "").strip() or None, page=page)

    async def page(self, query: _Query) -> tuple[list[Row], bool] | None:
        """``rows`` read off the event loop; None once a store error has been answered."""
        try:
            return await self.read(lambda: self.rows(query))
        except SagaError as exc:
            self.fail(exc)
            return None

    def rows(self, query: _Query) -> tuple[list[Row], bool]:
        """One page of the list, and whether another page follows."""
        per_page = self.settings_.per_page
        first = query.page * per_page
        if query.q is None:
            runs = list(self.sagas.reader.recent(status=query.status, name=query.name,
                                                 limit=first + per_page + 1))
        else:
            runs = self._search(query)
        rows = [_row(r) for r in runs]
        return rows[first:first + per_page], len(rows) > first + per_page

    def _search(self, query: _Query) -> list[SagaRun]:
        assert query.q is not None
        # Unfiltered, the reader reads SEARCH_WINDOW sagas, not ten times as many.
        found = [r for r in self.sagas.reader.recent(limit=SEARCH_WINDOW)
                 if query.q in r.id and query.status in (None, r.status)
                 and query.name in (None, r.name)]
        if not any(r.id == query.q for r in found):
            try:
                exact = self.sagas.reader.run(query.q)
            except SagaNotFoundError:
                return found
            if (query.status in (None, exact.status)) and (query.name in (None, exact.name)):
                found.insert(0, exact)
        return found


def _row(run: SagaRun) -> Row:
    rollback = None if run.rollback is None else str(run.rollback.outcome or "running")
    return list_row(saga_id=run.id, name=run.name, status=str(run.status), rollback=rollback,
                    created_at=run.created_at, ended_at=run.ended_at)


class ListPage(_Listing):
    async def get(self) -> None:
        query = self.query()
        page = await self.page(query)
        if page is None:
            return
        rows, more = page
        body = _list_body(rows, more, query, self.settings_.per_page)
        self.render("list.html", rows=rows, more=more, query=query,
                    statuses=[s.value for s in SagaStatus], refresh_ms=LIST_REFRESH_MS,
                    saga_path=saga_path,
                    api=f"/api/sagas?{self.request.query}" if self.request.query
                    else "/api/sagas", revision=revision(body))


class ListApi(_Listing):
    async def get(self) -> None:
        query = self.query()
        page = await self.page(query)
        if page is not None:
            self.send_json(_list_body(*page, query, self.settings_.per_page))


def _list_body(rows: list[Row], more: bool, query: _Query, per_page: int) -> str:
    return json.dumps({"sagas": [r.as_json() for r in rows], "page": query.page,
                       "per_page": per_page, "has_next": more})


def revision(body: str) -> str:
    """What a page shows of its JSON, in short: the page asks the API for
    ``X-Saga-Revision`` and reloads its content when the two differ."""
    return hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()


class _OneSaga(_Base):
    def load(self, saga_id: str) -> tuple[str, list[dict[str, Any]]]:
        """The saga's state as the API's JSON, and its events."""
        run = self.sagas.run(saga_id)
        return run.status().model_dump_json(), run.events()


class SagaPage(_OneSaga):
    async def get(self, saga_id: str) -> None:
        try:
            body, events = await self.read(lambda: self.load(saga_id))
        except SagaError as exc:
            self.fail(exc)
            return
        state = json.loads(body)
        flower = self.settings_.flower_url
        self.render("saga.html", state=state, events=events, revision=revision(body),
                    timeline=timeline(state, events, now=datetime.now(UTC), flower_url=flower),
                    steps=step_lines(state, events, flower_url=flower), outcomes=OUTCOMES,
                    running=state["status"] not in TERMINAL, refresh_ms=REFRESH_MS,
                    api="/api" + saga_path(saga_id),
                    event_fields=_event_fields, error_text=_error_line,
                    short_time=_short_time)


def saga_path(saga_id: str) -> str:
    """``/sagas/<id>``, the id quoted whole: a saga id may hold ``/``, ``:`` and ``@``."""
    return "/sagas/" + quote(saga_id, safe="")


def _event_fields(event: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in event.items() if k not in ("type", "saga_id", "timestamp")}
    return json.dumps(rest, separators=(", ", ": "), default=str)


def _short_time(stamp: Any) -> str:
    """``12:04:05.123`` of an event's ISO timestamp (the whole stamp is its cell's title)."""
    try:
        return datetime.fromisoformat(str(stamp)).strftime("%H:%M:%S.%f")[:-3]
    except ValueError:
        return str(stamp or "")


def _error_line(error: Any) -> str:
    if not isinstance(error, Mapping):
        return ""
    step = f" (step {error['step']})" if error.get("step") else ""
    return f"{error.get('type')}: {error.get('message')}{step}"


class SagaApi(_OneSaga):
    async def get(self, saga_id: str) -> None:
        try:
            state = await self.read(lambda: self.sagas.run(saga_id).status())
        except SagaError as exc:
            self.fail(exc)
            return
        self.send_json(state.model_dump_json())


class EventsApi(_OneSaga):
    async def get(self, saga_id: str) -> None:
        try:
            events = await self.read(lambda: self.sagas.run(saga_id).events())
        except SagaError as exc:
            self.fail(exc)
            return
        self.send_json(json.dumps(events, default=str))


class Static(tornado.web.StaticFileHandler):
    """The package's own CSS and JS, behind the same basic auth as the pages."""

    def initialize(self, path: str, default_filename: str | None = None, *,  # type: ignore[override]
                   users: Mapping[str, str] | None = None) -> None:
        super().initialize(path, default_filename)
        self.users = users

    def prepare(self) -> None:
        _check_auth(self, self.users)


def make_app(sagas: SagaApp, settings: Settings) -> tornado.web.Application:
    """The dashboard as a Tornado application (``listen()`` it on a port)."""
    deps = {"sagas": sagas, "settings": settings}
    saga = r"/([^/]+)"
    return tornado.web.Application(
        [
            (r"/", ListPage, deps),
            (r"/sagas" + saga, SagaPage, deps),
            (r"/api/sagas", ListApi, deps),
            (r"/api/sagas" + saga, SagaApi, deps),
            (r"/api/sagas" + saga + "/events", EventsApi, deps),
        ],
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        static_handler_class=Static,
        static_handler_args={"users": settings.users},
        autoescape="xhtml_escape",
        compiled_template_cache=True,
    )


async def serve(sagas: SagaApp, settings: Settings, *, port: int, address: str,
                on_listening: Callable[[int], None]) -> None:
    """Serve until cancelled; ``on_listening`` gets the port bound (``port=0``: any free)."""
    sockets = bind_sockets(port, address=address)
    server = HTTPServer(make_app(sagas, settings))
    server.add_sockets(sockets)
    on_listening(int(sockets[0].getsockname()[1]))
    try:
        await asyncio.Event().wait()
    finally:
        server.stop()
