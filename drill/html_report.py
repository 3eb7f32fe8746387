"""``--html FILE``: the drill's report as one self-contained HTML page.

The table of :mod:`drill.render`, and per scenario a timeline drawn in inline SVG: one lane per
subject (instance, task, agent, job, hook, controller), each state a bar until the subject's
next state, signals, faults and hook completions as markers, and every SIGKILL deadline as a
vertical line across all lanes, so that a person can see a drain beat (or miss) its deadline.
No script, no stylesheet or font from the network: the file can be attached to a CI run and
opened anywhere. Every piece of text that comes from the report is escaped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from drill.report import DrillReport, ScenarioReport, TimelineEvent

#: Lanes are grouped in this order (what a drain flows through, top to bottom).
LANE_ORDER = ("instance", "hook", "controller", "task", "agent", "job", "signal", "fault", "note")
#: Kinds whose events are states (a bar until the subject's next state).
STATE_KINDS = frozenset({"instance", "task", "agent", "job", "hook"})

LABEL_W = 230
PLOT_W = 860
RIGHT_PAD = 20
LANE_H = 24
TOP = 34
BOTTOM = 30

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
    text = f"t={event.t:.2f}s {event.kind} {event.subject}: {event.what}"
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
    """Lanes in display order and the deadline events (drawn across every lane)."""
    by_subject: dict[str, _Lane] = {}
    deadlines: list[TimelineEvent] = []
    for event in sorted(events, key=lambda e: e.t):
        if event.kind == "deadline":
            deadlines.append(event)
            continue
        lane = by_subject.get(event.subject)
        if lane is None:
            lane = by_subject[event.subject] = _Lane(event.kind, event.subject)
        elif lane.kind not in STATE_KINDS and event.kind in STATE_KINDS:
            # A subject first seen through a signal is still, above all, a task or agent.
            lane.kind = event.kind
        if event.kind in STATE_KINDS:
            lane.states.append(event)
            if event.kind == "hook":
                lane.markers.append(event)
        else:
            lane.markers.append(event)

    def order(lane: _Lane) -> int:
        return LANE_ORDER.index(lane.kind) if lane.kind in LANE_ORDER else len(LANE_ORDER)

    return sorted(by_subject.values(), key=order), deadlines


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
    seen_until = max(
        [e.t for e in scenario.timeline if e.kind != "deadline"] + [scenario.wall_seconds or 0.0]
    )
    # A deadline far past everything that happened (a one-hour drain budget after a 4 s
    # drain) would squash the drain into a sliver: such deadlines are pinned to the right edge.
    near = [d.t for d in deadlines if d.t <= max(seen_until, 1e-3) * 1.5]
    end = max([seen_until, *near, 1e-3]) * 1.03
    height = TOP + len(lanes) * LANE_H + BOTTOM
    width = LABEL_W + PLOT_W + RIGHT_PAD

    def x(t: float) -> float:
        return LABEL_W + max(0.0, min(t, end)) / end * PLOT_W

    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="timeline of {_e(scenario.name)}">'
    ]
    step = _tick_step(end)
    tick = 0.0
    axis_y = TOP + len(lanes) * LANE_H
    while tick <= end:
        tx = x(tick)
        out.append(
            f'<line class="grid" x1="{tx:.1f}" y1="{TOP - 4}" x2="{tx:.1f}" y2="{axis_y}" '
            'stroke="#eaeef2"/>'
        )
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 14}" text-anchor="middle">{tick:g}s</text>')
        tick += step
    out.append(
        f'<line class="axis" x1="{LABEL_W}" y1="{axis_y}" x2="{LABEL_W + PLOT_W}" y2="{axis_y}" '
        'stroke="#8c959f"/>'
    )
    for i, lane in enumerate(lanes):
        y = TOP + i * LANE_H
        label = f"{lane.kind}: {lane.subject}"
        short = label if len(label) <= 34 else label[:15] + "…" + label[-18:]
        out.append(
            f'<text class="lane-label" x="{LABEL_W - 8}" y="{y + LANE_H / 2 + 4:.1f}" '
            f'text-anchor="end"><title>{_e(label)}</title>{_e(short)}</text>'
        )
        # A hook state that is not its completion is a bar, not also a marker.
        drawn = [m for m in lane.markers if not (m.kind == "hook" and not _is_completion(m.what))]
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
            if marker.kind == "hook":  # the hook's completion: a diamond
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
    for deadline in deadlines:
        if deadline.t > end:
            label = f"{deadline.what} ({deadline.subject}) at {deadline.t:.0f}s →"
            out.append(
                f'<text class="deadline-label" x="{LABEL_W + PLOT_W:.1f}" y="{TOP - 14}" '
                f'fill="#cf222e" text-anchor="end"><title>{_e(_tooltip(deadline))}</title>'
                f"{_e(label)}</text>"
            )
            continue
        dx = x(deadline.t)
        out.append(
            f'<line class="deadline" x1="{dx:.1f}" y1="{TOP - 10}" x2="{dx:.1f}" y2="{axis_y}" '
            'stroke="#cf222e" stroke-width="2" stroke-dasharray="6 3">'
            f"<title>{_e(_tooltip(deadline))}</title></line>"
        )
        anchor = "end" if dx > LABEL_W + PLOT_W * 0.7 else "start"
        offset = -4 if anchor == "end" else 4
        out.append(
            f'<text class="deadline-label" x="{dx + offset:.1f}" y="{TOP - 14}" fill="#cf222e" '
            f'text-anchor="{anchor}">{_e(deadline.what)} ({_e(deadline.subject)})</text>'
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
            f"<td class='verdict {'ok' if s.ok else 'failed'}'>{_e(s.verdict)}</td>"
            "</tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


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
    verdict = "OK" if report.ok else "FAILED"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}: {verdict}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}: <span class='{'ok' if report.ok else 'failed'}'>{verdict}</span></h1>",
        f"<p class='meta'>started {_e(report.started_at)} · {report.wall_seconds:.1f}s wall · "
        f"time scale {report.time_scale:g} · mode {_e(report.mode)}",
    ]
    if report.mode == "local":
        parts.append(
            " · agents as PID 1"
            if report.pid_namespaces
            else f" · agents without a PID namespace: {_e(report.pid_namespaces_reason)}"
        )
    parts.append("</p>")
    parts.append(_table(report))
    parts.append(
        "<p class='meta'>Times are wall-clock seconds since each scenario started. 'after' "
        "scenarios must lose nothing; 'before' cases must show their loss.</p>"
    )
    parts.append(_legend())
    for s in report.scenarios:
        parts.append(
            f"<h2 id='scenario-{_e(s.name)}'>{_e(s.name)} <small class='meta'>({_e(s.kind)}, "
            f"{s.wall_seconds:.1f}s)</small> <span class='{'ok' if s.ok else 'failed'}'>"
            f"{_e(s.verdict)}</span></h2><p class='desc'>{_e(s.description)}</p>"
        )
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
