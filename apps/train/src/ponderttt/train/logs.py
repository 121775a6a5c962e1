"""The app's log: Python `logging` with timestamps, to the console (stdout) and to `outputs/<run>/run.log`.

`LOG` ("ponderttt.train") is what `distributed.say` writes to on process 0. The console handler looks up
`sys.stdout` when it writes (so that a redirected or captured stdout gets the lines); `attach_run_log(path)` adds
the run's file (appended to: later commands on the same run add their lines) and detaches a previous run's.
"""

from __future__ import annotations

import logging
import pathlib
import sys

from ponderttt.train.rundir import disk_errno

LOG = logging.getLogger("ponderttt.train")
FORMAT = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
RUN_LOG = "run.log"


class _Stdout(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stdout` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _RunLogFile(logging.FileHandler):
    """run.log. A line it cannot write for want of space is dropped without logging's traceback: the console still
    shows it, and the run's next write to the full disk raises `DiskFull`, its one error line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if disk_errno(sys.exc_info()[1]) is None:
            super().handleError(record)


def _configure() -> None:
    if not any(isinstance(h, _Stdout) for h in LOG.handlers):
        console = _Stdout()
        console.setFormatter(FORMAT)
        LOG.addHandler(console)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # the app's lines are printed once, not again by a root handler


def attach_run_log(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Sends the log also to `run_dir`/run.log (appending), instead of any run's file attached before."""
    path = pathlib.Path(run_dir) / RUN_LOG
    for handler in [h for h in LOG.handlers if isinstance(h, logging.FileHandler)]:
        LOG.removeHandler(handler)
        handler.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogFile(path, mode="a", encoding="utf-8")
    handler.setFormatter(FORMAT)
    LOG.addHandler(handler)
    return path


_configure()
