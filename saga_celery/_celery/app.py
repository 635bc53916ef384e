"""``SagaApp``: saga steps, rollbacks and sagas on an existing Celery app."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, overload

from celery import Celery, bootsteps
from kombu import Queue

from saga_celery._celery.coordinator import Coordinator, SagaReader
from saga_celery._celery.definition import SagaDefinition, WaitStage, sleep_stage, wait_stage
from saga_celery._celery.dispatch import Dispatcher, Outlet
from saga_celery._celery.handle import SagaHandle
from saga_celery._celery.recovery import recover
from saga_celery._celery.routing import (
    SagaRouter,
    check_visibility_timeout,
    configure,
    restore_defaults,
    warn_if_restore_is_slow,
)
from saga_celery._celery.runtime import BodyHook, Runtime, RuntimeSettings
from saga_celery._celery.security import check_app
from saga_celery._celery.tasks import (
    SagaRollbackTask,
    SagaStepTask,
    SagaTask,
    Target,
    build_task,
    refuse_celery_retries,
    time_limits,
    unwrap,
)
from saga_celery._celery.timers import Countdowns, TimerPoller, fire_due, timer_step
from saga_celery._celery.typed import (
    Duration,
    P,
    R,
    Retries,
    RollbackHandler,
    SagaStep,
    StepDecorator,
)
from saga_celery._core.config import StepConfig, resolve_config
from saga_celery._core.durations import parse_duration
from saga_celery._core.model import FORMAT, FORMATS
from saga_celery._engine import Engine, utcnow
from saga_celery._errors import SagaConfigError, SagaDefinitionError
from saga_celery._store import RedisStore, SagaStore
from saga_celery._store.archive import PostgresArchive
from saga_celery._store.durability import Durability
from saga_celery._store.retention import (
    DEFAULT_RETENTION_MS,
    OUTCOMES,
    parse_retention,
    positive_ms,
)
from saga_celery._store.topology import StoreClient

_ROLLBACK_CONFIG_KEYS = frozenset({"retries", "timeout", "name"})
RECOVER_TASK = "saga_celery.recover"


@dataclass(frozen=True)
class InProcess:
    """How the in-process harness (``saga_celery.testing``) runs an app's sagas."""

    store: SagaStore
    """Saga state, in place of Redis."""
    clock: Callable[[], datetime]
    """The time every transition records and every countdown is computed from."""
    outlet: Outlet
    """Where messages go in place of the broker."""
    body_hook: BodyHook
    """Wraps each attempt's body (failure injection)."""
    draw: Callable[[], float]
    """The random draws of failed attempts (jittered retry delays)."""


class SagaApp:
    """Saga support for one Celery app: ``@sagas.step``, ``sagas.saga(...)``, ``sagas.run(id)``.

    ``redis_url`` (saga state) defaults to the broker URL; ``redis`` is a client instead: a
    ``redis.Redis``, a Sentinel master client or a ``RedisCluster`` (README, "Redis
    topologies").  ``durable_replicas`` makes each saga write wait (``WAIT``, at most
    ``durable_timeout``) until that many replicas have it, or fail.  ``steps_queue`` and
    ``rollbacks_queue`` name the two queues (compensation never waits behind forward
    traffic).  ``max_output_bytes`` caps a step's JSON output.  ``lease_ttl`` is how long a
    running attempt's lease outlives its last renewal (how soon a killed worker's attempt
    can run again).  ``retention`` is how long a finished saga's state is kept: one duration,
    or one per outcome (``{"complete": "1 day", "errored": "30 days"}``).  ``archive``, a
    ``postgresql://`` URL, keeps every finished saga's history in PostgreSQL and leaves Redis
    a tombstone (README, "History: compaction, archive, retention").
    ``recovery_interval`` is how often beat runs the recovery sweep (``saga_celery.recover``)
    and ``recovery_grace`` how late a message or a lapsed attempt must be before it is re-sent.
    ``max_countdown`` is the longest delay sent as a Celery countdown; a longer one waits as
    a timer in the saga store (default: a quarter of the Redis transport's visibility
    timeout, at most 5 minutes; SPEC section 8).
    ``write_format`` is the format new sagas are created in (README "Upgrading"): the newest when
    None; 1 while processes of 0.1.0 may still run, so they can read every saga.
    """

    def __init__(
        self,
        app: Celery,
        *,
        redis_url: str | None = None,
        prefix: str = "saga:",
        steps_queue: str = "saga.steps",
        rollbacks_queue: str = "saga.rollbacks",
        max_output_bytes: int = 1_048_576,
        lease_ttl: object = "8 seconds",
        retention: object = "7 days",
        recovery_interval: object = "30 seconds",
        recovery_grace: object = "60 seconds",
        store: SagaStore | None = None,
        write_format: int | None = None,
        redis: StoreClient | None = None,
        durable_replicas: int = 0,
        durable_timeout: object = "1 second",
        max_countdown: object = None,
        archive: str | None = None,
    ) -> None:
        check_app(app.conf, redis_url=redis_url)
        self.app = app
        self.router = SagaRouter(steps_queue, rollbacks_queue)
        configure(app, self.router)
        retention_ms = parse_retention(retention)
        archive_store = _archive(archive, retention_ms, store)
        durability = _durability(durable_replicas, durable_timeout)
        _one_store(redis_url=redis_url, redis=redis, store=store, durability=durability)
        if redis is not None:
            store = RedisStore(redis, prefix=prefix, retention_ms=retention_ms,
                               durability=durability, archive=archive_store)
        elif store is None:
            store = RedisStore.from_url(self._state_url(redis_url), prefix=prefix,
                                        retention_ms=retention_ms, durability=durability,
                                        archive=archive_store)
        self._store = store
        self._countdowns = Countdowns(app, _max_countdown_s(max_countdown))
        self._engine = Engine(store, clock=utcnow, max_countdown_s=self._countdowns)
        self._dispatcher = Dispatcher(app, utcnow, self._countdowns)
        self._runtime = Runtime(self._engine, self._dispatcher, RuntimeSettings(
            lease_ttl_ms=positive_ms("lease_ttl", lease_ttl), max_output_bytes=max_output_bytes))
        self._coordinator = Coordinator(self._engine, self._dispatcher,
                                        write_format=_write_format(write_format),
                                        max_params_bytes=max_output_bytes)
        self.reader = SagaReader(store)
        """Reads sagas (state, events, the newest, the unreadable): the CLI's and the
        dashboard's way in."""
        self.recovery_grace = parse_duration(recovery_grace)
        self.recovery_interval = timedelta(
            milliseconds=positive_ms("recovery_interval", recovery_interval))
        self._register_recovery(self.recovery_interval.total_seconds())
        app.steps["worker"].add(_worker_check(self._check_worker))
        app.steps["worker"].add(timer_step(lambda: TimerPoller(self._fire_timers)))

    def _fire_timers(self) -> int:
        """Send the messages of the timers due now (``timers.fire_due``): what the worker
        bootstep runs each poll, and what ``saga_celery.testing`` runs at virtual time."""
        return fire_due(self._engine, self._dispatcher)

    def _register_recovery(self, interval_s: float) -> None:
        """The sweep as a Celery task on the rollbacks queue, scheduled for beat."""

        def sweep() -> int:  # beat's sweeps record beat's interval (``saga-celery health``)
            return recover(self._engine, self._dispatcher, grace=self.recovery_grace,
                           interval=self.recovery_interval)

        self.app.task(sweep, name=RECOVER_TASK, ignore_result=True, lazy=False, shared=False)
        self.router.rollback_tasks.add(RECOVER_TASK)
        schedule = dict(self.app.conf.beat_schedule or {})
        schedule.setdefault(RECOVER_TASK, {"task": RECOVER_TASK, "schedule": interval_s})
        self.app.conf.beat_schedule = schedule

    def _state_url(self, redis_url: str | None) -> str:
        url = redis_url or str(self.app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SagaConfigError(
                "SagaApp needs redis_url=... for saga state: the broker "
                f"({url.split('://')[0] or 'unset'}) is not Redis")
        return url

    # --- declaring steps --------------------------------------------------------------

    @overload
    def step(self, fn: Callable[P, R], *, retries: Retries | None = None,
             timeout: Duration | None = None, rollback: RollbackHandler | None = None,
             rollback_config: Mapping[str, Any] | None = None, name: str | None = None,
             **task_options: Any) -> SagaStep[P, R]: ...

    @overload
    def step(self, *, retries: Retries | None = None, timeout: Duration | None = None,
             rollback: RollbackHandler | None = None,
             rollback_config: Mapping[str, Any] | None = None, name: str | None = None,
             **task_options: Any) -> StepDecorator: ...

    def step(self, fn: Any = None, *, retries: Any = None, timeout: Any = None,
             rollback: Callable[..., Any] | None = None,
             rollback_config: Mapping[str, Any] | None = None, name: str | None = None,
             **task_options: Any) -> Any:
        """Make a function (or an existing Celery task) a saga step; see the README.

        Typed for the caller's checker by the overloads (``SagaStep[P, R]``); at run time the
        step is the Celery task itself.  A Celery task is ``Any`` to mypy, so one wrapped
        here is a ``SagaStep[..., Any]``."""

        def decorate(target: Any) -> SagaStepTask:
            parts = unwrap(target)
            task_name = name or parts.name or self.app.gen_task_name(parts.fn.__name__,
                                                                     parts.fn.__module__)
            options = {**parts.options, **task_options}
            refuse_celery_retries(task_name, options)
            config = self._config(task_name, retries, timeout)
            handler_config = self._check_rollback(task_name, rollback, rollback_config)
            task: SagaStepTask = self._build(parts, SagaStepTask, task_name, config, options)
            self.router.step_tasks.add(task_name)
            if rollback is not None:
                self.register_rollback(task, rollback, **handler_config)
            return task

        return decorate if fn is None else decorate(fn)

    def _check_rollback(self, step: str, rollback: Callable[..., Any] | None,
                        rollback_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The Cloudflare-shaped ``rollback=`` and ``rollback_config``, validated before the
        step is registered; returns the handler's options."""
        if rollback is None:
            if rollback_config is not None:
                raise SagaConfigError(f"step {step!r}: rollback_config given without "
                                      "rollback=", step=step)
            return {}
        owner = _rollback_of(step)
        config = dict(rollback_config or {})
        refuse_celery_retries(owner, {**unwrap(rollback).options, **config})
        unknown = set(config) - _ROLLBACK_CONFIG_KEYS
        if unknown:
            raise SagaConfigError(f"step {step!r}: unknown rollback_config keys "
                                  f"{sorted(unknown)} (allowed: retries, timeout, name)",
                                  step=step)
        self._config(owner, config.get("retries"), config.get("timeout"))
        return config

    def register_rollback(self, step: SagaStepTask, handler: Any, *, retries: Any = None,
                          timeout: Any = None, name: str | None = None,
                          task_options: dict[str, Any] | None = None) -> SagaRollbackTask:
        """Register ``handler`` as the rollback of ``step`` (``@step.rollback`` calls this)."""
        current = type(step).saga_rollback
        if current is not None:
            raise SagaDefinitionError(
                f"step {step.name!r} already has a rollback handler ({current.name!r}); "
                "a step has at most one", step=step.name)
        parts = unwrap(handler)
        task_name = name or parts.name or f"{step.name}.rollback"
        owner = _rollback_of(step.name)
        options = {**parts.options, **(task_options or {})}
        refuse_celery_retries(owner, options)
        config = self._config(owner, retries, timeout)
        task: SagaRollbackTask = self._build(parts, SagaRollbackTask, task_name, config,
                                             {**options, "saga_step_name": step.name})
        type(step).saga_rollback = task
        self.router.rollback_tasks.add(task_name)
        return task

    def _config(self, owner: str, retries: Any, timeout: Any) -> StepConfig:
        config = resolve_config(owner=owner, retries=retries, timeout=timeout)
        check_visibility_timeout(self.app, owner, config)
        return config

    def _check_worker(self) -> None:
        """Run when a worker starts, before it connects: the settings the user assigned after
        ``SagaApp()`` are in force now.  Puts the unacked-restore options back and checks every
        saga task against the visibility timeout again; ``SagaConfigError`` stops the worker."""
        restore_defaults(self.app)
        warn_if_restore_is_slow(self.app)
        self._countdowns.refresh()
        for task in list(self.app.tasks.values()):
            if isinstance(task, SagaTask) and task.saga_runtime is self._runtime:
                owner = (_rollback_of(task.saga_step_name)
                         if isinstance(task, SagaRollbackTask) else task.name)
                try:
                    check_visibility_timeout(self.app, owner, task.saga_config)
                except SagaConfigError as exc:
                    raise SagaConfigError(f"this worker cannot start: {exc} (checked at worker "
                                          "start, with the settings now in force)",
                                          step=owner) from exc

    def _build(self, target: Target, base: type[Any], name: str, config: StepConfig,
               options: dict[str, Any]) -> Any:
        queue = options.pop("queue", None)
        if queue is not None:
            self.router.explicit[name] = queue.name if isinstance(queue, Queue) else str(queue)
        if options.get("priority") is not None:
            self.router.priorities[name] = options["priority"]
        options.update(time_limits(config), saga_runtime=self._runtime, saga_config=config,
                       saga_register_rollback=self.register_rollback,
                       max_retries=config.retries.limit)
        return build_task(self.app, target, base=base, name=name, options=options)

    # --- sagas -----------------------------------------------------------------------

    def saga(self, name: str, stages: Sequence[Any], *, rollback_mode: str = "sequential",
             on_rollback_error: str = "halt", on_failure: str = "rollback",
             hold_timeout: Duration | None = None) -> SagaDefinition:
        """Declare a saga: a list of stages, each a step signature or a ``group`` of them
        (or a ``sleep`` / ``wait_for_event``).  ``on_failure="hold"``: a step failing for
        good holds the saga for ``redrive()`` or ``rollback()`` (at most ``hold_timeout``,
        then it rolls back) instead of rolling it back (SPEC section 8)."""
        return SagaDefinition(name, stages, tasks=self.app.tasks,
                              coordinator=self._coordinator, reader=self.reader,
                              rollback_mode=rollback_mode, on_rollback_error=on_rollback_error,
                              on_failure=on_failure, hold_timeout=hold_timeout)

    def sleep(self, duration: Duration, *, name: str = "sleep") -> WaitStage:
        """A stage that waits ``duration`` (SPEC section 8), passing the previous stage's
        output on: ``sagas.saga("order", [charge.s(), sagas.sleep("1 day"), ship.s()])``."""
        return sleep_stage(duration, name)

    def wait_for_event(self, event_type: str, *, timeout: Duration | None = None,
                       name: str | None = None) -> WaitStage:
        """A stage that waits for ``run.send_event(event_type, payload)``; its output is the
        payload.  With ``timeout``, the saga fails (``EventTimeoutError``) and rolls back when
        no such event came in time."""
        return wait_stage(event_type, timeout, name)

    def run(self, saga_id: str) -> SagaHandle:
        """A handle on an existing saga; ``SagaNotFoundError`` if there is none."""
        self.reader.run(saga_id)
        return SagaHandle(self.reader, self._coordinator, saga_id)

    def _run_in_process(self, setup: InProcess) -> Callable[[], None]:
        """Run this app's sagas as ``setup`` says until the function returned is called, which
        puts back the store, clock and broker used before (``saga_celery.testing``)."""
        dispatcher, runtime = self._dispatcher, self._runtime
        if dispatcher.outlet is not None:
            raise SagaConfigError("this SagaApp already runs its sagas in process: close the "
                                  "SagaTestEnv before building another on it")
        engine_before = self._engine.rebind(setup.store, setup.clock)
        reader_before, store_before = self.reader.rebind(setup.store), self._store
        clock_before, draw_before = dispatcher.clock, runtime.draw
        self._store, dispatcher.clock, dispatcher.outlet = setup.store, setup.clock, setup.outlet
        runtime.body_hook, runtime.draw = setup.body_hook, setup.draw

        def restore() -> None:
            self._engine.rebind(*engine_before)
            self.reader.rebind(reader_before)
            self._store, dispatcher.clock, dispatcher.outlet = store_before, clock_before, None
            runtime.body_hook, runtime.draw = None, draw_before

        return restore

    def recover(self, *, grace: object = None) -> int:
        """One recovery sweep (see ``saga_celery._celery.recovery``); returns messages re-sent."""
        delay = self.recovery_grace if grace is None else parse_duration(grace)
        return recover(self._engine, self._dispatcher, grace=delay)


def _rollback_of(step: str) -> str:
    """How errors name a step's rollback handler."""
    return f"rollback of {step}"


def _worker_check(check: Callable[[], None]) -> type[bootsteps.Step]:
    """A worker bootstep that runs ``check`` while the worker is built, before it connects.

    Not a signal (``worker_init``): Celery logs a signal handler's exception and goes on, and
    a worker that breaks the checks must not start."""

    class SagaWorkerCheck(bootsteps.Step):  # type: ignore[misc]
        name = "saga_celery.worker_check"

        def create(self, parent: Any) -> None:
            check()

    return SagaWorkerCheck


def _archive(url: str | None, retention: int | dict[str, int | None],
             store: SagaStore | None) -> PostgresArchive | None:
    """The archive for ``SagaApp(archive=...)``, with the retention by outcome."""
    if url is None:
        return None
    if store is not None:
        raise SagaConfigError("SagaApp(archive=...) applies to the Redis store SagaApp "
                              "builds: give redis_url= or redis= instead of store=")
    keep: dict[str, int | None] = dict.fromkeys(OUTCOMES, DEFAULT_RETENTION_MS)
    keep.update(retention if isinstance(retention, dict) else dict.fromkeys(OUTCOMES, retention))
    return PostgresArchive(url, retention_ms=keep)


def _write_format(write_format: int | None) -> int:
    """The format new sagas are created in: the newest unless one this release writes is set."""
    chosen = FORMAT if write_format is None else write_format
    if chosen not in FORMATS:
        raise SagaConfigError(
            f"SagaApp(write_format={write_format!r}): this release writes formats "
            f"{sorted(FORMATS)}; use 1 while 0.1.0 processes still run, else {FORMAT}")
    return chosen


def _one_store(*, redis_url: str | None, redis: object, store: SagaStore | None,
               durability: Durability | None) -> None:
    """Refuse more than one of ``redis_url``, ``redis`` and ``store``, and a durability for
    a ``store`` built elsewhere."""
    given = [f"{name}=" for name, value in (("redis_url", redis_url), ("redis", redis),
                                            ("store", store)) if value is not None]
    if len(given) > 1:
        raise SagaConfigError(f"SagaApp takes one of redis_url=, redis= and store=, not "
                              f"{' and '.join(given)}: each says where saga state lives")
    if store is not None and durability is not None:
        raise SagaConfigError("SagaApp(durable_replicas=...) applies to the Redis store "
                              "SagaApp builds: give redis_url= or redis= instead of store=")


def _durability(replicas: int, timeout: object) -> Durability | None:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise SagaConfigError(f"SagaApp(durable_replicas=...) is a number of replicas, 0 "
                              f"(do not wait) or more, not {replicas!r}")
    if replicas == 0:
        return None
    return Durability(replicas=replicas, timeout_ms=positive_ms("durable_timeout", timeout))


def _max_countdown_s(value: object) -> float | None:
    """``SagaApp(max_countdown=...)`` in seconds; None: the default (``timers.py``)."""
    return None if value is None else positive_ms("max_countdown", value) / 1000
