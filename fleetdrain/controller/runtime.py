"""What the three handlers share: Powertools Logger and Metrics, the controller built once per
execution environment from the environment, and the three ways events come in: a single
EventBridge event, an SQS batch with partial failures, or an SNS notification (a function
subscribed to a topic: ``Records[].Sns``, invoked asynchronously like EventBridge).

Failure policy (the same in all three functions):

- A malformed or unknown event, or one that is not for this function: logged at ERROR with the
  reason, counted (``EventsRejected``, which has an alarm) and dropped. Retrying cannot fix it,
  so it is never retried: no retry storm from a poison message. A ``Records`` event that is
  neither SQS nor SNS is rejected as a whole, with what it is.
- A :class:`~fleetdrain.controller.drain.errors.Retryable` failure (throttling after the adaptive
  retries, 5xx, a write race that kept losing): the SQS record is reported as a batch item failure
  (SQS redelivers it after the visibility timeout, and after ``maxReceiveCount`` moves it to
  the DLQ, which has an alarm); a direct EventBridge invocation raises, so Lambda's async
  retries run and then the function's dead-letter queue (the same DLQ) gets the event.
- Anything else (a bug): the same as retryable, so it ends in the DLQ and is seen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    from fleetdrain.controller.drain.ports import CoordinatorPort

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.core import EVENTS_REJECTED, DrainController, Result
from fleetdrain.controller.drain.events import MalformedEvent, parse_event, parse_message
from fleetdrain.controller.drain.signals import Ignored, Several, Signal

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "fleetdrain"))
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "fleetdrain"))
# The core logs through the stdlib logger "fleetdrain.drain": give it the same JSON output.
copy_config_to_registered_loggers(source_logger=logger, include={"fleetdrain.drain"})


class PowertoolsMetrics:
    """The core's :class:`~fleetdrain.controller.drain.ports.MetricsPort` as EMF metrics (flushed
    by ``@metrics.log_metrics``)."""

    def count(self, name: str, value: float = 1.0) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    def seconds(self, name: str, value: float) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Seconds, value=value)


_controller: DrainController | None = None


def set_controller(controller: DrainController | None) -> None:
    """Use this controller (tests and the drill); None: build from the environment again."""
    global _controller
    _controller = controller


def controller() -> DrainController:
    """The controller of this execution environment, built on first use."""
    global _controller
    if _controller is None:
        _controller = build_controller(Settings.from_env())
    return _controller


def build_controller(
    settings: Settings,
    session: Any = None,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> DrainController:
    """Real AWS clients (adaptive retries, short timeouts) behind the core's ports: the one place
    the adapters are wired into :class:`~fleetdrain.controller.drain.core.DrainController`.

    ``clock`` (epoch seconds) is what every drain time is measured on, the coordinator's
    rate-limit budget included, and ``sleep`` how its waits pass: the wall clock in Lambda; the
    drill passes its compressed clock (and a sleep on it), so the controller it runs is this
    one.
    """
    import boto3
    from botocore.config import Config

    from fleetdrain.controller.drain.coordinator import CoordinatorClient, SecretToken
    from fleetdrain.controller.drain.ecs_fleet import EcsFleet
    from fleetdrain.controller.drain.lifecycle import LifecycleActions
    from fleetdrain.controller.drain.shared_listing import SharedAgentListing
    from fleetdrain.controller.drain.state import DynamoDrainStore, DynamoListingCache
    from fleetdrain.controller.drain.ticks import SqsTicks

    config = Config(
        retries={"mode": "adaptive", "max_attempts": 6},
        connect_timeout=3,
        read_timeout=10,
    )
    session = session or boto3.session.Session()
    ddb = session.client("dynamodb", config=config)
    coordinator: CoordinatorPort | None = None
    if settings.coordinator_url and settings.coordinator_org:
        token = SecretToken(
            session.client("secretsmanager", config=config),
            settings.coordinator_token_secret_arn,
            clock=time.monotonic,
        )
        rest = CoordinatorClient(
            settings.coordinator_url,
            settings.coordinator_org,
            token.get,
            token.invalidate,
            clock=clock,
            sleep=sleep,
        )
        if settings.coordinator_graphql_url:
            from fleetdrain.controller.drain.graphql_agents import (
                GraphqlAgentLookup,
                GraphqlCoordinator,
            )

            # An instance's agents by meta-data: one GraphQL request a look, off REST's budget.
            coordinator = GraphqlCoordinator(
                rest,
                GraphqlAgentLookup(
                    settings.coordinator_graphql_url,
                    settings.coordinator_org,
                    token.get,
                    token.invalidate,
                    clock=clock,
                    sleep=sleep,
                ),
            )
        else:
            # Every drain shares one listing of the organization (its REST budget: see
            # shared_listing), kept in the drain table.
            coordinator = SharedAgentListing(
                rest,
                DynamoListingCache(
                    ddb, settings.table_name, settings.cluster, clock, settings.record_ttl
                ),
                settings.cluster,
                clock,
                sleep=sleep,
            )
    return DrainController(
        settings,
        DynamoDrainStore(
            ddb,
            settings.table_name,
            clock,
            settings.record_ttl,
        ),
        EcsFleet(session.client("ecs", config=config), settings.cluster, clock),
        coordinator,
        LifecycleActions(session.client("autoscaling", config=config)),
        SqsTicks(session.client("sqs", config=config), settings.queue_url),
        PowertoolsMetrics(),
        clock,
        sleep=sleep,
    )


def _reject(reason: str, where: str) -> dict[str, Any]:
    logger.error("event rejected and dropped", extra={"reason": reason, "where": where})
    metrics.add_metric(name=EVENTS_REJECTED, unit=MetricUnit.Count, value=1)
    return {"status": "rejected", "reason": reason}


def _leaves(
    signal: Signal | Several, accept: tuple[type, ...], where: str
) -> list[Signal | dict[str, Any]]:
    """What handling ``signal`` comes to: a signal for the controller, or an answer already
    (rejected, ignored), for it and for each instance of an event about several."""
    if isinstance(signal, Several):
        # One event about several instances: each on its own (a retry repeats them all; the
        # ones done already are duplicates by the event's id).
        return [leaf for one in signal.signals for leaf in _leaves(one, accept, where)]
    if not isinstance(signal, (Ignored, *accept)):
        return [_reject(f"{type(signal).__name__} is not for the {where} function", where)]
    if isinstance(signal, Ignored):
        logger.info("event ignored", extra={"reason": signal.reason})
        return [{"status": "ignored", "detail": signal.reason}]
    return [signal]


def _answer(result: Result) -> dict[str, Any]:
    extra = {"action": result.action, "phase": result.phase, "detail": result.detail}
    if result.instance_id:
        extra["instance_id"] = result.instance_id
    if result.drain_id:
        extra["drain_id"] = result.drain_id
    logger.info("event handled", extra=extra)
    return {
        "status": result.action,
        "instance_id": result.instance_id,
        "drain_id": result.drain_id,
        "phase": result.phase,
        "detail": result.detail,
    }


def _run_all(
    units: list[Signal | Several], accept: tuple[type, ...], where: str
) -> list[dict[str, Any] | Exception]:
    """Handle what one invocation brought (each unit: one event or message), the new drains
    among them together (``DrainController.handle_batch``: their first steps share calls):
    each unit's answer, or what it raised (a unit fails if any of its instances did)."""
    leaves = [_leaves(unit, accept, where) for unit in units]
    signals = [leaf for unit in leaves for leaf in unit if not isinstance(leaf, dict)]
    results = iter(controller().handle_batch(signals) if signals else [])
    out: list[dict[str, Any] | Exception] = []
    for unit, parts in zip(units, leaves, strict=True):
        answers: list[dict[str, Any]] = []
        failed: Exception | None = None
        for leaf in parts:
            if isinstance(leaf, dict):
                answers.append(leaf)
                continue
            result = next(results)
            if isinstance(result, Exception):
                failed = failed or result
            else:
                answers.append(_answer(result))
        if failed is not None:
            out.append(failed)
        elif isinstance(unit, Several):
            statuses = sorted({str(r["status"]) for r in answers})
            out.append({"status": ",".join(statuses), "results": answers})
        else:
            out.append(answers[0])
    return out


def _run(signal: Signal | Several, accept: tuple[type, ...], where: str) -> dict[str, Any]:
    """One event's answer; what it raised is raised (Lambda's retries, then the DLQ)."""
    (answer,) = _run_all([signal], accept, where)
    if isinstance(answer, Exception):
        raise answer
    return answer


def _records_kind(records: list[Any]) -> str:
    """``sqs``, ``sns``, or what the records are instead (for the rejection)."""
    if records and all(
        isinstance(r, dict) and r.get("eventSource") == "aws:sqs" and "messageId" in r
        for r in records
    ):
        return "sqs"
    if records and all(
        isinstance(r, dict) and r.get("EventSource") == "aws:sns" and isinstance(r.get("Sns"), dict)
        for r in records
    ):
        return "sns"
    sources = sorted(
        {
            str(r.get("eventSource") or r.get("EventSource") or "no eventSource")
            if isinstance(r, dict)
            else type(r).__name__
            for r in records
        }
    )
    return ", ".join(sources) or "no records"


def handle(event: Any, accept: tuple[type, ...], where: str) -> dict[str, Any]:
    """One invocation: an SQS batch (partial failures), an SNS notification, or a single
    EventBridge event."""
    if isinstance(event, dict) and isinstance(event.get("Records"), list):
        kind = _records_kind(event["Records"])
        if kind == "sqs":
            return dict(handle_sqs_batch(event, accept, where))
        if kind == "sns":
            return handle_sns(event, accept, where)
        return _reject(
            f"Records of {kind}: neither SQS messages (eventSource aws:sqs, messageId) nor "
            "SNS notifications (EventSource aws:sns, Sns)",
            where,
        )
    try:
        signal = parse_event(event)
    except MalformedEvent as exc:
        return _reject(str(exc), where)
    return _run(signal, accept, where)


def handle_sqs_batch(
    event: dict[str, Any], accept: tuple[type, ...], where: str
) -> PartialItemFailureResponse:
    # Imported on the first batch, not at cold start: the EventBridge-only functions never
    # need it (about 0.1 s of import).
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType

    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    # The whole batch is handled first (the new drains in it share their calls); the processor
    # then reports each message as its part came out.
    answers: dict[str, dict[str, Any] | Exception] = {}
    units: list[Signal | Several] = []
    ids: list[str] = []
    for raw in event["Records"]:
        message_id = str(raw.get("messageId", ""))
        try:
            units.append(parse_message(str(raw.get("body", ""))))
            ids.append(message_id)
        except MalformedEvent as exc:
            answers[message_id] = _reject(str(exc), f"{where} (SQS message {message_id})")
    answers.update(zip(ids, _run_all(units, accept, where), strict=True))

    def record_handler(record: SQSRecord) -> dict[str, Any]:
        answer = answers[record.message_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    with processor(records=event["Records"], handler=record_handler):
        processor.process()
    for info in processor.exceptions:
        logger.warning(
            "record failed; SQS will redeliver it (then the DLQ)",
            extra={"error": f"{info[0].__name__ if info[0] else ''}: {info[1]}"},
        )
    return processor.response()


def handle_sns(event: dict[str, Any], accept: tuple[type, ...], where: str) -> dict[str, Any]:
    """A function subscribed to an SNS topic (the group's notification target): each record's
    ``Sns.Message`` is what an SQS subscription would carry. Invoked asynchronously, so a
    retryable failure raises (Lambda's retries, then the DLQ), as for EventBridge."""
    answers: list[dict[str, Any] | None] = []
    units: list[Signal | Several] = []
    for record in event["Records"]:
        sns = record["Sns"]
        message = sns.get("Message")
        if not isinstance(message, str):
            answers.append(_reject("SNS record without a Message string", where))
            continue
        try:
            units.append(parse_message(message))
            answers.append(None)
        except MalformedEvent as exc:
            answers.append(_reject(str(exc), f"{where} (SNS message {sns.get('MessageId')})"))
    handled = iter(_run_all(units, accept, where))
    results: list[dict[str, Any]] = []
    for answer in answers:
        got = answer if answer is not None else next(handled)
        if isinstance(got, Exception):
            raise got
        results.append(got)
    if len(results) == 1:
        return results[0]
    return {"status": ",".join(sorted({str(r["status"]) for r in results})), "results": results}


Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
