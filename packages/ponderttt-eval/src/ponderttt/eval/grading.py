"""Tests that the graded program cannot fake: what a benchmark hands the sandbox, and how the verdict is read.

A :class:`Harness` is trusted test code. ``run_program(source, harness=h)`` runs ``source`` (the untrusted program) in
one process and ``h.tests`` in another one, inside the same sandbox, that the program cannot reach; the names the
tests use but do not define (the entry point, the class under test) are proxies for the program's objects, and only
plain data comes back from it (see ``_harness.py`` for the protocol). The harness process writes the verdict to a pipe
the program does not have; :func:`graded_status` turns it, with the program's exit status, into the run's status.
The exit status alone never makes a pass.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

__all__ = ["Harness", "graded_status"]


@dataclasses.dataclass(frozen=True)
class Harness:
    """Trusted test code for one program.

    ``tests`` runs in the harness process: it passes when it runs to its end (or when it calls
    ``ponderttt_verdict(passed, details)``, which then decides; ``details`` must be plain data). ``preamble`` runs
    first in the same namespace (imports, helpers of the task that the tests use: trusted code only); ``remote`` names
    are always taken from the program, even when the preamble defines them (the entry point of a prompt whose stub the
    preamble defines). Free names of ``tests`` that are standard-library modules are imported by the harness itself;
    the others are looked up in the program.
    """

    tests: str
    preamble: str = ""
    remote: tuple[str, ...] = ()

    def spec(self) -> dict[str, Any]:
        """What the sandbox child needs besides the test code (the tests travel separately, after the fork)."""
        return {"preamble": self.preamble, "remote": list(self.remote)}


def graded_status(
    verdict_bytes: bytes, classify: Callable[[], tuple[str, str]], program_exit_status: Callable[[int], tuple[str, str]]
) -> tuple[str, str, dict | None]:
    """(status, reason, verdict) of a graded run the sandbox did not kill itself.

    ``classify()`` is the exit-status classification of the whole run (used when no verdict arrived: the harness
    process died, e.g. of memory); ``program_exit_status(code)`` classifies the program's own exit when it ended early
    (a MemoryError exit is "memory", a CPU-limit signal "timeout"). A run passes only with a verdict that says so.
    """
    try:
        verdict = json.loads(verdict_bytes) if verdict_bytes else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
        status, reason = classify()
        if status == "passed":
            return "failed", "no verdict from the test harness (the tests did not finish)", None
        return status, reason, None
    reason = str(verdict.get("reason", ""))
    if verdict["passed"]:
        return "passed", reason, verdict
    if verdict.get("harness_error"):
        return "error", reason, verdict
    exit_status = verdict.get("program_exit")
    if isinstance(exit_status, int) and exit_status != 0:
        status, why = program_exit_status(exit_status)
        if status in ("memory", "timeout"):
            return status, f"{why}; {reason}", verdict
    return "failed", reason, verdict
