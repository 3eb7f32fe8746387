"""The drill's spot storm (issue 12): its sizing, its figures, how the report's rules treat them
(a figures note never fails a scenario; background agents stay off the timeline), the
organization's other REST users; and, slow, the scenario itself judged by its report: nothing
lost, every drain ended, the figures given.

The scenario runs at a calibrated pace (the drill's, not the tests' faster one: its tightest
window is the spot notice's last 20 AWS seconds, for every drain of the storm at once); one
that was inconclusive skips, with the cause.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetdrain.drill import pace
from fleetdrain.drill.coordinator import RateStats, RestRateLimit
from fleetdrain.drill.metrics import FIGURES, judge
from fleetdrain.drill.report.model import ScenarioReport
from fleetdrain.drill.scenarios_storm import (
    MAX_PROCESSES,
    NAME,
    SPECS,
    STORM,
    StormSize,
    drain_figures,
    storm_figures,
    storm_size,
)
from fleetdrain.drill.world.fleet import BACKGROUND_TAG, is_background
from fleetdrain.drill.world.org_traffic import OrgTraffic
from fleetdrain.drill.world.processes import pid_namespaces_available

# ------------------------------------------------------------------ sizing and figures


def test_the_storm_is_sized_to_the_machine() -> None:
    two = storm_size(2)
    assert (two.instances, two.storm, two.busy, two.idle, two.survivors) == (8, 7, 3, 4, 1)
    assert (two.background, two.listing_pages) == (992, 10)
    big = storm_size(64)
    assert (big.instances, big.storm, big.busy, big.survivors) == (MAX_PROCESSES, 18, 9, 2)
    one = storm_size(1)
    assert (one.instances, one.storm, one.busy, one.survivors) == (4, 3, 1, 1)
    assert storm_size(0).instances == 4  # a machine that says 0 cores counts as 1
    tiny = storm_size(1, org_agents=2)
    assert tiny.background == 0 and tiny.listing_pages == 1
    # The fleet is built for this machine's storm.
    assert SPECS[NAME].instances == STORM.instances == storm_size(pace.cores()).instances
    assert SPECS[NAME].kind == "after"


def record(**kw: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "phase": "done",
        "forced_at": None,
        "stopped_agents": [],
        "stopped_tasks": [],
        "fallback": False,
    }
    return SimpleNamespace(**{**base, **kw})


def test_the_figures_count_forced_stops_fallbacks_and_the_org_s_requests() -> None:
    size = StormSize(storm=4, busy=2, survivors=1)
    drains = [
        drain_figures("i-1", record(forced_at=100.0, stopped_agents=["a1"])),
        drain_figures("i-2", record(forced_at=100.0, stopped_tasks=["t2"], fallback=True)),
        drain_figures("i-3", record()),
        drain_figures("i-4", None),  # never started
    ]
    stats = RateStats(
        200, 60.0, requests=230, limited=12, peak=205, peak_allowed=200, window_peak=200
    )
    traffic = OrgTraffic(RestRateLimit(None), 0.0)
    traffic.sent, traffic.refused = 190, 10
    f = storm_figures(size, stats, drains, [1000.0, 1000.0, 1000.0, 1000.0], traffic)
    assert (f.forced, f.coordinator_stops, f.stop_tasks, f.fallback_drains) == (2, 1, 1, 1)
    assert (f.done, f.notice_spread, f.controller_requests, f.controller_429s) == (3, 0.0, 40, 2)
    assert f.per_instance() == 10.0
    assert not drains[3].started and not drains[3].done
    fields = f.fields()
    assert fields["peak_per_minute"] == 200 and fields["limit"] == 200
    assert fields["rate_limited"] == 12 and fields["stop_task_fallbacks"] == 1
    note = f.note()
    assert note.startswith(FIGURES)
    for text in (
        "4 instances (2 busy) interrupted within 0 s in a 1000-agent org (10 pages",
        "230 REST requests, the org's other users' 190 included",
        "peak 200 in a minute window (limit 200; 205 in any 60 s), 429s 12 (the controller's 2)",
        "1 forced stops through the coordinator, 1 fallbacks to ECS StopTask (1 drains)",
        "drains done 3/4",
    ):
        assert text in note
    # Without other traffic or a limit.
    quiet = storm_figures(size, RateStats(None, 60.0, 9, 0, 5, 5, 5), drains[:1], [5.0, 7.0])
    assert quiet.notice_spread == 2.0 and quiet.others == 0 and "no limit" in quiet.note()


def test_a_figures_note_never_fails_a_scenario_and_other_notes_still_do() -> None:
    p = pace.calibrate(scenarios=1, machine=pace.Machine(cores=2, load=0.5, share=1.0))
    figures = f"{FIGURES}35 REST requests"
    ok = ScenarioReport(name=NAME, description="d", passed=3, notes=[figures])
    judge(ok, pace=p, window=1.0, expected=3)
    assert ok.outcome == "passed" and ok.notes == [figures]
    bad = ScenarioReport(
        name=NAME, description="d", passed=3, notes=[figures, "the drain of i-1 did not end"]
    )
    judge(bad, pace=p, window=1.0, expected=3)
    assert bad.outcome == "failed" and bad.cause == "the drain of i-1 did not end"
    lost = ScenarioReport(name=NAME, description="d", passed=2, lost=1, notes=[figures])
    judge(lost, pace=p, window=1.0, expected=3)
    assert lost.outcome == "failed" and lost.cause == "1 build(s) lost"


def test_background_agents_are_told_by_their_tag() -> None:
    assert is_background(SimpleNamespace(meta_data=["ecs:task-arn=x", BACKGROUND_TAG]))
    assert not is_background(SimpleNamespace(meta_data=["ecs:task-arn=x"]))


class FixedClock:
    def __init__(self) -> None:
        self.now = 6000.0

    def __call__(self) -> float:
        return self.now


def test_the_org_s_other_users_spend_the_limit_and_stop_with_the_block() -> None:
    limit = RestRateLimit(5, 60.0, FixedClock())  # one window for the whole test
    with OrgTraffic(limit, per_minute=6000, wall_per_minute=6.0) as traffic:  # every 1 ms
        deadline = time.monotonic() + 10
        while traffic.sent < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    sent = traffic.sent
    assert traffic._thread is not None and not traffic._thread.is_alive()
    time.sleep(0.05)
    assert traffic.sent == sent >= 10, "nothing sends after the block"
    assert traffic.refused == sent - 5
    stats = limit.stats()
    assert (stats.requests, stats.limited) == (sent, sent - 5)
    with OrgTraffic(limit, per_minute=0) as idle:
        assert idle.interval is None
    assert idle._thread is None and idle.sent == 0
    with pytest.raises(ValueError):
        OrgTraffic(limit, per_minute=-1)


def test_the_runner_knows_the_storm_by_name() -> None:
    """It runs by name, outside the default set (its table entry is the runner's)."""
    from fleetdrain.drill.runner import ALL_SCENARIOS, SCENARIOS

    assert NAME not in SCENARIOS
    assert ALL_SCENARIOS[NAME] == (SPECS[NAME].kind, SPECS[NAME].description)


# ------------------------------------------------------------------ the scenario


@pytest.mark.slow
@pytest.mark.pid1
@pytest.mark.timeout(600)
def test_a_spot_storm_loses_nothing_and_gives_its_figures(tmp_path: Path) -> None:
    from fleetdrain.drill.runner import run_local_drill

    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    report = run_local_drill([NAME], workdir=tmp_path)
    (s,) = report.scenarios
    assert s.lost == 0, (s.cause, s.notes)  # whatever the verdict, an inconclusive one included
    if s.inconclusive:
        pytest.skip(f"{NAME} was inconclusive: {s.cause}")
    assert s.outcome == "passed", (s.cause, s.notes)
    assert (s.jobs_run, s.passed, s.retried) == (2 * STORM.busy, STORM.busy, STORM.busy)
    (figures,) = [n for n in s.notes if n.startswith(FIGURES)]
    assert f"drains done {STORM.storm}/{STORM.storm}" in figures
    (event,) = [e for e in s.timeline if e.what == "storm figures"]
    detail = {k: v for k, v in event.detail.items() if isinstance(v, int | float)}
    for key in ("requests", "peak_per_minute", "limit", "rate_limited", "coordinator_stops"):
        assert key in detail
    assert detail["instances"] == STORM.storm and detail["limit"] == 200
    assert detail["drains_done"] == STORM.storm and detail["notice_spread"] == 0
    assert detail["listing_pages"] == 10
    # A busy drain is forced at the notice + 100 s (through the coordinator, or where its
    # budget says so by ECS), unless the agent's own deadline cancelled its build first.
    assert 0 < detail["forced"] <= STORM.busy
    assert detail["coordinator_stops"] + detail["stop_task_fallbacks"] >= detail["forced"]
    assert detail["requests"] > 0
    # Every first attempt reported agent_stop before its instance went, then passed elsewhere.
    firsts = [e.what for e in s.timeline if e.kind == "job" and e.subject.endswith(" #1")]
    assert sum(w.startswith("finished") and w.endswith("(agent_stop)") for w in firsts) == (
        STORM.busy
    )
    # The organization's padding is not on the timeline.
    assert not [e for e in s.timeline if e.subject.startswith("elsewhere-")]
    assert s.max_heartbeat_gap_intervals is not None and s.max_heartbeat_gap_intervals < 5


@pytest.mark.slow
@pytest.mark.pid1
@pytest.mark.timeout(600)
def test_the_storm_with_graphql_lookups_loses_nothing_and_lists_nothing(tmp_path: Path) -> None:
    """The same storm, the stack deployed with CoordinatorGraphqlUrl (template parameter ->
    the functions' environment -> the handlers' wiring): every drain finds its agents with
    GraphQL lookups, and nothing is lost."""
    from fleetdrain.drill.runner import run_local_drill
    from fleetdrain.drill.scenarios_storm import NAME_GRAPHQL

    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    report = run_local_drill([NAME_GRAPHQL], workdir=tmp_path)
    (s,) = report.scenarios
    assert s.lost == 0, (s.cause, s.notes)
    if s.inconclusive:
        pytest.skip(f"{NAME_GRAPHQL} was inconclusive: {s.cause}")
    assert s.outcome == "passed", (s.cause, s.notes)
    (event,) = [e for e in s.timeline if e.what == "graphql figures"]
    assert event.detail["lookups"] >= STORM.storm, "a lookup a drain at least"
    assert event.detail["rate_limited"] == 0
    (storm,) = [e for e in s.timeline if e.what == "storm figures"]
    assert storm.detail["drains_done"] == STORM.storm
    assert (
        storm.detail["coordinator_stops"] + storm.detail["stop_task_fallbacks"]
        >= (storm.detail["forced"])
    )
