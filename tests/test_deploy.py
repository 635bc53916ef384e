"""deploy/ against the code: every file parses, and every module, queue and setting it names exists.

Nothing here runs Docker, Kubernetes or systemd: the files are read and cross-checked with
``SagaApp``, ``WorkerSettings`` and each other, so a rename in the code fails here first.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from saga_celery import SagaApp, StepConfig
from tests.yaml_subset import YamlSubsetError, parse_all
from workers.settings import ENV_PREFIX, WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"

_DEFAULTS = inspect.signature(SagaApp.__init__).parameters
STEPS_QUEUE = _DEFAULTS["steps_queue"].default
ROLLBACKS_QUEUE = _DEFAULTS["rollbacks_queue"].default
START_LINES = {
    f"celery -A workers.app worker -Q {STEPS_QUEUE}",
    f"celery -A workers.app worker -Q {ROLLBACKS_QUEUE}",
    "celery -A workers.app beat",
    "celery -A workers.app flower",
}
LONGEST_DEFAULT_TIMEOUT_S = StepConfig.model_fields["timeout"].default.total_seconds()

_APP_OPTION = re.compile(r"""-A["',\s]+([\w.]+)""")
_QUEUE_OPTION = re.compile(r"""-Q["',\s]+([\w.,-]+)""")
_SETTING = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]*[A-Z0-9](?![\w*])")


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _yaml(path: Path) -> list[Any]:
    return parse_all(path.read_text())


def _env_file(path: Path) -> dict[str, str]:
    lines = [x.strip() for x in path.read_text().splitlines()]
    return dict(x.split("=", 1) for x in lines if x and not x.startswith("#"))


def _start_line(argv: list[str]) -> str:
    """``celery -A <module> <command>``, plus ``-Q <queue>`` for a worker; paths dropped."""
    argv = [Path(argv[0]).name, *argv[1:]]
    line = " ".join(argv[:4])
    return f"{line} -Q {argv[argv.index('-Q') + 1]}" if "-Q" in argv else line


def _node_prefix(argv: list[str]) -> str:
    return argv[argv.index("-n") + 1].split("@")[0]


def _dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions by keyword (JSON-form arguments decoded)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    result: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            result.setdefault(keyword.upper(), []).append(rest.strip())
    return result


def _entrypoint() -> list[str]:
    entrypoint: list[str] = json.loads(_dockerfile()["ENTRYPOINT"][-1])
    return entrypoint


def _compose() -> dict[str, Any]:
    (document,) = _yaml(DEPLOY / "docker-compose.yml")
    services: dict[str, Any] = document["services"]
    return services


def _k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in _yaml(path)]


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _k8s_documents() if d["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _units() -> dict[str, dict[str, list[str]]]:
    """Every systemd unit file: section -> key -> values (a key may repeat)."""
    units = {}
    for path in sorted([*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]):
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] = {}
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
            elif line and not line.startswith("#"):
                key, _, value = line.partition("=")
                current.setdefault(key, []).append(value)
        units[path.name] = sections
    return units


def _deploy_start_lines() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every saga process in compose, Kubernetes and systemd."""
    for name, service in _compose().items():
        if "command" in service and name != "redis":
            yield f"compose {name}", [*_entrypoint(), *service["command"]]
    for name, deployment in _k8s("Deployment").items():
        container = _container(deployment)
        yield f"k8s {name}", [*container["command"], *container["args"]]
    for name, unit in _units().items():
        for exec_start in unit.get("Service", {}).get("ExecStart", []):
            yield f"systemd {name}", shlex.split(exec_start)


# --- files parse, names resolve ---------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    """Each YAML file in deploy/ parses (strict subset: no anchors, tags or ambiguous booleans)."""
    documents = _yaml(path)

    assert documents and all(isinstance(doc, dict) for doc in documents)


@pytest.mark.parametrize("text", ["a: yes", "a: &x 1", "a:\n\tb: 1", "a: 1\na: 2", "a: b: c",
                                  "a:\n  b: 1\n    c: 2", "a: [x, [y]]"])
def test_the_yaml_check_refuses_what_it_cannot_vouch_for(text: str) -> None:
    """The YAML checker raises on constructs outside its subset instead of guessing."""
    with pytest.raises(YamlSubsetError):
        parse_all(text)


def test_every_module_named_in_deploy_imports() -> None:
    """Every ``-A`` app module and every SAGA_IMPORTS module in deploy/ imports."""
    text = "\n".join(p.read_text() for p in _deploy_files())
    modules = set(_APP_OPTION.findall(text))
    for match in re.findall(r"SAGA_IMPORTS[=:]\s*\"?([\w.,]+)", text):
        modules |= {m for m in match.split(",") if m}
    assert modules >= {"workers.app", "workers.shop"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "FLOWER_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]: "
         "importlib.import_module(m)", *sorted(modules)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr


def test_every_queue_named_in_deploy_is_a_saga_app_queue() -> None:
    """Every ``-Q`` in deploy/ names SagaApp's step or rollback queue, and both are consumed."""
    named = {q for p in _deploy_files() for match in _QUEUE_OPTION.findall(p.read_text())
             for q in match.split(",")}

    assert named == {STEPS_QUEUE, ROLLBACKS_QUEUE}
    defaults = WorkerSettings.model_fields
    assert (defaults["steps_queue"].default, defaults["rollbacks_queue"].default) == (
        STEPS_QUEUE, ROLLBACKS_QUEUE)


def test_every_saga_variable_named_in_deploy_is_a_worker_setting() -> None:
    """Every ``SAGA_*`` variable in deploy/ is a field of WorkerSettings (no typo is ignored)."""
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in WorkerSettings.model_fields}
    named = {v for p in _deploy_files() for v in _SETTING.findall(p.read_text())}

    assert named - fields == set()
    assert {"SAGA_REDIS_URL", "SAGA_IMPORTS", "SAGA_FLOWER_PASSWORD"} <= named


def test_the_settings_deploy_ships_are_valid() -> None:
    """The env files, ConfigMap and Secrets of deploy/ validate as WorkerSettings."""
    secrets = _k8s("Secret")
    k8s_worker = {**_k8s("ConfigMap")["saga-celery-settings"]["data"],
                  **secrets["saga-celery-redis"]["stringData"]}
    env_sets = {
        "compose": _env_file(DEPLOY / "saga.env"),
        "systemd": {**_env_file(SYSTEMD / "saga.env"), **_env_file(SYSTEMD / "flower.env")},
        "k8s worker": k8s_worker,
        "k8s flower": {**k8s_worker, **secrets["saga-celery-flower"]["stringData"]},
    }
    for where, env in env_sets.items():
        settings = WorkerSettings.from_env(env)
        assert settings.imports, where
        assert settings.visibility_timeout > LONGEST_DEFAULT_TIMEOUT_S, where


# --- the same four processes everywhere ---------------------------------------------------


def test_compose_kubernetes_and_systemd_start_the_same_four_processes() -> None:
    """Compose, Kubernetes and systemd each run the step pool, rollback pool, beat and Flower."""
    by_target: dict[str, set[str]] = {}
    for where, argv in _deploy_start_lines():
        by_target.setdefault(where.split()[0], set()).add(_start_line(argv))

    assert by_target == {"compose": START_LINES, "k8s": START_LINES, "systemd": START_LINES}


def test_worker_health_checks_ping_the_node_their_worker_runs_as() -> None:
    """Each compose health check and k8s probe pings ``<the worker's -n>@$HOSTNAME``."""
    compose = _compose()
    checked = 0
    for name, deployment in _k8s("Deployment").items():
        container = _container(deployment)
        if "worker" not in container["args"]:
            continue
        node = _node_prefix(container["args"])
        for probe in ("livenessProbe", "readinessProbe"):
            script = container[probe]["exec"]["command"][-1]
            assert f"celery -A workers.app inspect ping -d {node}@$HOSTNAME" in script, name
        checked += 1
    for service in compose.values():
        if "worker" in service.get("command", []):
            node = _node_prefix(service["command"])
            assert f"inspect ping -d {node}@$$HOSTNAME" in service["healthcheck"]["test"][-1]
            checked += 1

    assert checked == 4


def test_the_image_runs_workers_app_from_what_it_copies() -> None:
    """The Dockerfile copies files that exist, installs the ``workers`` and ``metrics`` extras
    (``saga-celery metrics`` runs from the image), and its entrypoint is ``celery -A
    workers.app``."""
    instructions = _dockerfile()
    command = json.loads(instructions["CMD"][-1])

    assert _entrypoint() == ["celery", "-A", "workers.app"]
    assert _start_line([*_entrypoint(), *command]) == (
        f"celery -A workers.app worker -Q {STEPS_QUEUE}")
    copied = [shlex.split(c)[0] for c in instructions["COPY"]]
    assert all((REPO_ROOT / source).exists() for source in copied), copied
    assert {"saga_celery", "workers"} <= set(copied)
    installs = [r for r in instructions["RUN"] if "pip install" in r]
    extras = {e for r in installs for found in re.findall(r"\.\[([\w,]+)\]", r)
              for e in found.split(",")}
    assert {"workers", "metrics"} <= extras, installs


# --- each target's specifics ----------------------------------------------------------------


def test_compose_runs_redis_both_pools_beat_and_flower_with_basic_auth() -> None:
    """Compose has Redis on redis.conf, the two pools, beat, and Flower behind basic auth."""
    services = _compose()

    assert set(services) == {"redis", "steps", "rollbacks", "beat", "flower"}
    redis = services["redis"]
    conf = next(v.split(":")[1] for v in redis["volumes"] if v.startswith("./redis/redis.conf"))
    assert conf in redis["command"] and (DEPLOY / "redis" / "redis.conf").is_file()
    for name in ("steps", "rollbacks", "beat", "flower"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        assert all((DEPLOY / f).is_file() for f in services[name]["env_file"]), name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    flower = services["flower"]["environment"]
    assert ":?" in flower["SAGA_FLOWER_PASSWORD"]  # compose refuses to start without one
    assert flower["SAGA_FLOWER_USER"]
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])
    assert "ports" not in redis


def test_kubernetes_has_probed_pools_one_beat_and_flower_auth_from_a_secret() -> None:
    """k8s: a probed Deployment per pool, one Recreate beat, Flower auth from a Secret."""
    deployments = _k8s("Deployment")
    secrets = _k8s("Secret")

    assert set(deployments) == {"saga-steps", "saga-rollbacks", "saga-beat", "saga-flower"}
    for name in ("saga-steps", "saga-rollbacks"):
        spec = deployments[name]["spec"]
        assert spec["replicas"] >= 2, name
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > (
            LONGEST_DEFAULT_TIMEOUT_S)
        assert {"livenessProbe", "readinessProbe"} <= set(_container(deployments[name]))
    beat = deployments["saga-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    flower_env = {e["name"]: e["valueFrom"]["secretKeyRef"]
                  for e in _container(deployments["saga-flower"])["env"]}
    for variable in ("SAGA_FLOWER_USER", "SAGA_FLOWER_PASSWORD"):
        ref = flower_env[variable]
        assert ref["key"] in secrets[ref["name"]]["stringData"], variable
    for name, deployment in deployments.items():
        for source in _container(deployment)["envFrom"]:
            ((kind, ref),) = source.items()
            pool = _k8s("ConfigMap") if kind == "configMapRef" else secrets
            assert ref["name"] in pool, (name, ref)
        assert "SAGA_FLOWER_PASSWORD" not in str(deployment) or name == "saga-flower"


def test_kubernetes_disruption_budgets_cover_each_pool() -> None:
    """Each pool has a PodDisruptionBudget whose selector matches its pods."""
    pools = {name: d["spec"]["template"]["metadata"]["labels"]
             for name, d in _k8s("Deployment").items() if name in ("saga-steps", "saga-rollbacks")}
    covered = set()
    for budget in _k8s("PodDisruptionBudget").values():
        selector = budget["spec"]["selector"]["matchLabels"]
        covered |= {name for name, labels in pools.items()
                    if selector.items() <= labels.items()}
        assert budget["spec"]["minAvailable"] >= 1

    assert covered == set(pools)


def test_kustomization_lists_every_manifest_and_services_select_pods() -> None:
    """``kubectl apply -k deploy/k8s`` applies every manifest; Flower's Service selects Flower."""
    (kustomization,) = _yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == manifests
    flower_labels = _k8s("Deployment")["saga-flower"]["spec"]["template"]["metadata"]["labels"]
    assert _k8s("Service")["saga-flower"]["spec"]["selector"].items() <= flower_labels.items()


def test_systemd_units_stop_workers_warmly_and_the_target_wants_real_units() -> None:
    """Worker units warm-shutdown within a timeout above the longest step timeout; the target
    and the EnvironmentFiles point at units and example files that exist."""
    units = _units()

    assert set(units) == {"saga-celery.target", "saga-celery-steps@.service",
                          "saga-celery-rollbacks@.service", "saga-celery-beat.service",
                          "saga-celery-flower.service"}
    for name in ("saga-celery-steps@.service", "saga-celery-rollbacks@.service"):
        service = units[name]["Service"]
        assert service["KillMode"] == ["mixed"], name
        assert int(service["TimeoutStopSec"][0]) > LONGEST_DEFAULT_TIMEOUT_S, name
    for wanted in units["saga-celery.target"]["Unit"]["Wants"][0].split():
        assert re.sub(r"@[^.]+\.", "@.", wanted) in units, wanted
    for name, unit in units.items():
        for env_file in unit.get("Service", {}).get("EnvironmentFile", []):
            assert (SYSTEMD / Path(env_file).name).is_file(), (name, env_file)
        assert unit.get("Install", {}).get("WantedBy"), name


def test_redis_conf_persists_and_never_evicts_and_the_fleet_uses_it() -> None:
    """redis.conf turns on the AOF and noeviction; make fleet and compose both start from it."""
    directives = {}
    for line in (DEPLOY / "redis" / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            directives[key] = value

    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    assert "dir" not in directives  # each deployment sets its own data directory
    from workers import fleet

    assert fleet.REDIS_CONF == DEPLOY / "redis" / "redis.conf"
    assert timedelta(seconds=int(directives["timeout"])) == timedelta(0)
