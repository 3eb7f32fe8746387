"""The core is pure, and the drain record keeps its stored form.

Purity: the core (``core``, ``merge``, ``signals``, ``ports``, ``errors``, ``config``) imports the
standard library and itself only. Not botocore, boto3 or httpx (the adapters'), and not pydantic
either: the core takes signals (plain dataclasses), and ``events`` (the pydantic parsing of the
wire formats) is an adapter the handlers use, so the core does not import it.

Stored form: ``DrainRecord`` became a dataclass (it was a pydantic model); the DynamoDB adapter
still writes and reads the JSON the model wrote, so records in a live table stay readable.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.state import record_from_doc, record_from_item, record_to_doc

DRAIN = Path(__file__).resolve().parents[2] / "fleetdrain" / "controller" / "drain"
PURE = ("core", "batch", "look", "merge", "signals", "ports", "errors", "config")
FORBIDDEN = ("botocore", "boto3", "httpx", "pydantic", "pydantic_core", "aws_lambda_powertools")
ADAPTERS = ("events", "state", "ecs_fleet", "coordinator", "lifecycle", "ticks", "aws_errors")


def test_importing_the_core_loads_no_aws_http_or_pydantic_module() -> None:
    # A fresh interpreter: this one has imported everything already.
    code = "\n".join(
        [
            "import json, sys",
            *(f"import fleetdrain.controller.drain.{name}" for name in PURE),
            "print(json.dumps(sorted(sys.modules)))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    heavy = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert heavy == [], heavy
    ours = [f"fleetdrain.controller.drain.{name}" for name in ADAPTERS]
    assert [m for m in ours if m in loaded] == []


@pytest.mark.parametrize("name", PURE)
def test_a_pure_module_imports_only_the_standard_library_and_the_core(name: str) -> None:
    # Also the imports inside functions, which a fresh import does not run.
    tree = ast.parse((DRAIN / f"{name}.py").read_text())
    allowed = {f"fleetdrain.controller.drain.{pure}" for pure in PURE}
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in (*sys.stdlib_module_names, "__future__"):
                continue
            if module not in allowed:
                wrong.append(module)
    assert wrong == [], wrong


# What the pydantic model wrote (``DrainRecord.model_dump_json()`` before it became a dataclass).
STORED = (
    '{"instance_id":"i-1","drain_id":"d1","cluster":"ci","version":0,"phase":"soft",'
    '"reasons":["scale_in"],"started_at":1770000000.0,"force_at":1770003600.0,'
    '"spot_deadline":null,"asg_name":null,"hook_name":null,"lifecycle_token":null,'
    '"lifecycle_state":"none","last_heartbeat_at":null,"container_instance_arn":null,'
    '"agent_ids":{"arn:t":"a1"},"listing_pages":0,"paused_agents":["a1"],"stopped_agents":[],'
    '"stopped_tasks":[],"draining_at":null,"forced_at":null,"fallback":false,'
    '"coordinator_down_at":null,"jobs_force_cancelled":0,"last_task_stopped_at":null,'
    '"completed_at":null,"outcome":null,"outcome_reason":null,"seen_events":["e1"],'
    '"tick_id":null,"tick_due":null,"steps":0,"lease_id":"L","lease_until":1.5}'
)


#: What issue 11 added (episodes, tokens, scheduled changes): after every older field, so the
#: old form is a prefix of the new and each controller reads the other's records.
ADDED = (
    ',"episode":1,"lifecycle_verified":false,"token_sent_at":null,"other_tokens":[],'
    '"dead_tokens":[],"maintenance_at":null,"history":[],'
    # issue 12
    '"looked_tasks":[],"looked_at":null,"looked_daemons":[]}'
)


def test_the_record_is_stored_as_the_pydantic_model_stored_it() -> None:
    record = DrainRecord(
        instance_id="i-1",
        drain_id="d1",
        cluster="ci",
        started_at=1770000000.0,
        reasons=["scale_in"],
        force_at=1770003600.0,
        agent_ids={"arn:t": "a1"},
        paused_agents=["a1"],
        seen_events=["e1"],
        lease_id="L",
        lease_until=1.5,
    )
    assert record_to_doc(record) == STORED[:-1] + ADDED
    assert record_from_doc(STORED) == record, "an older controller's record reads unchanged"
    assert record_from_doc(STORED[:-1] + ADDED) == record


def test_reading_a_record_coerces_ignores_unknown_fields_and_takes_the_item_version() -> None:
    doc = json.dumps(
        {"instance_id": "i-1", "drain_id": "d", "cluster": "ci", "started_at": 5, "new": 1}
    )
    record = record_from_item({"doc": {"S": doc}, "version": {"N": "7"}})
    assert record == DrainRecord(
        instance_id="i-1", drain_id="d", cluster="ci", started_at=5.0, version=7
    )
    assert isinstance(record.started_at, float)


@pytest.mark.parametrize(
    "change",
    [{"phase": "paused"}, {"started_at": "soon"}, {"reasons": "spot"}, {"drain_id": None}],
)
def test_a_record_that_is_not_one_is_refused(change: dict[str, object]) -> None:
    doc = json.loads(STORED) | change
    with pytest.raises(ValidationError):
        record_from_doc(json.dumps(doc))
