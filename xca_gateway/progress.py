"""Progress of long commands (``import``, ``import-priors``): count, rate and time left.

A thin layer over rich's progress display so that every command shows the same line:
``label ━━━━━━━━━━ 120/400 files 85.2/s 3.1 MB/s 0:03`` (time left). On a terminal it redraws in
place; on anything else (a log file, a test's buffer) it writes the final line once.
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Items per second (the unit is the count column's)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "-/s", style="progress.data.speed")


class _Throughput(ProgressColumn):
    """MB/s, when the task counts bytes."""

    def render(self, task: Task) -> Text:
        transferred = task.fields.get("bytes", 0)
        elapsed = task.finished_time or task.elapsed
        if not transferred or not elapsed:
            return Text("")
        return Text(f"{transferred / elapsed / 1e6:,.1f} MB/s", style="progress.data.speed")


class ProgressLine:
    """One progress line for ``total`` items of ``unit``; ``advance`` as they are done."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str,
        stream: TextIO,
        transient: bool = False,
    ) -> None:
        console = Console(file=stream, stderr=False, highlight=False)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TextColumn(unit),
            _Rate(),
            _Throughput(),
            TimeRemainingColumn(compact=True),
            console=console,
            transient=transient,
            # Redraw a few times a second: the rate and time left need no more, and each
            # redraw costs the worker's time.
            refresh_per_second=4,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, bytes=0)
        self._bytes = 0
        self.done = 0

    def advance(self, count: int = 1, *, nbytes: int = 0) -> None:
        self.done += count
        self._bytes += nbytes
        self._progress.update(self._task, advance=count, bytes=self._bytes)

    def set_total(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
