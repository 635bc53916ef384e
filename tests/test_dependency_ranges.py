"""Dependency ranges (SPEC section 9): every runtime dependency, and every package of the
metrics, demo, workers and otel extras, has a floor and an upper bound, and the lowest set CI tests
(``.ci/constraints-lowest.txt``, ``make test-lowest``) is exactly those floors."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("metrics", "demo", "workers", "otel", "dashboard", "archive")
"""The extras a user installs; ``test`` and ``dev`` are the repository's own tools."""


def ranged() -> list[Requirement]:
    """The runtime dependencies and the packages of the user-facing extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"],
             *(r for extra in EXTRAS for r in project["optional-dependencies"][extra])]
    return [Requirement(r) for r in names]


def floor(requirement: Requirement) -> Version:
    [lowest] = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return lowest


def lowest_pins() -> dict[str, Version]:
    """``name==version`` lines of the constraints file, by canonical name."""
    pins: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        if pin:
            name, version = pin.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_has_a_floor_and_an_upper_bound() -> None:
    """Each range reads ``>=A,<B``: an untested release can be neither below nor above it."""
    for requirement in ranged():
        operators = sorted(s.operator for s in requirement.specifier)
        assert operators == ["<", ">="], f"{requirement}: want >=A,<B"


def test_the_lowest_set_pins_every_floor() -> None:
    """``.ci/constraints-lowest.txt`` pins every ranged package at its floor, and nothing else:
    a floor raised in pyproject.toml is raised in what ``make test-lowest`` installs too."""
    wanted = {canonicalize_name(r.name): floor(r) for r in ranged()}
    assert lowest_pins() == wanted
