"""The drill's renderers, fed DrillReports built here: the terminal table, the progress view
(live and piped) and the self-contained HTML timeline. One clock (issue 14): timelines and
figures in AWS seconds, labelled, wall seconds beside them; an inconclusive verdict of its own,
with its cause; a scenario that failed or ran out of time keeps its timeline."""

from __future__ import annotations

import io
import itertools
import re
from html.parser import HTMLParser

from fleetdrain.drill.report.html import render_html, state_colour, timeline_svg, write_html
from fleetdrain.drill.report.model import DrillReport, ScenarioReport, TimelineEvent
from fleetdrain.drill.report.terminal import (
    PIPED_WIDTH,
    ProgressView,
    make_console,
    print_report,
    print_timeline,
)

#: The fixtures' pace: AWS seconds per wall second (the default 10x).
SPEED = 10.0


def ev(t: float, kind: str, subject: str, what: str, **detail: object) -> TimelineEvent:
    """An event at ``t`` AWS seconds (its wall time beside it, at :data:`SPEED`)."""
    return TimelineEvent(
        t=t,
        kind=kind,  # type: ignore[arg-type]
        subject=subject,
        what=what,
        detail=dict(detail),
        wall=round(t / SPEED, 3),
    )


def scale_in() -> ScenarioReport:
    return ScenarioReport(
        name="scale-in",
        description="ASG scale-in under a job longer than stopTimeout",
        jobs_run=1,
        passed=1,
        longest_drain_seconds=14.25,
        hook_completion_latency_seconds=0.41,
        max_heartbeat_gap_intervals=1.12,
        wall_seconds=1.6,
        aws_seconds=16.0,
        ok=True,
        timeline=[
            ev(0.0, "instance", "i-0abc", "InService"),
            ev(0.0, "task", "task-1", "RUNNING"),
            ev(0.1, "agent", "agent-1", "busy"),
            ev(0.1, "job", "job-1", "running"),
            ev(1.0, "instance", "i-0abc", "Terminating:Wait"),
            ev(1.1, "hook", "ci-agents/hook", "waiting"),
            ev(1.2, "controller", "controller", "soft drain: paused 1 agent"),
            ev(1.2, "agent", "agent-1", "paused"),
            ev(9.0, "deadline", "task-1", "SIGKILL deadline", source="stopTimeout"),
            ev(13.0, "job", "job-1", "finished exit 0"),
            ev(13.2, "signal", "task-1", "SIGTERM"),
            ev(13.4, "task", "task-1", "STOPPED exit 0"),
            ev(13.8, "hook", "ci-agents/hook", "completed CONTINUE"),
            ev(5.0, "fault", "coordinator", "HTTP 502 on rest_pause"),
        ],
    )


def shell_pid1() -> ScenarioReport:
    return ScenarioReport(
        name="shell-pid1",
        kind="before",
        description="sh -c wrapper as PID 1 never forwards SIGTERM",
        jobs_run=2,
        passed=1,
        retried=1,
        lost=1,
        longest_drain_seconds=8.0,
        ok=True,
        notes=["SIGKILL at stopTimeout: exit 137"],
    )


def report(*scenarios: ScenarioReport) -> DrillReport:
    return DrillReport(
        started_at="2026-11-30T08:00:00+00:00",
        wall_seconds=42.5,
        time_scale=0.1,
        pid_namespaces=True,
        scenarios=list(scenarios),
    )


def piped_console() -> tuple[io.StringIO, object]:
    buf = io.StringIO()
    return buf, make_console(buf, force_terminal=False)


# ------------------------------------------------------------------ terminal table


def test_table_shows_every_column_and_the_verdicts() -> None:
    buf = io.StringIO()
    console = make_console(buf, force_terminal=False)
    assert console.width == PIPED_WIDTH
    failed_after = ScenarioReport(
        name="spot", description="spot", jobs_run=2, passed=1, retried=1, lost=1, ok=False
    )
    print_report(console, report(scale_in(), shell_pid1(), failed_after))
    out = buf.getvalue()
    assert "\x1b[" not in out  # piped: no colour or cursor escapes
    for header in ("jobs", "passed", "retried", "lost", "longest", "drain s", "latency s"):
        assert header in out
    row = next(line for line in out.splitlines() if "scale-in" in line and "after" in line)
    assert re.search(
        r"scale-in\s.*after\s.*1\s.*1\s.*0\s.*0\s.*14\.25\s.*0\.41\s.*1\.12x\s.*ok", row
    )
    before = next(line for line in out.splitlines() if "shell-pid1" in line and "before" in line)
    assert "loss shown" in before
    spot = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("spot"))
    assert "FAILED" in spot
    assert "SIGKILL at stopTimeout: exit 137" in out
    assert "1/1 before case(s) showed their loss" in out
    assert out.rstrip().endswith("FAILED")
    assert max(len(line) for line in out.splitlines()) <= PIPED_WIDTH
    # Every verdict on one line: nothing in a row wrapped in 120 columns.
    assert sum(1 for line in out.splitlines() if "loss shown" in line) == 1


def test_an_80_column_terminal_truncates_nothing() -> None:
    buf = io.StringIO()
    console = make_console(buf, force_terminal=False)
    console.width = 80
    long_name = ScenarioReport(
        name="heartbeat-stops",
        kind="before",
        description="d",
        lost=1,
        ok=True,
        longest_drain_seconds=147.8,
        hook_completion_latency_seconds=10.25,
        max_heartbeat_gap_intervals=36.05,
    )
    print_report(console, report(scale_in(), long_name))
    table = buf.getvalue().split("  scale-in (after)")[0]
    assert "…" not in table
    assert max(len(line) for line in table.splitlines()) <= 80
    row = next(line for line in table.splitlines() if "heartbeat-stops" in line)
    assert "147.80" in row and "10.25" in row and "36.05x" in row and "loss shown" in row


def test_summary_is_ok_when_every_scenario_is() -> None:
    buf = io.StringIO()
    print_report(make_console(buf, force_terminal=False), report(scale_in(), shell_pid1()))
    assert buf.getvalue().rstrip().endswith("OK")


# ------------------------------------------------------------------ progress view


def test_piped_progress_is_one_plain_line_per_message() -> None:
    buf = io.StringIO()
    ticks = iter([0.0, 0.0, 1.5, 3.0])
    view = ProgressView(
        make_console(buf, force_terminal=False), ["stop-task"], clock=lambda: next(ticks)
    )
    with view:
        view.update("stop-task: running")
        view.update("stop-task: ok")
    lines = buf.getvalue().splitlines()
    assert lines == [
        "fleetdrain drill: stop-task",
        "[   1.5s] stop-task: running",
        "[   3.0s] stop-task: ok",
    ]


def test_terminal_progress_redraws_in_place_with_a_row_per_scenario() -> None:
    buf = io.StringIO()
    console = make_console(buf, force_terminal=True)
    with ProgressView(console, ["stop-task", "spot"]) as view:
        assert view.live
        view.update("stop-task: waiting for the build to start")
        view.update("stop-task: ok")
        view.update("spot: [bold]not markup[/]")
        rendered = io.StringIO()
        probe = make_console(rendered, force_terminal=False)
        probe.print(view._renderable())
    out = buf.getvalue()
    assert "\x1b[" in out  # cursor movement: a live view
    text = rendered.getvalue()
    assert "✓" in text and "stop-task" in text  # stop-task ended ok
    assert "[bold]not markup[/]" in text  # messages are shown as they are, not as markup


# ------------------------------------------------------------------ HTML


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Collector:
    c = _Collector()
    c.feed(html)
    c.close()
    return c


def test_html_is_self_contained_with_table_and_timeline(tmp_path) -> None:
    path = tmp_path / "drill.html"
    write_html(report(scale_in(), shell_pid1()), path)
    html = path.read_text(encoding="utf-8")
    doc = parse(html)
    tags = [t for t, _ in doc.tags]
    assert "script" not in tags
    # Nothing fetched from anywhere: no src/href to another origin, no @import or url().
    for _, attrs in doc.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith("#"), value
    assert "@import" not in html and "url(" not in html
    assert tags.count("svg") == 1  # shell-pid1 has no timeline, and says so
    assert "no timeline recorded" in html
    text = " ".join(doc.text)
    assert "loss shown" in text and "14.25" in text and "0.41" in text and "1.12x" in text


def test_timeline_has_a_lane_per_subject_bars_markers_and_the_deadline() -> None:
    svg = timeline_svg(scale_in())
    doc = parse(svg)
    # Each lane label is a text with a <title> (the full label) inside: keep one of each.
    labels = list(
        dict.fromkeys(
            t for t in doc.text if t.startswith(("instance:", "task:", "agent:", "job:", "hook:"))
        )
    )
    assert labels == [
        "instance: i-0abc",
        "hook: ci-agents/hook",
        "task: task-1",
        "agent: agent-1",
        "job: job-1",
    ]
    assert "controller: controller" in doc.text and "fault: coordinator" in doc.text
    # A bar per state: instance 2, task 2, agent 2, job 2 (hook events are moments: markers).
    rects = [a for t, a in doc.tags if t == "rect"]
    assert len(rects) == 8
    # The job's "running" bar spans from 0.1 s to its finish at 13.0 s.
    running = re.search(
        r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"[^>]*>'
        r"<title>0\.10 AWS s \(wall 0\.01 s\) job",
        svg,
    )
    assert running is not None
    x0, w = float(running[1]), float(running[2])
    end = 16.0 * 1.03
    assert abs(x0 - (230 + 0.1 / end * 860)) < 0.2
    assert abs(x0 + w - (230 + 13.0 / end * 860)) < 0.2
    # The deadline: one vertical line across every lane, at 9 s.
    lines = [a for t, a in doc.tags if t == "line" and a.get("class") == "deadline"]
    assert len(lines) == 1 and lines[0]["x1"] == lines[0]["x2"]
    assert abs(float(lines[0]["x1"] or 0) - (230 + 9.0 / end * 860)) < 0.2
    assert "SIGKILL deadline (task-1)" in doc.text
    # Markers: SIGTERM (triangle), the hook's completion (diamond), the fault (cross), and
    # circles for the controller's action and the hook's wait.
    assert sum(1 for t, _ in doc.tags if t == "polygon") == 2
    assert sum(1 for t, _ in doc.tags if t == "circle") == 2
    assert sum(1 for t, _ in doc.tags if t == "path") == 1
    assert "SIGTERM" in doc.text


def test_everything_from_the_report_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    s = ScenarioReport(
        name="x<y",
        description=evil,
        notes=[evil],
        ok=False,
        timeline=[
            ev(0.0, "agent", evil, evil, why=evil),
            ev(1.0, "deadline", evil, evil),
            ev(0.5, "signal", evil, 'SIG"TERM'),
        ],
    )
    html = render_html(report(s))
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x&lt;y" in html
    assert 'SIG"TERM' not in html
    doc = parse(html)
    assert not any(t == "script" for t, _ in doc.tags)


def test_state_colours_mark_losses_red_and_passes_green() -> None:
    assert state_colour("lost") == state_colour("STOPPED exit 137") == "#cf222e"
    assert state_colour("finished exit 0") == "#1a7f37"
    assert state_colour("draining") != state_colour("running")


def test_a_deadline_far_beyond_the_drain_is_pinned_to_the_edge_not_the_scale() -> None:
    s = scale_in()
    s.timeline.append(ev(3600.0, "deadline", "i-0abc", "force at"))
    svg = timeline_svg(s)
    # The axis still ends near the last event, so the drain stays readable...
    ticks = [float(t[:-1]) for t in parse(svg).text if re.fullmatch(r"[\d.]+s", t)]
    assert max(ticks) < 20
    # ...and the far deadline is named at the right edge with its time, not drawn as a line.
    assert "force at (i-0abc) at 3600s →" in svg
    assert len(re.findall(r'class="deadline"', svg)) == 1  # only the 9 s SIGKILL deadline


def test_an_agent_and_its_task_of_the_same_name_get_a_lane_each() -> None:
    s = ScenarioReport(
        name="stop-task",
        description="d",
        timeline=[
            ev(30.0, "task", "a1", "RUNNING"),
            ev(30.5, "agent", "a1", "connected"),
            ev(40.0, "signal", "a1", "SIGTERM"),
            ev(40.1, "agent", "a1", "draining"),
            ev(44.0, "task", "a1", "STOPPED"),
        ],
    )
    svg = timeline_svg(s)
    text = parse(svg).text
    assert "task: a1" in text and "agent: a1" in text
    # The SIGTERM is drawn on the task's lane (the second lane from the top is the agent's).
    sig = re.search(r'<polygon points="[\d.]+,([\d.]+) ', svg)
    assert sig is not None and float(sig[1]) < 58 + 24
    # Nothing happened before 30 s: the axis starts near the first event, not at 0.
    ticks = [float(t[:-1]) for t in text if re.fullmatch(r"[\d.]+s", t)]
    assert min(ticks) >= 25 and max(ticks) >= 44


def test_ticks_are_round_and_evenly_spaced() -> None:
    s = ScenarioReport(
        name="x",
        description="d",
        timeline=[ev(26.5, "task", "t", "RUNNING"), ev(42.0, "task", "t", "STOPPED")],
    )
    text = parse(timeline_svg(s)).text
    ticks = [float(t[:-1]) for t in text if re.fullmatch(r"[\d.]+s", t)]
    steps = {round(b - a, 6) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1
    step = steps.pop()
    # Every tick a multiple of the step (26, 28, 30 ..., never 26, 31, 36).
    assert all(t % step == 0 for t in ticks), ticks
    assert ticks[0] <= 26.5 and ticks[-1] >= 40


# ------------------------------------------------------------------ one clock, three verdicts


def out_of_time() -> ScenarioReport:
    """A scenario that ran out of time: inconclusive, its timeline kept."""
    return ScenarioReport(
        name="wrapped-spot",
        description="spot behind wrap",
        jobs_run=1,
        wall_seconds=200.0,
        aws_seconds=130.0,
        outcome="inconclusive",
        cause="machine too slow (load 6.2 on 2 cores, stalls up to 0.80 s against a 1.00 s "
        "window): ran out of time after 200s wall; retry with --time-scale 4",
        retry_time_scale=4.0,
        notes=["ran out of time after 200s wall"],
        timeline=[
            ev(10.0, "task", "wrapped-spot-a1", "RUNNING"),
            ev(20.0, "instance", "i-1", "spot interruption notice"),
            ev(140.0, "deadline", "i-1", "instance reclaimed (spot 120s)"),
        ],
    )


def test_an_inconclusive_scenario_is_neither_passed_nor_failed() -> None:
    s = out_of_time()
    assert s.inconclusive and not s.ok and s.verdict == "inconclusive"
    drill = report(scale_in(), s)
    assert drill.verdict == "INCONCLUSIVE" and drill.exit_status == 3
    assert drill.failed == [] and drill.inconclusive == [s]
    # A report built from ``ok`` alone (the --aws game day's) gets its outcome from it.
    assert ScenarioReport(name="x", description="d", ok=True).outcome == "passed"
    assert ScenarioReport(name="x", description="d").outcome == "failed"


def test_the_table_says_inconclusive_with_its_cause_and_the_pace_to_retry_at() -> None:
    buf, console = piped_console()
    drill = report(scale_in(), out_of_time())
    drill.pace = "pace: 2x (load 4.0 on 2 cores, 0.50 of a core per process), 4 scenario(s) at once"
    print_report(console, drill)  # type: ignore[arg-type]
    out = buf.getvalue()
    assert out.startswith("pace: 2x (load 4.0 on 2 cores")
    row = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("wrapped-spot"))
    assert "inconclusive" in row and "FAILED" not in row and re.search(r"\b200\b", row)
    assert "inconclusive: machine too slow (load 6.2 on 2 cores" in out
    assert "wall s" in out and "seconds are AWS seconds" in out
    *_, retry, last = out.rstrip().splitlines()
    again = "fleetdrain drill --scenario wrapped-spot --time-scale 4"
    assert retry == f"  inconclusive: retry with {again}"
    assert "; 1 inconclusive;" in last and last.endswith("INCONCLUSIVE")
    assert max(len(line) for line in out.splitlines()) <= PIPED_WIDTH


def test_the_html_has_one_clock_labelled_and_wall_time_beside_it() -> None:
    html = render_html(report(scale_in(), out_of_time()))
    text = " ".join(parse(html).text)
    assert "Times are wall-clock seconds" not in html
    assert "Times and durations are AWS seconds" in text
    assert "AWS seconds since the scenario started" in text  # the axis' title, per timeline
    assert "16 AWS s, 1.6 s wall" in text  # each scenario: both
    assert "0.10 AWS s (wall 0.01 s) job job-1: running" in html  # each event: both
    assert "pace 0.1x" in text  # no pace line: the time scale alone
    drill = report(scale_in())
    drill.pace = "pace: 2x (load 4.0 on 2 cores, 0.50 of a core per process), 4 scenario(s) at once"
    assert "· pace: 2x (load 4.0 on 2 cores" in render_html(drill)


def test_a_scenario_that_ran_out_of_time_keeps_its_timeline_and_names_its_cause() -> None:
    html = render_html(report(out_of_time()))
    assert "no timeline recorded" not in html
    assert html.count("<svg") == 1
    doc = parse(html)
    assert any(
        t == "span" and a.get("class") == "inconclusive" and "INCONCLUSIVE" for t, a in doc.tags
    )
    text = " ".join(doc.text)
    assert "inconclusive: machine too slow (load 6.2 on 2 cores" in text
    assert "retry with --time-scale 4" in text
    assert "spot interruption notice" in html


def test_a_plain_timeline_is_on_the_aws_clock_with_wall_time_beside_it() -> None:
    buf, console = piped_console()
    print_timeline(console, out_of_time())  # type: ignore[arg-type]
    lines = buf.getvalue().splitlines()
    assert lines[0] == "timeline of wrapped-spot (AWS s, wall s beside)"
    assert re.match(r"\s+20\.00 \[\s+2\.00\]\s+instance\s+i-1\s+spot interruption notice", lines[2])


def test_progress_marks_an_inconclusive_scenario_as_ended() -> None:
    buf = io.StringIO()
    console = make_console(buf, force_terminal=True)
    with ProgressView(console, ["spot"]) as view:
        view.update("spot: inconclusive (out of time)")
        rendered = io.StringIO()
        make_console(rendered, force_terminal=False).print(view._renderable())
    text = rendered.getvalue()
    assert "?" in text and "✓" not in text and "✗" not in text
