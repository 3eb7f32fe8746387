"""The drill in a terminal: a live progress view while it runs, then the report table.

Everything here renders a :class:`fleetdrain.drill.report.model.DrillReport` (or the progress
messages the drill emits); nothing here runs a scenario. Two audiences: a person at a terminal (a
live, redrawn view) and a CI log (piped: one plain line per message, no cursor movement, 120
columns so that the table is not squeezed to 80).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from fleetdrain.drill.report.model import DrillReport, ScenarioReport

#: Width used when the output is not a terminal (a CI log).
PIPED_WIDTH = 120

#: What the less obvious columns mean (printed under the table).
LEGEND = (
    "  longest drain: the longest drain, from its start (stop signal, lifecycle event, spot"
    " notice) to its end",
    "  hook latency: the last agent task stopped -> CompleteLifecycleAction",
    "  max hb gap: longest time without a heartbeat, in heartbeat intervals (1.0x = on time)",
)
#: The clock the seconds are on, per mode.
UNITS = {
    "local": "  seconds are AWS seconds, the drill's clock (stopTimeout 120 s, spot notice 120 s),"
    " whatever the pace; wall s: how long a scenario took here",
    "aws": "  seconds are AWS seconds (wall-clock: a real deployment's)",
}


def make_console(file: IO[str] | None = None, *, force_terminal: bool | None = None) -> Console:
    """A console for the drill's output: the terminal's width, or 120 columns when piped."""
    out = file if file is not None else sys.stdout
    is_tty = force_terminal if force_terminal is not None else out.isatty()
    return Console(
        file=out,
        width=None if is_tty else PIPED_WIDTH,
        force_terminal=force_terminal,
        # No colour codes in a log file unless asked: CI logs show them as garbage often enough.
        no_color=not is_tty,
        highlight=False,
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict(s: ScenarioReport) -> Text:
    style = "green" if s.ok else "bold yellow" if s.inconclusive else "bold red"
    return Text(s.verdict, style=style)


#: Below this many columns the table drops its box lines and the ``kind`` column (a
#: "before" case still reads "loss shown") rather than truncate a number.
COMPACT_BELOW = 110


def report_table(report: DrillReport, width: int = PIPED_WIDTH) -> Table:
    """The per-scenario table: jobs, passed, retried, lost, drain, hook latency, heartbeat gap.

    ``width`` is the console's: two-line headers keep it inside 120 columns (a CI log), and
    under :data:`COMPACT_BELOW` it goes compact so that an 80-column terminal truncates nothing.
    """
    compact = width < COMPACT_BELOW
    title = "fleetdrain drill" + (" --aws" if report.mode == "aws" else "")
    table = Table(
        title=title,
        title_justify="left",
        box=None if compact else box.HEAVY_HEAD,
        pad_edge=not compact,
        padding=(0, 1, 0, 0) if compact else (0, 1),
    )
    columns = [
        "scenario",
        "kind",
        "jobs",
        "passed",
        "retried",
        "lost",
        "longest\ndrain s",
        "hook\nlatency s",
        "max hb\ngap",
        "wall s",
        "verdict",
    ]
    if compact:
        columns.remove("kind")
        columns.remove("wall s")
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("scenario", "kind", "verdict") else "right",
            no_wrap=True,
        )
    for s in report.scenarios:
        # A loss in a "before" case is the expected finding: show it, but not as an alarm.
        lost_style = "red" if s.lost and s.kind == "after" else "yellow" if s.lost else ""
        cells: list[str | Text] = [
            s.name,
            s.kind,
            str(s.jobs_run),
            str(s.passed),
            str(s.retried),
            Text(str(s.lost), style=lost_style),
            _seconds(s.longest_drain_seconds),
            _seconds(s.hook_completion_latency_seconds),
            _gap(s.max_heartbeat_gap_intervals),
            f"{s.wall_seconds:.0f}",
            _verdict(s),
        ]
        if compact:
            del cells[9]
            del cells[1]
        table.add_row(*cells)
    return table


def print_report(console: Console, report: DrillReport, *, extra: Iterable[str] = ()) -> None:
    """The pace, the agent behind wrap, the table, what each scenario is (and the agent it ran
    behind wrap), its cause and notes, a one-line summary."""
    if report.pace:
        console.print(report.pace, markup=False, highlight=False)
    if report.mode == "local" and report.wrapped_agent is not None:
        console.print(report.wrapped_agent.summary, markup=False, highlight=False)
    if report.mode == "local" and not report.pid_namespaces:
        console.print(
            Text(
                f"agents ran without a PID namespace: {report.pid_namespaces_reason}",
                style="yellow",
            )
        )
    console.print(report_table(report, console.width))
    for s in report.scenarios:
        console.print(Text.assemble("  ", (s.name, "bold"), f" ({s.kind}): {s.description}"))
        if s.agent:
            console.print(f"      agent behind wrap: {s.agent}", markup=False, highlight=False)
        if s.cause and not s.ok:
            console.print(f"      {s.verdict}: {s.cause}", markup=False, highlight=False)
        for note in s.notes:
            console.print(f"      note: {note}", markup=False, highlight=False)
    for line in (*LEGEND, UNITS[report.mode]):
        console.print(line)
    for line in extra:
        console.print(line)
    after = [s for s in report.scenarios if s.kind == "after"]
    before = [s for s in report.scenarios if s.kind == "before"]
    summary = (
        f"{sum(s.passed for s in after)} passed, {sum(s.lost for s in after)} lost in"
        f" {len(after)} after scenario(s)"
    )
    if before:
        shown = sum(1 for s in before if s.ok)
        summary += f"; {shown}/{len(before)} before case(s) showed their loss"
    unsure = report.inconclusive
    if unsure:
        summary += f"; {len(unsure)} inconclusive"
        retry = max(s.retry_time_scale or 0 for s in unsure)
        again = " ".join(f"--scenario {s.name}" for s in unsure)
        pace = f" --time-scale {retry:g}" if retry else ""
        console.print(f"  inconclusive: retry with fleetdrain drill {again}{pace}", markup=False)
    summary += f"; {report.wall_seconds:.1f}s wall; {report.verdict}"
    style = {"OK": "bold green", "INCONCLUSIVE": "bold yellow"}.get(report.verdict, "bold red")
    console.print(Text(summary, style=style))


@dataclass
class _Row:
    name: str
    status: str = "waiting"
    message: str = ""
    started: float | None = None
    ended: float | None = None


@dataclass
class ProgressView:
    """What the drill is doing, fed by its ``progress`` callback (``view.update``).

    On a terminal: a live view (one row per scenario, a spinner on the running one), redrawn
    in place. Piped: every message as one timestamped line, nothing redrawn. Messages shaped
    ``"<scenario>: <text>"`` update that scenario's row; ``<text>`` of ``ok``/``FAILED``/
    ``loss shown`` ends it.
    """

    console: Console
    scenarios: list[str] = field(default_factory=list)
    title: str = "fleetdrain drill"
    clock: Callable[[], float] = time.monotonic
    _rows: dict[str, _Row] = field(default_factory=dict, init=False)
    _last: str = field(default="starting", init=False)
    _live: Live | None = field(default=None, init=False)
    _t0: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._rows = {name: _Row(name) for name in self.scenarios}
        self._t0 = self.clock()

    @property
    def live(self) -> bool:
        """Whether this view redraws in place (a terminal) or prints lines (a log)."""
        return self.console.is_terminal

    def __enter__(self) -> ProgressView:
        self._t0 = self.clock()
        if self.live:
            self._live = Live(
                self._renderable(), console=self.console, refresh_per_second=8, transient=True
            )
            self._live.__enter__()
        else:
            self.console.print(f"{self.title}: {', '.join(self.scenarios) or 'starting'}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def update(self, message: str) -> None:
        """One progress message from the drill (any thread)."""
        now = self.clock()
        name, sep, text = message.partition(": ")
        row = self._rows.get(name) if sep else None
        if row is not None:
            if row.started is None:
                row.started = now
            row.message = text
            if text in ("ok", "loss shown") or text.startswith(("FAILED", "inconclusive")):
                row.status, row.ended = text, now
            else:
                row.status = "running"
        self._last = message
        if self._live is not None:
            self._live.update(self._renderable())
        else:
            # A log line per message: readable in CI, greppable, never redrawn.
            self.console.print(f"[{now - self._t0:6.1f}s] {message}", markup=False)

    def _renderable(self) -> RenderableType:
        now = self.clock()
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(overflow="ellipsis", no_wrap=True)
        for row in self._rows.values():
            if row.status == "running":
                mark: RenderableType = Spinner("dots", style="cyan")
            elif row.status == "waiting":
                mark = Text("·", style="dim")
            elif row.status.startswith("FAILED"):
                mark = Text("✗", style="bold red")
            elif row.status.startswith("inconclusive"):
                mark = Text("?", style="bold yellow")
            else:
                mark = Text("✓", style="green")
            elapsed = ""
            if row.started is not None:
                elapsed = f"{(row.ended or now) - row.started:5.1f}s"
            table.add_row(mark, Text(row.name, style="bold"), elapsed, row.message)
        header = Text.assemble(
            (self.title, "bold"), f"  {now - self._t0:5.1f}s  ", (self._last, "dim")
        )
        return Group(header, table)


def print_timeline(console: Console, scenario: ScenarioReport) -> None:
    """The scenario's timeline as plain lines (``AWS s  [wall s]  kind  subject  what``),
    oldest first."""
    console.print(Text(f"timeline of {scenario.name} (AWS s, wall s beside)", style="bold"))
    if not scenario.timeline:
        console.print("  (no events recorded)")
        return
    for event in sorted(scenario.timeline, key=lambda e: e.t):
        wall = "" if event.wall is None else f" [{event.wall:7.2f}]"
        line = f"  {event.t:8.2f}{wall}  {event.kind:<10} {event.subject:<28} {event.what}"
        console.print(line, markup=False, highlight=False, overflow="fold")
