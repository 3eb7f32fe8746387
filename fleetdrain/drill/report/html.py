"""``--html FILE``: the drill's report as one self-contained HTML page.

The table of :mod:`fleetdrain.drill.report.terminal`, and per scenario a timeline drawn in inline
SVG: one lane per subject (instance, task, agent, job, hook, controller), each state a bar until the
subject's next state, signals, faults and hook completions as markers, and every SIGKILL deadline as
a vertical line across all lanes, so that a person can see a drain beat (or miss) its deadline.
One clock: the axis, the table and every figure are AWS seconds (the drill's clock, on which a
120 s ``stopTimeout`` is 120 whatever the pace); each event's wall-clock time is in its tooltip,
and each scenario's wall seconds beside its AWS seconds. No script, no stylesheet or font from
the network: the file can be attached to a CI run and opened anywhere. Every piece of text that
comes from the report is escaped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from fleetdrain.drill.report.model import DrillReport, ScenarioReport, TimelineEvent

#: Lanes are grouped in this order (what a drain flows through, top to bottom).
LANE_ORDER = ("instance", "hook", "controller", "task", "agent", "job", "signal", "fault", "note")
#: Kinds whose events are states (a bar until the subject's next state).
STATE_KINDS = frozenset({"instance", "task", "agent", "job", "hook"})

LABEL_W = 230
PLOT_W = 860
RIGHT_PAD = 20
LANE_H = 24
DEADLINE_ROWS = 3
TOP = 22 + 12 * DEADLINE_ROWS
BOTTOM = 44
#: The axis' title: the one clock of the report.
AXIS_TITLE = "AWS seconds since the scenario started"

CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #1b1f24; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 4px; }
.meta, .desc { color: #57606a; }
table.report { border-collapse: collapse; margin-top: 12px; }
table.report th, table.report td { border-bottom: 1px solid #d0d7de; padding: 4px 10px;
  text-align: right; white-space: nowrap; }
table.report th:first-child, table.report td:first-child,
table.report td.kind, table.report td.verdict, table.report th.verdict { text-align: left; }
.ok { color: #1a7f37; font-weight: 600; }
.failed { color: #cf222e; font-weight: 700; }
.inconclusive { color: #9a6700; font-weight: 700; }
p.cause { margin: 4px 0; }
.lost-after { color: #cf222e; font-weight: 700; }
.lost-before { color: #9a6700; font-weight: 600; }
.summary { margin-top: 8px; font-weight: 600; }
ul.notes { margin: 4px 0; color: #57606a; }
svg.timeline { display: block; margin-top: 8px; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #1b1f24; }
svg .axis { stroke: #8c959f; stroke-width: 1; }
svg .grid { stroke: #eaeef2; stroke-width: 1; }
svg .lane-label { fill: #57606a; }
svg .bar-label { fill: #fff; font-size: 10px; pointer-events: none; }
svg .deadline { stroke: #cf222e; stroke-width: 2; stroke-dasharray: 6 3; }
svg .deadline-label { fill: #cf222e; font-weight: 600; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; vertical-align: -2px;
  margin-right: 4px; border-radius: 2px; }
"""

#: Bar colours by what a state means; the first keyword found in the label wins.
STATE_COLOURS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lost", "sigkill", "137", "killed", "failed", "abandon", "expired"), "#cf222e"),
    (("cancel", "agent_stop", "forced", "force"), "#bc4c00"),
    (("drain", "pause", "stopping", "terminating", "wait", "soft", "hard", "spot"), "#d4a72c"),
    (("running", "busy", "accepted", "started", "protect"), "#0969da"),
    (("passed", "finished exit 0", "exit 0", "continue", "completed", "ok"), "#1a7f37"),
    (("stopped", "exited", "disconnect", "terminated", "done", "gone"), "#8c959f"),
)
DEFAULT_STATE_COLOUR = "#6e7781"
MARKER_COLOURS = {
    "signal": "#8250df",
    "fault": "#cf222e",
    "controller": "#1f6feb",
    "hook": "#1a7f37",
    "note": "#57606a",
}


def state_colour(label: str) -> str:
    """The bar colour for a state label (red for losses, amber for draining, ...)."""
    low = label.lower()
    for words, colour in STATE_COLOURS:
        if any(w in low for w in words):
            return colour
    return DEFAULT_STATE_COLOUR


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _tooltip(event: TimelineEvent) -> str:
    wall = "" if event.wall is None else f" (wall {event.wall:.2f} s)"
    text = f"{event.t:.2f} AWS s{wall} {event.kind} {event.subject}: {event.what}"
    if event.detail:
        text += "\n" + json.dumps(event.detail, default=str, sort_keys=True)
    return text


@dataclass
class _Lane:
    kind: str
    subject: str
    states: list[TimelineEvent] = field(default_factory=list)
    markers: list[TimelineEvent] = field(default_factory=list)


def _lanes(events: list[TimelineEvent]) -> tuple[list[_Lane], list[TimelineEvent]]:
    """Lanes in display order and the deadline events (drawn across every lane).

    A lane is one (kind, subject): an agent and its task may share a name and still get a lane
    each. States become bars; a signal or fault is drawn on the lane of the task (else agent,
    else whatever state lane) it names; hook events are markers on the hook's own lane (its
    heartbeats and its completion are moments, not states); controller actions and notes get
    lanes of their own.
    """
    ordered = sorted(events, key=lambda e: e.t)
    lanes: dict[tuple[str, str], _Lane] = {}
    deadlines: list[TimelineEvent] = []
    for event in ordered:
        if event.kind in STATE_KINDS:
            state_lane = lanes.setdefault(
                (event.kind, event.subject), _Lane(event.kind, event.subject)
            )
            if event.kind == "hook":
                state_lane.markers.append(event)
            else:
                state_lane.states.append(event)
    for event in ordered:
        if event.kind == "deadline":
            deadlines.append(event)
        elif event.kind not in STATE_KINDS:
            lane: _Lane | None = None
            if event.kind in ("signal", "fault"):
                for kind in ("task", "agent", "instance", "job"):
                    lane = lanes.get((kind, event.subject))
                    if lane is not None:
                        break
            if lane is None:
                key = (event.kind, event.subject)
                lane = lanes.setdefault(key, _Lane(event.kind, event.subject))
            lane.markers.append(event)

    def order(lane: _Lane) -> int:
        # Stable sort: within a kind, lanes keep the order their subject first appeared in.
        return LANE_ORDER.index(lane.kind) if lane.kind in LANE_ORDER else len(LANE_ORDER)

    return sorted(lanes.values(), key=order), deadlines


def _tick_step(span: float) -> float:
    """A 1/2/5 x 10^n step giving about 8 ticks over ``span`` seconds."""
    raw = max(span, 1e-6) / 8
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * power:
            return float(mult * power)
    return float(10 * power)


def timeline_svg(scenario: ScenarioReport) -> str:
    """The scenario's timeline as an inline ``<svg>`` element ('' when it has no events)."""
    if not scenario.timeline:
        return ""
    lanes, deadlines = _lanes(scenario.timeline)
    happened = [e.t for e in scenario.timeline if e.kind != "deadline"] or [0.0]
    # The scenario's own end, on the timeline's clock: AWS seconds (a game day's timeline has
    # no wall times beside its own, which are AWS's).
    covered = scenario.aws_seconds
    if covered is None and all(e.wall is None for e in scenario.timeline):
        covered = scenario.wall_seconds
    seen_until = max([*happened, covered or 0.0])
    # A deadline far past everything that happened (a one-hour drain budget after a 4 s
    # drain) would squash the drain into a sliver: such deadlines are pinned to the right edge.
    near = [d.t for d in deadlines if d.t <= max(seen_until, 1e-3) * 1.5]
    last = max([seen_until, *near, 1e-3])
    # The axis starts at the first tick before the first event: a fleet that took 30 s to set
    # up would otherwise leave the left third of every lane empty.
    first = max(0.0, min(happened))
    step = _tick_step(max(last - first, 1e-3))
    start = math.floor(first / step) * step if first > 2 * step else 0.0
    end = start + (last - start) * 1.03
    height = TOP + len(lanes) * LANE_H + BOTTOM
    width = LABEL_W + PLOT_W + RIGHT_PAD

    def x(t: float) -> float:
        return LABEL_W + (max(start, min(t, end)) - start) / (end - start) * PLOT_W

    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="timeline of {_e(scenario.name)}">'
    ]
    # Ticks on the same step the start was aligned to, so that they read 24, 26, 28 ...
    tick = start
    axis_y = TOP + len(lanes) * LANE_H
    while tick <= end:
        tx = x(tick)
        out.append(
            f'<line class="grid" x1="{tx:.1f}" y1="{TOP - 4}" x2="{tx:.1f}" y2="{axis_y}" '
            'stroke="#eaeef2"/>'
        )
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 14}" text-anchor="middle">{tick:g}s</text>')
        tick = round(tick + step, 9)  # no 0.30000000000000004s
    out.append(
        f'<line class="axis" x1="{LABEL_W}" y1="{axis_y}" x2="{LABEL_W + PLOT_W}" y2="{axis_y}" '
        'stroke="#8c959f"/>'
    )
    out.append(
        f'<text class="axis-title" x="{LABEL_W + PLOT_W / 2:.1f}" y="{axis_y + 30}" '
        f'text-anchor="middle" fill="#57606a">{_e(AXIS_TITLE)}</text>'
    )
    for i, lane in enumerate(lanes):
        y = TOP + i * LANE_H
        label = f"{lane.kind}: {lane.subject}"
        short = label if len(label) <= 30 else label[:13] + "…" + label[-16:]
        out.append(
            f'<text class="lane-label" x="{LABEL_W - 8}" y="{y + LANE_H / 2 + 4:.1f}" '
            f'text-anchor="end"><title>{_e(label)}</title>{_e(short)}</text>'
        )
        drawn = lane.markers
        for j, state in enumerate(lane.states):
            x0 = x(state.t)
            x1 = x(lane.states[j + 1].t) if j + 1 < len(lane.states) else x(end)
            w = max(x1 - x0, 1.5)
            colour = state_colour(state.what)
            out.append(
                f'<rect x="{x0:.1f}" y="{y + 4}" width="{w:.1f}" height="{LANE_H - 8}" rx="2" '
                f'fill="{colour}" fill-opacity="0.85"><title>{_e(_tooltip(state))}</title></rect>'
            )
            # Leave room for a marker sitting at the bar's start (a hook completion, a signal).
            pad = 11.0 if any(abs(x(m.t) - x0) < 9 for m in drawn) else 4.0
            if w > pad + 4 + 6.2 * min(len(state.what), 30):
                out.append(
                    f'<text class="bar-label" x="{x0 + pad:.1f}" y="{y + LANE_H / 2 + 3.5:.1f}" '
                    f'fill="#fff" font-size="10">{_e(state.what[:30])}</text>'
                )
        for marker in drawn:
            mx, my = x(marker.t), y + LANE_H / 2
            colour = MARKER_COLOURS.get(marker.kind, "#57606a")
            tip = f"<title>{_e(_tooltip(marker))}</title>"
            if marker.kind == "hook" and _is_completion(marker.what):  # a diamond
                points = (
                    f"{mx:.1f},{my - 8:.1f} {mx + 8:.1f},{my:.1f} {mx:.1f},{my + 8:.1f} "
                    f"{mx - 8:.1f},{my:.1f}"
                )
                out.append(
                    f'<polygon points="{points}" fill="{colour}" stroke="#fff">{tip}</polygon>'
                )
            elif marker.kind == "signal":  # a signal: a triangle pointing down at the lane
                points = (
                    f"{mx - 6:.1f},{my - 8:.1f} {mx + 6:.1f},{my - 8:.1f} {mx:.1f},{my + 4:.1f}"
                )
                out.append(
                    f'<polygon points="{points}" fill="{colour}" stroke="#fff">{tip}</polygon>'
                )
                # Left of the marker, where the bar that the signal ends usually has room (a
                # new state's label starts to its right); a white halo keeps it readable.
                out.append(
                    f'<text x="{mx - 8:.1f}" y="{my + 3.5:.1f}" text-anchor="end" '
                    f'fill="{colour}" stroke="#fff" '
                    f'stroke-width="3" paint-order="stroke" font-weight="600">'
                    f"{_e(marker.what[:16])}</text>"
                )
            elif marker.kind == "fault":  # a fault: a red cross
                out.append(
                    f'<path d="M{mx - 5:.1f},{my - 5:.1f} L{mx + 5:.1f},{my + 5:.1f} '
                    f'M{mx + 5:.1f},{my - 5:.1f} L{mx - 5:.1f},{my + 5:.1f}" stroke="{colour}" '
                    f'stroke-width="2.5">{tip}</path>'
                )
            else:
                out.append(
                    f'<circle cx="{mx:.1f}" cy="{my:.1f}" r="4.5" fill="{colour}" '
                    f'stroke="#fff">{tip}</circle>'
                )
    # Deadlines of the same kind that fall together (every task on an instance gets its
    # SIGKILL at the same moment) are one line naming them all; labels alternate between two
    # rows so that neighbouring deadlines stay legible.
    groups: list[list[TimelineEvent]] = []
    for deadline in sorted(deadlines, key=lambda d: d.t):
        last_group = groups[-1] if groups else None
        if (
            last_group is not None
            and last_group[0].what == deadline.what
            and abs(x(deadline.t) - x(last_group[0].t)) < 3
        ):
            last_group.append(deadline)
        else:
            groups.append([deadline])
    rows: list[list[tuple[float, float]]] = [[] for _ in range(DEADLINE_ROWS)]
    for group in groups:
        first_d = group[0]
        subjects = ", ".join(dict.fromkeys(d.subject for d in group))
        tip = "\n".join(_tooltip(d) for d in group)
        if first_d.t > end:
            label = f"{first_d.what} ({subjects}) at {first_d.t:.0f}s →"
            out.append(
                f'<text class="deadline-label" x="{LABEL_W + PLOT_W:.1f}" y="{TOP - 14}" '
                f'fill="#cf222e" text-anchor="end"><title>{_e(tip)}</title>{_e(label)}</text>'
            )
            continue
        dx = x(first_d.t)
        text = f"{first_d.what} ({subjects})"
        anchor = "end" if dx > LABEL_W + PLOT_W * 0.7 else "start"
        label_w = 6.2 * len(text) + 8
        span = (dx - label_w, dx) if anchor == "end" else (dx, dx + label_w)
        # The first label row where this label overlaps no other (the last row if none is free).
        row = next(
            (
                i
                for i, taken in enumerate(rows)
                if all(span[1] < a or span[0] > b for a, b in taken)
            ),
            DEADLINE_ROWS - 1,
        )
        rows[row].append(span)
        label_y = TOP - 14 - 12 * row
        out.append(
            f'<line class="deadline" x1="{dx:.1f}" y1="{label_y + 4}" x2="{dx:.1f}" '
            f'y2="{axis_y}" stroke="#cf222e" stroke-width="2" stroke-dasharray="6 3">'
            f"<title>{_e(tip)}</title></line>"
        )
        offset = -4 if anchor == "end" else 4
        out.append(
            f'<text class="deadline-label" x="{dx + offset:.1f}" y="{label_y}" fill="#cf222e" '
            f'text-anchor="{anchor}">{_e(text)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _is_completion(what: str) -> bool:
    low = what.lower()
    return any(w in low for w in ("complete", "continue", "abandon"))


def _table(report: DrillReport) -> str:
    head = (
        "scenario",
        "kind",
        "jobs",
        "passed",
        "retried",
        "lost",
        "longest drain s",
        "hook latency s",
        "max hb gap",
        "wall s",
        "verdict",
    )
    rows = [
        "<table class='report'><thead><tr>"
        + "".join(f"<th class='{'verdict' if h == 'verdict' else ''}'>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for s in report.scenarios:
        lost_class = ("lost-after" if s.kind == "after" else "lost-before") if s.lost else ""
        rows.append(
            "<tr>"
            f"<td><a href='#scenario-{_e(s.name)}'>{_e(s.name)}</a></td>"
            f"<td class='kind'>{_e(s.kind)}</td>"
            f"<td>{s.jobs_run}</td><td>{s.passed}</td><td>{s.retried}</td>"
            f"<td class='{lost_class}'>{s.lost}</td>"
            f"<td>{_fmt(s.longest_drain_seconds)}</td>"
            f"<td>{_fmt(s.hook_completion_latency_seconds)}</td>"
            f"<td>{_fmt(s.max_heartbeat_gap_intervals, 'x')}</td>"
            f"<td>{s.wall_seconds:.1f}</td>"
            f"<td class='verdict {_verdict_class(s)}'>{_e(s.verdict)}</td>"
            "</tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def _verdict_class(s: ScenarioReport) -> str:
    return "ok" if s.ok else "inconclusive" if s.inconclusive else "failed"


def _legend() -> str:
    items = [
        ("#0969da", "running / busy"),
        ("#d4a72c", "draining / paused / waiting"),
        ("#bc4c00", "cancelled / forced"),
        ("#1a7f37", "passed / completed"),
        ("#cf222e", "lost / SIGKILL"),
        ("#8c959f", "stopped / exited"),
    ]
    spans = "".join(f"<span><i style='background:{c}'></i>{_e(t)}</span>" for c, t in items)
    marks = (
        "<span>▼ signal</span><span>◆ hook completed</span><span>✕ fault</span>"
        "<span>● controller / note</span><span style='color:#cf222e'>┆ SIGKILL deadline</span>"
    )
    return f"<p class='legend'>{spans}{marks}</p>"


def render_html(report: DrillReport) -> str:
    """The whole report as one HTML document (a string)."""
    title = "fleetdrain drill" + (" --aws" if report.mode == "aws" else "")
    verdict = report.verdict
    css = {"OK": "ok", "INCONCLUSIVE": "inconclusive"}.get(verdict, "failed")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}: {verdict}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}: <span class='{css}'>{verdict}</span></h1>",
        f"<p class='meta'>started {_e(report.started_at)} · {report.wall_seconds:.1f} s wall · "
        + (_e(report.pace) if report.pace else f"pace {report.time_scale:g}x")
        + f" · mode {_e(report.mode)}",
    ]
    if report.mode == "local":
        parts.append(
            " · agents as PID 1"
            if report.pid_namespaces
            else f" · agents without a PID namespace: {_e(report.pid_namespaces_reason)}"
        )
    parts.append("</p>")
    if report.mode == "local" and report.wrapped_agent is not None:
        parts.append(f"<p class='meta agent'>{_e(report.wrapped_agent.summary)}</p>")
    parts.append(_table(report))
    parts.append(
        "<p class='meta'>Times and durations are AWS seconds, the drill's clock (a 120 s "
        "stopTimeout is 120 whatever the pace), since each scenario started; an event's "
        "wall-clock time is in its tooltip, and each scenario's wall seconds beside its AWS "
        "seconds. 'after' scenarios must lose nothing; 'before' cases must show their loss; "
        "an inconclusive scenario could not tell (out of time, or a machine too slow for "
        "it) and says the pace to retry at.</p>"
    )
    parts.append(_legend())
    for s in report.scenarios:
        took = f"{s.wall_seconds:.1f} s wall"
        if s.aws_seconds is not None:
            took = f"{s.aws_seconds:.0f} AWS s, {took}"
        if s.agent:
            took += f", agent behind wrap: {_e(s.agent)}"
        parts.append(
            f"<h2 id='scenario-{_e(s.name)}'>{_e(s.name)} <small class='meta'>({_e(s.kind)}, "
            f"{took})</small> <span class='{_verdict_class(s)}'>"
            f"{_e(s.verdict)}</span></h2><p class='desc'>{_e(s.description)}</p>"
        )
        if s.cause and not s.ok:
            parts.append(f"<p class='cause {_verdict_class(s)}'>{_e(s.verdict)}: {_e(s.cause)}</p>")
        if s.notes:
            parts.append(
                "<ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in s.notes) + "</ul>"
            )
        svg = timeline_svg(s)
        parts.append(svg or "<p class='meta'>(no timeline recorded for this scenario)</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(report: DrillReport, path: Path) -> None:
    """Write :func:`render_html` to ``path`` (UTF-8)."""
    path.write_text(render_html(report), encoding="utf-8")
