"""Checks a built Lambda artifact (``sam build`` output or ``make -C fleetdrain/controller
artifact``).

Not part of the artifact (the Makefile copies only the handlers and ``drain/``). Two checks:

``layout DIR [DIR...]``: each DIR (one function's artifact) holds the handlers and the drain
core, pydantic-core as its CPython 3.12 wheel for the wanted architecture (``--arch``), and,
with ``--require-pyc``, a ``__pycache__/*.cpython-312.pyc`` beside every source of ours, in
unchecked-hash mode (the source is never stat'ed on a read-only Lambda file system).

``imports DIR [--runtime DIR] [--events DIR]``: run by a CPython 3.12 on an artifact built for
this machine's architecture (``PLATFORM=manylinux2014_x86_64`` here): imports the three
handlers the way Lambda does (the artifact first on ``sys.path``, then the runtime's own
boto3), and fails if any module of the artifact was compiled from source rather than loaded
from its ``.pyc`` (an audit hook sees every ``compile``). Prints the import time. With
``--events`` (``tests/events``), each handler is then invoked with sample events that need no
AWS call (a test notification through SQS in an SNS envelope, a task that is not STOPPED, a
launching lifecycle action, an unknown event) and must answer as the tests expect: the
artifact's code really runs on 3.12, lazily imported modules included.

Exit status 0 when everything holds; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

HANDLERS = ("lifecycle_hook", "spot_interruption", "drain_monitor")
CACHE_TAG = "cpython-312"
#: PEP 552: flags word 0b01 = hash-based, check_source off ("unchecked-hash").
UNCHECKED_HASH = 0b01


def check_layout(root: Path, arch: str, require_pyc: bool) -> list[str]:
    """Problems with one function's artifact directory (empty: it is right)."""
    problems: list[str] = []
    pkg = root / "fleetdrain" / "controller"
    for name in ("__init__.py", "runtime.py", *(f"{h}.py" for h in HANDLERS)):
        if not (pkg / name).is_file():
            problems.append(f"{root}: fleetdrain/controller/{name} missing")
    if not (pkg / "drain" / "core.py").is_file():
        problems.append(f"{root}: fleetdrain/controller/drain/core.py missing")
    wheel = f"_pydantic_core.{CACHE_TAG}-{arch}-linux-gnu.so"
    if not (root / "pydantic_core" / wheel).is_file():
        found = sorted(p.name for p in (root / "pydantic_core").glob("_pydantic_core*.so"))
        problems.append(f"{root}: pydantic_core/{wheel} missing (found: {found or 'none'})")
    for name in ("aws_lambda_powertools", "httpx", "pydantic"):
        if not (root / name / "__init__.py").is_file():
            problems.append(f"{root}: {name} missing")
    if require_pyc:
        for source in sorted(pkg.rglob("*.py")):
            pyc = source.parent / "__pycache__" / f"{source.stem}.{CACHE_TAG}.pyc"
            if not pyc.is_file():
                problems.append(f"{root}: {pyc.relative_to(root)} missing")
                continue
            flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
            if flags != UNCHECKED_HASH:
                problems.append(f"{root}: {pyc.relative_to(root)} is not unchecked-hash")
        if not any((root / "pydantic" / "__pycache__").glob(f"*.{CACHE_TAG}.pyc")):
            problems.append(f"{root}: the dependencies have no .pyc")
    return problems


class _Context:
    """The Lambda context fields Powertools reads."""

    function_name = "fleetdrain-check"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:fleetdrain-check"
    aws_request_id = "check-artifact"


def _sqs(body: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "r",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "0",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:lifecycle",
                "awsRegion": "us-east-1",
            }
        ]
    }


def invoke_samples(events: Path) -> list[str]:
    """Invoke each handler with samples that need no AWS call; problems if any answer is off."""

    def sample(name: str) -> dict[str, Any]:
        return dict(json.loads((events / name).read_text()))

    test_note = (events / "asg-test-notification.sqs-body.json").read_text()
    sns = json.dumps({"Type": "Notification", "MessageId": "m", "Message": test_note})
    running = sample("ecs-task-state-change.stopped.json")
    running["detail"]["lastStatus"] = "RUNNING"
    launching = sample("asg-terminate-lifecycle-action.eventbridge.json")
    launching["detail"]["LifecycleTransition"] = "autoscaling:EC2_INSTANCE_LAUNCHING"
    unknown = {**sample("ec2-spot-interruption-warning.json"), "detail-type": "Nothing We Know"}
    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("lifecycle_hook", _sqs(sns), {"batchItemFailures": []}),
        ("lifecycle_hook", launching, "ignored"),
        ("drain_monitor", running, "ignored"),
        ("spot_interruption", unknown, "rejected"),
    ]
    problems: list[str] = []
    for handler, event, expected in cases:
        module = sys.modules[f"fleetdrain.controller.{handler}"]
        out = io.StringIO()  # the EMF lines and any log output: not ours to print
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                answer = module.handler(event, _Context())
        except Exception as exc:
            problems.append(f"{handler}: raised {type(exc).__name__}: {exc}")
            continue
        got = answer if isinstance(expected, dict) else answer.get("status")
        if got != expected:
            problems.append(f"{handler}: expected {expected!r}, got {answer!r}")
    return problems


def check_imports(
    root: Path, runtime: Path | None, events: Path | None = None
) -> tuple[list[str], dict[str, object]]:
    """Import the handlers from ``root`` in this (fresh) interpreter; see the module doc."""
    if sys.version_info[:2] != (3, 12):
        return [f"imports must run on CPython 3.12, this is {sys.version.split()[0]}"], {}
    # The handlers log JSON to stdout; only the rejection of the unknown sample would show.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "CRITICAL")
    artifact = str(root.resolve())
    compiled: list[str] = []
    loaded_pyc = 0

    def audit(event: str, args: tuple[object, ...]) -> None:
        nonlocal loaded_pyc
        if event == "compile" and len(args) > 1 and str(args[1]).startswith(artifact):
            compiled.append(str(args[1]))
        elif event == "marshal.loads":
            loaded_pyc += 1

    # Lambda's order: the function's code first, then the runtime's (boto3 lives there).
    sys.path[:] = [artifact, *([str(runtime.resolve())] if runtime else []), *sys.path[1:]]
    sys.dont_write_bytecode = True
    sys.addaudithook(audit)
    start = time.perf_counter()
    problems: list[str] = []
    for handler in HANDLERS:
        try:
            module = __import__(f"fleetdrain.controller.{handler}", fromlist=["handler"])
        except Exception as exc:  # any import failure is the finding
            problems.append(f"import fleetdrain.controller.{handler}: {type(exc).__name__}: {exc}")
            continue
        if not callable(getattr(module, "handler", None)):
            problems.append(f"fleetdrain.controller.{handler} has no handler")
        if not str(getattr(module, "__file__", "")).startswith(artifact):
            problems.append(
                f"fleetdrain.controller.{handler} came from {module.__file__}, not the artifact"
            )
    seconds = time.perf_counter() - start
    invoked = 0
    if events is not None and not problems:
        problems.extend(invoke_samples(events))
        invoked = 4
    if compiled:
        problems.append(f"{len(compiled)} module(s) compiled from source, e.g. {compiled[0]}")
    return problems, {
        "import_seconds": round(seconds, 4),
        "pyc_loads": loaded_pyc,
        "compiled_from_source": len(compiled),
        "samples_invoked": invoked,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layout = sub.add_parser("layout")
    layout.add_argument("dirs", nargs="+", type=Path)
    layout.add_argument("--arch", default="aarch64")
    layout.add_argument("--require-pyc", action="store_true")
    imports = sub.add_parser("imports")
    imports.add_argument("dir", type=Path)
    imports.add_argument("--runtime", type=Path)
    imports.add_argument("--events", type=Path, help="invoke the handlers with these samples")
    args = parser.parse_args(argv)
    if args.command == "layout":
        problems = [p for d in args.dirs for p in check_layout(d, args.arch, args.require_pyc)]
        facts: dict[str, object] = {"checked": [str(d) for d in args.dirs]}
    else:
        problems, facts = check_imports(args.dir, args.runtime, args.events)
    for problem in problems:
        print(f"artifact check: {problem}", file=sys.stderr)
    print(json.dumps({"ok": not problems, **facts}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
