"""``saga-celery dashboard`` as a real subprocess, and a tiny HTTP client for it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.integration.harness import REPO_ROOT, worker_env

USER, PASSWORD = "ops", "s3cret"
FLOWER = "http://flower.test:5555"
START_TIMEOUT_S = 60


class Dashboard:
    """A running dashboard on a free loopback port, stopped by pid."""

    def __init__(self, popen: subprocess.Popen[str], base: str, log: list[str]) -> None:
        self.popen = popen
        self.base = base
        self.log = log

    def get(self, path: str, *, auth: tuple[str, str] | None = (USER, PASSWORD)
            ) -> tuple[int, dict[str, str], str]:
        """GET ``path``: the status, the headers and the body as text."""
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, _lower(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _lower(exc.headers), exc.read().decode()

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def start_dashboard(store: ModuleType | tuple[str, str], *extra: str,
                    log_dir: Path) -> Dashboard:
    """``saga-celery --redis-url URL --prefix P dashboard --port 0 ...`` on the shop's store
    (or on ``(URL, P)``), returned once it says where it listens."""
    url, prefix = store if isinstance(store, tuple) else (store.URL, store.PREFIX)
    script = Path(sys.executable).parent / "saga-celery"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "saga_celery.cli"]
    command += ["--redis-url", url, "--prefix", prefix, "dashboard", "--port", "0",
                "--basic-auth", f"{USER}:{PASSWORD}", "--flower-url", FLOWER, *extra]
    stderr = (log_dir / "dashboard.stderr").open("w")
    popen = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_env(), text=True,
                             stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
    stderr.close()
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            lines.append(line)
            ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.wait(0.1):
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            popen.wait()
            raise AssertionError("the dashboard did not start: "
                                 + (log_dir / "dashboard.stderr").read_text())
    # "serving the saga dashboard on http://127.0.0.1:<port>/ (...)"
    url = lines[0].split(" on ", 1)[1].split()[0]
    return Dashboard(popen, url.rstrip("/"), lines)


def _lower(headers: Any) -> dict[str, str]:
    """Headers by lower-case name (Tornado sends ``Www-Authenticate``)."""
    return {name.lower(): value for name, value in headers.items()}
