"""The drill's AWS side: template.yaml deployed into moto, and Lambda's way of calling handlers.

What ``sam deploy`` would do, done in-process:

1. :func:`expand_template`: ``samtranslator`` (what SAM CLI uses) expands ``template.yaml`` to
   plain CloudFormation, after the local ``CodeUri`` is replaced with an ``s3://`` URI as
   ``sam package`` does.
2. :func:`deploy_stack`: the code artifact is uploaded to a moto bucket and moto's
   ``create_stack`` creates the functions, the queues and their event source mappings, the
   table, the EventBridge rules with the template's own patterns, roles and permissions.
   moto's CloudFormation keeps an ``AWS::NoValue`` that sits in a list (CloudFormation drops
   it): :func:`drop_no_values` resolves such ``Fn::If`` items first, a gap filler and nothing
   more. What was created is read back from moto (:class:`Deployment`), not from the template.
3. :class:`EventRouter`: each event is matched against the deployed rules' ``EventPattern``
   (:func:`~fleetdrain.drill.aws.rules.matches`, moto's own EventBridge matcher). A rule whose
   target is a function invokes it in-process, the way Lambda would: its ``Handler`` string
   resolved by import, a Lambda context, asynchronous retries (``MaximumRetryAttempts``) then
   the function's dead-letter queue. A rule whose target is one of the stack's queues (the
   lifecycle and spot notices) sends the event there, as EventBridge's SQS target does (the
   message body is the event). The SQS-fed functions get SQS batches from their queues
   (``BatchSize``), and with ``ReportBatchItemFailures`` only the failed records stay on the
   queue.

moto does not run Lambda code without Docker, it does not deliver to Lambda targets, and it
does not poll a queue for an event source mapping; that is why the router exists. One thread
(:meth:`EventRouter.run`) plays the Lambda service. The template is read through
:mod:`fleetdrain.drill.aws.template`, its rules through :mod:`fleetdrain.drill.aws.rules`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import queue
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetdrain.drill.aws.rules import EventRule, event_rules, matches
from fleetdrain.drill.aws.template import (
    ACCOUNT,
    REGION,
    TEMPLATE,
    conditions,
    load_template,
)

log = logging.getLogger("fleetdrain.drill.world")

ARTIFACT_BUCKET = "fleetdrain-artifacts"
ARTIFACT_KEY = "controller.zip"

Event = dict[str, Any]
Handler = Callable[[dict[str, Any], Any], Any]


# ------------------------------------------------------------------------------ deploying


def expand_template(
    template: dict[str, Any], params: Mapping[str, str], code_uri: str
) -> dict[str, Any]:
    """The SAM template as plain CloudFormation, as ``sam package`` + the transform make it."""
    from samtranslator.translator.transform import transform

    class _NoManagedPolicies:
        # The template names no AWS managed policy by name, so there is nothing to look up.
        def load(self) -> dict[str, str]:
            return {}

    packaged = copy.deepcopy(template)
    # ``sam package`` rewrites every local CodeUri to the uploaded artifact's S3 URI.
    globals_fn = packaged.get("Globals", {}).get("Function", {})
    if "CodeUri" in globals_fn:
        globals_fn["CodeUri"] = code_uri
    for resource in packaged.get("Resources", {}).values():
        props = resource.get("Properties") or {}
        if resource.get("Type") == "AWS::Serverless::Function" and "CodeUri" in props:
            props["CodeUri"] = code_uri
    return dict(transform(packaged, dict(params), _NoManagedPolicies()))


_NO_VALUE = {"Ref": "AWS::NoValue"}


def drop_no_values(template: dict[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    """Resolve ``Fn::If`` list items that choose ``AWS::NoValue``, as CloudFormation does.

    moto's CloudFormation turns them into a ``None`` list item (and then fails on it);
    CloudFormation removes the item. Everything else is left for moto to resolve.
    """
    active = conditions(template, params)

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            out = []
            for item in node:
                if isinstance(item, dict) and set(item) == {"Fn::If"}:
                    name, yes, no = item["Fn::If"]
                    item = yes if active[name] else no
                    if item == _NO_VALUE:
                        continue
                out.append(walk(item))
            return out
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    result = dict(template)
    result["Resources"] = walk(template["Resources"])
    return result


def code_artifact() -> bytes:
    """The functions' code as ``sam build`` packs it: the ``fleetdrain.controller`` package in a
    zip.

    The dependencies are not in it: the drill runs the handlers in this process, with this
    environment's packages (moto only stores the artifact). The sources are this
    ``fleetdrain``'s own, wherever it is imported from (a checkout or site-packages).
    """
    import fleetdrain

    package = Path(fleetdrain.__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in [package / "__init__.py", *sorted((package / "controller").rglob("*.py"))]:
            zf.write(path, str(path.relative_to(package.parent)))
    return buf.getvalue()


@dataclass(frozen=True)
class DeployedFunction:
    """A function as Lambda knows it after the deploy."""

    logical_id: str
    name: str
    arn: str
    handler: str
    environment: dict[str, str]
    dead_letter_arn: str | None
    max_retry_attempts: int


@dataclass(frozen=True)
class DeployedRule:
    """An EventBridge rule as EventBridge knows it after the deploy."""

    name: str
    pattern: dict[str, Any]
    #: The stack's functions the rule invokes itself.
    target_arns: tuple[str, ...]
    #: The URLs of the stack's queues the rule sends the event to, each one that an event source
    #: mapping of the stack consumes (the function then gets it in an SQS batch).
    queue_urls: tuple[str, ...] = ()

    def matches(self, event: Event) -> bool:
        """Whether EventBridge would deliver ``event`` by this rule."""
        return matches(self.pattern, event)


@dataclass(frozen=True)
class QueueMapping:
    """An SQS event source mapping: the queue feeding a function."""

    queue_arn: str
    queue_url: str
    function_arn: str
    batch_size: int
    report_batch_item_failures: bool
    visibility_timeout: int
    #: ``MaximumBatchingWindowInSeconds`` as deployed (the router does not wait it out: it
    #: polls every ``poll_interval``, and what has arrived by then shares a batch).
    batching_window: int = 0


@dataclass(frozen=True)
class Deployment:
    """What the stack created, read back from moto."""

    stack_name: str
    outputs: dict[str, str]
    functions: dict[str, DeployedFunction]  # by ARN
    rules: list[DeployedRule]
    mappings: list[QueueMapping]
    resources: dict[str, tuple[str, str]]  # logical id -> (type, physical id)

    def function(self, logical_id: str) -> DeployedFunction:
        """The deployed function of this logical id."""
        for fn in self.functions.values():
            if fn.logical_id == logical_id:
                return fn
        raise KeyError(logical_id)


def deploy_stack(
    params: Mapping[str, str],
    *,
    stack_name: str = "fleetdrain",
    template_path: Path = TEMPLATE,
    region: str = REGION,
    session: Any = None,
) -> Deployment:
    """``sam deploy`` of ``template_path`` into the (moto) account: expand, upload, create."""
    # moto warns about every resource type it only records (alarms, log groups...).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _deploy(params, stack_name, template_path, region, session)


def _deploy(
    params: Mapping[str, str], stack_name: str, template_path: Path, region: str, session: Any
) -> Deployment:
    import boto3

    session = session or boto3.session.Session(region_name=region)
    s3 = session.client("s3")
    s3.create_bucket(Bucket=ARTIFACT_BUCKET)
    s3.put_object(Bucket=ARTIFACT_BUCKET, Key=ARTIFACT_KEY, Body=code_artifact())
    source = load_template(template_path)
    expanded = expand_template(source, params, f"s3://{ARTIFACT_BUCKET}/{ARTIFACT_KEY}")
    body = drop_no_values(expanded, params)
    cfn = session.client("cloudformation")
    moto_log = logging.getLogger("moto")
    level = moto_log.level
    moto_log.setLevel(logging.ERROR)  # "No Moto CloudFormation support for ..." per alarm
    try:
        _create(cfn, stack_name, body, params)
    finally:
        moto_log.setLevel(level)
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    if stack["StackStatus"] != "CREATE_COMPLETE":
        raise RuntimeError(f"stack {stack_name}: {stack['StackStatus']}")
    _ensure_rules(session, stack_name, body, params, region)
    _ensure_table_ttl(session, stack_name, body)
    deployment = read_deployment(session, stack_name, body)
    _leave_the_queues_to_the_router(deployment.mappings)
    return deployment


def _leave_the_queues_to_the_router(mappings: list[QueueMapping]) -> None:
    """Stop moto's own delivery to the stack's SQS event source mappings.

    On every SendMessage to such a queue moto receives the queue's visible messages (each
    receive counts towards the redrive policy's ``maxReceiveCount``), tries to run the function
    in Docker, fails without it, and makes them visible again: a few notices sent together
    before the router polls would be moved to the DLQ unread. The router is the Lambda service
    here (:meth:`EventRouter.poll_queues`); the mappings stay as deployed (listed, enabled).
    """
    from moto.sqs.models import sqs_backends

    for mapping in mappings:
        _, _, _, region, account, name = mapping.queue_arn.split(":", 5)
        queue = sqs_backends[account][region].queues.get(name)
        if queue is not None:
            queue.lambda_event_source_mappings.clear()


def _create(cfn: Any, stack_name: str, body: dict[str, Any], params: Mapping[str, str]) -> None:
    cfn.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(body),
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )


def _ensure_table_ttl(session: Any, stack_name: str, template: dict[str, Any]) -> None:
    """Apply each table's ``TimeToLiveSpecification`` (moto's create_stack ignores it)."""
    cfn = session.client("cloudformation")
    ddb = session.client("dynamodb")
    summaries = cfn.list_stack_resources(StackName=stack_name)["StackResourceSummaries"]
    physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for r in summaries}
    for logical_id, res in template["Resources"].items():
        spec = res.get("Properties", {}).get("TimeToLiveSpecification")
        if res["Type"] != "AWS::DynamoDB::Table" or not spec:
            continue
        table = physical[logical_id]
        current = ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            continue
        ddb.update_time_to_live(
            TableName=table,
            TimeToLiveSpecification={
                "AttributeName": spec["AttributeName"],
                "Enabled": bool(spec.get("Enabled", True)),
            },
        )


def _ensure_rules(
    session: Any, stack_name: str, template: dict[str, Any], params: Mapping[str, str], region: str
) -> None:
    """Create any template rule that moto's create_stack left out, exactly as written.

    moto 5.2 now and then skips one of two rules that target the same function or queue (the
    stack still reports CREATE_COMPLETE); CloudFormation would have created it. A target is
    the function itself, or the queue between the rule and its function
    (:attr:`EventRule.queue`). A rule is there when a rule of its pattern targets the very
    function or queue (another stack in the account can have rules of the same patterns).
    """
    cfn = session.client("cloudformation")
    events = session.client("events")
    summaries = cfn.list_stack_resources(StackName=stack_name)["StackResourceSummaries"]
    physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for r in summaries}
    existing: set[tuple[str, str]] = set()  # (pattern, target ARN)
    for r in events.get_paginator("list_rules").paginate().build_full_result()["Rules"]:
        if r.get("EventPattern"):
            key = json.dumps(json.loads(r["EventPattern"]), sort_keys=True)
            for t in events.list_targets_by_rule(Rule=r["Name"])["Targets"]:
                existing.add((key, t["Arn"]))
    # The expanded template's AWS::Events::Rule resources: one EventRule per target.
    wanted: dict[str, list[EventRule]] = {}
    for rule in event_rules(template, params, region=region):
        wanted.setdefault(rule.name, []).append(rule)
    lam = session.client("lambda")
    sqs = session.client("sqs")

    def target_arn(rule: EventRule) -> str:
        if rule.queue is not None:  # an SQS queue's physical id is its URL
            attrs = sqs.get_queue_attributes(
                QueueUrl=physical[rule.queue], AttributeNames=["QueueArn"]
            )
            return str(attrs["Attributes"]["QueueArn"])
        return str(
            lam.get_function(FunctionName=physical[rule.function])["Configuration"]["FunctionArn"]
        )

    for logical_id, targets in wanted.items():
        pattern = targets[0].pattern
        # One target per Id: a queue's rule is one EventRule per consuming function.
        by_id = {t.target_id: target_arn(t) for t in targets}
        key = json.dumps(pattern, sort_keys=True)
        if all((key, arn) in existing for arn in by_id.values()):
            continue
        name = f"{stack_name}-{logical_id}"[:64]
        log.info("moto left out rule %s: creating it as the template says", logical_id)
        events.put_rule(Name=name, EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(Rule=name, Targets=[{"Id": i, "Arn": a} for i, a in by_id.items()])


def read_deployment(session: Any, stack_name: str, template: dict[str, Any]) -> Deployment:
    """The functions, rules and queue mappings the stack created, as the services report them."""
    cfn = session.client("cloudformation")
    summaries = cfn.list_stack_resources(StackName=stack_name)["StackResourceSummaries"]
    resources = {
        r["LogicalResourceId"]: (r["ResourceType"], r.get("PhysicalResourceId", ""))
        for r in summaries
    }
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    lam = session.client("lambda")
    functions: dict[str, DeployedFunction] = {}
    for logical_id, (rtype, physical) in resources.items():
        if rtype != "AWS::Lambda::Function":
            continue
        cfg = lam.get_function(FunctionName=physical)["Configuration"]
        # moto keeps neither EventInvokeConfig nor DeadLetterConfig: the template's values
        # are what Lambda would apply.
        retries = 2
        for res in template["Resources"].values():
            props = res.get("Properties", {})
            if res.get("Type") == "AWS::Lambda::EventInvokeConfig" and props.get(
                "FunctionName"
            ) == {"Ref": logical_id}:
                retries = int(props.get("MaximumRetryAttempts", 2))
        dlq = (template["Resources"][logical_id]["Properties"].get("DeadLetterConfig") or {}).get(
            "TargetArn"
        )
        dlq_arn = cfg.get("DeadLetterConfig", {}).get("TargetArn")
        if dlq_arn is None and isinstance(dlq, dict) and "Fn::GetAtt" in dlq:
            queue_logical = dlq["Fn::GetAtt"][0]
            queue_url = resources[queue_logical][1]
            dlq_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue_url.rsplit('/', 1)[-1]}"
        functions[cfg["FunctionArn"]] = DeployedFunction(
            logical_id=logical_id,
            name=cfg["FunctionName"],
            arn=cfg["FunctionArn"],
            handler=cfg["Handler"],
            # Lambda's environment is strings only (moto keeps a Number parameter's int).
            environment={
                k: str(v) for k, v in cfg.get("Environment", {}).get("Variables", {}).items()
            },
            dead_letter_arn=dlq_arn,
            max_retry_attempts=retries,
        )

    sqs = session.client("sqs")
    mappings = []
    for m in lam.list_event_source_mappings()["EventSourceMappings"]:
        arn = m["EventSourceArn"]
        if not arn.startswith("arn:aws:sqs:"):
            continue
        queue_name = arn.rsplit(":", 1)[-1]
        url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
        function_arn = m["FunctionArn"]
        if function_arn not in functions:
            ours = [a for a in functions if a.endswith(":" + function_arn)]
            if not ours:
                continue  # another stack's function
            function_arn = ours[0]
        mappings.append(
            QueueMapping(
                queue_arn=arn,
                queue_url=url,
                function_arn=function_arn,
                batch_size=int(m.get("BatchSize", 10)),
                report_batch_item_failures="ReportBatchItemFailures"
                in (m.get("FunctionResponseTypes") or []),
                visibility_timeout=int(attrs["Attributes"]["VisibilityTimeout"]),
                batching_window=int(m.get("MaximumBatchingWindowInSeconds") or 0),
            )
        )
    # The rules as EventBridge has them (moto's stack resource list can miss one when two
    # rules target the same function): every rule on the default bus aimed at our functions,
    # or at a queue that an event source mapping of ours consumes.
    events = session.client("events")
    queue_urls = {m.queue_arn: m.queue_url for m in mappings}
    rules = []
    for rule in events.get_paginator("list_rules").paginate().build_full_result()["Rules"]:
        targets = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
        arns = tuple(t["Arn"] for t in targets if t["Arn"] in functions)
        urls = tuple(queue_urls[t["Arn"]] for t in targets if t["Arn"] in queue_urls)
        if (arns or urls) and rule.get("EventPattern"):
            rules.append(DeployedRule(rule["Name"], json.loads(rule["EventPattern"]), arns, urls))

    return Deployment(stack_name, outputs, functions, rules, mappings, resources)


# ------------------------------------------------------------------------------ invoking


@dataclass
class LambdaContext:
    """The context object Lambda passes (what Powertools reads from it)."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = ""
    log_stream_name: str = ""

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@dataclass(frozen=True)
class Invocation:
    """One handler call: which function, what came in (source), what it answered."""

    function: str  # logical id
    source: str  # "eventbridge:<rule>" or "sqs:<queue arn>"
    event: dict[str, Any]
    response: Any
    error: str | None
    attempt: int
    started: float
    seconds: float


def resolve_handler(spec: str) -> Handler:
    """``module.function`` as Lambda's Python runtime resolves ``Handler``."""
    module, _, name = spec.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    handler: Handler = fn
    return handler


def sqs_lambda_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping invokes a function with, from messages as
    ``ReceiveMessage`` returned them."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": m.get("MessageAttributes", {}),
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


class EventRouter:
    """EventBridge rules and SQS event source mappings, delivering to in-process handlers.

    ``put_event`` may be called from any thread; delivery happens on the router's own thread
    (:meth:`start`), one invocation at a time, as :meth:`run_once` does in tests.
    ``scale_delay`` turns a queue's visibility timeout in drill seconds into wall seconds.
    """

    def __init__(
        self,
        deployment: Deployment,
        *,
        session: Any = None,
        on_invocation: Callable[[Invocation], None] | None = None,
        lock: threading.RLock | None = None,
        visibility_seconds: Callable[[int], int] = lambda s: s,
        poll_interval: float = 0.05,
        handlers: Mapping[str, Handler] | None = None,
        not_before: Callable[[str], float | None] = lambda _body: None,
    ) -> None:
        """``handlers``: logical id -> handler, instead of importing the deployed ``Handler``
        (tests that need a handler to fail). ``not_before(body)``: a ``time.monotonic()``
        before which a received message is held back (SQS delays are whole seconds; under a
        compressed clock the drill keeps them exact this way)."""
        import boto3

        self.deployment = deployment
        self._session = session or boto3.session.Session(region_name=REGION)
        self._sqs = self._session.client("sqs")
        self._handlers: dict[str, Handler] = {}
        for logical_id, handler in (handlers or {}).items():
            self._handlers[deployment.function(logical_id).arn] = handler
        self._events: queue.Queue[Event] = queue.Queue()
        self._on_invocation = on_invocation
        self._lock = lock or threading.RLock()
        self._visibility = visibility_seconds
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = 0
        self._not_before = not_before
        self._held: list[tuple[float, QueueMapping, dict[str, Any]]] = []
        self.invocations: list[Invocation] = []
        self.unmatched: list[Event] = []
        self.errors: list[BaseException] = []

    # -- input

    def put_event(self, event: Event) -> None:
        """An event on the default bus (as AWS services put them); delivered asynchronously."""
        self._events.put(event)

    def matching(self, event: Event) -> list[DeployedRule]:
        """The deployed rules whose pattern matches ``event``."""
        return [r for r in self.deployment.rules if r.matches(event)]

    # -- delivery

    def _handler(self, fn: DeployedFunction) -> Handler:
        if fn.arn not in self._handlers:
            self._handlers[fn.arn] = resolve_handler(fn.handler)
        return self._handlers[fn.arn]

    def _invoke(
        self, fn: DeployedFunction, event: dict[str, Any], source: str, attempt: int
    ) -> Any:
        context = LambdaContext(fn.name, fn.arn)
        started = time.monotonic()
        error: str | None = None
        response: Any = None
        try:
            with self._lock:
                response = self._handler(fn)(event, context)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            inv = Invocation(
                fn.logical_id,
                source,
                event,
                response,
                error,
                attempt,
                started,
                time.monotonic() - started,
            )
            self.invocations.append(inv)
            if self._on_invocation is not None:
                self._on_invocation(inv)
        return response

    def deliver(self, event: Event) -> list[Invocation]:
        """Deliver one event to every matching rule's targets now (asynchronous-invoke rules:
        up to ``MaximumRetryAttempts`` retries, then the function's dead-letter queue; a queue
        target gets the event as a message, which its function gets at the next
        :meth:`poll_queues`, in a batch). The invocations made now."""
        before = len(self.invocations)
        rules = self.matching(event)
        if not rules:
            self.unmatched.append(event)
        for rule in rules:
            for url in rule.queue_urls:
                # EventBridge's SQS target: the message body is the event as JSON.
                with self._lock:
                    self._sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
            for target in rule.target_arns:
                fn = self.deployment.functions.get(target)
                if fn is None:
                    continue
                for attempt in range(1, fn.max_retry_attempts + 2):
                    try:
                        self._invoke(fn, event, f"eventbridge:{rule.name}", attempt)
                        break
                    except Exception:
                        log.warning("%s failed (attempt %d)", fn.logical_id, attempt, exc_info=True)
                else:
                    self._dead_letter(fn, event)
        return self.invocations[before:]

    def _dead_letter(self, fn: DeployedFunction, event: Event) -> None:
        if not fn.dead_letter_arn:
            return
        name = fn.dead_letter_arn.rsplit(":", 1)[-1]
        url = self._sqs.get_queue_url(QueueName=name)["QueueUrl"]
        with self._lock:
            self._sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))

    def poll_queues(self) -> int:
        """One receive per mapping; each non-empty batch goes to its function. Returns how many
        batches were delivered."""
        delivered = 0
        now = time.monotonic()
        for mapping in self.deployment.mappings:
            with self._lock:
                got = self._sqs.receive_message(
                    QueueUrl=mapping.queue_url,
                    MaxNumberOfMessages=min(10, mapping.batch_size),
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
            ready = []
            for m in got.get("Messages", []):
                due = self._not_before(m["Body"])
                if due is not None and due > now:
                    self._held.append((due, mapping, m))
                else:
                    ready.append(m)
            for item in [h for h in self._held if h[1] is mapping and h[0] <= now]:
                self._held.remove(item)
                ready.append(item[2])
            for start in range(0, len(ready), mapping.batch_size):
                delivered += 1
                self._deliver_batch(mapping, ready[start : start + mapping.batch_size])
        return delivered

    def _deliver_batch(self, mapping: QueueMapping, messages: list[dict[str, Any]]) -> None:
        fn = self.deployment.functions[mapping.function_arn]
        event = sqs_lambda_event(messages, mapping.queue_arn)
        try:
            response = self._invoke(fn, event, f"sqs:{mapping.queue_arn}", 1)
        except Exception:
            # The whole batch failed: every message comes back after the visibility timeout.
            log.warning("%s failed on an SQS batch", fn.logical_id, exc_info=True)
            self._retry_later(mapping, messages)
            return
        failed: set[str] = set()
        if mapping.report_batch_item_failures and isinstance(response, dict):
            failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
        keep = [m for m in messages if m["MessageId"] in failed]
        done = [m for m in messages if m["MessageId"] not in failed]
        with self._lock:
            for m in done:
                self._sqs.delete_message(
                    QueueUrl=mapping.queue_url, ReceiptHandle=m["ReceiptHandle"]
                )
        self._retry_later(mapping, keep)

    def _retry_later(self, mapping: QueueMapping, messages: list[dict[str, Any]]) -> None:
        # Left on the queue they reappear after the visibility timeout (then, after
        # maxReceiveCount, the redrive policy moves them to the DLQ). The timeout is in drill
        # seconds; the time scale applies to it like to every other duration.
        timeout = max(0, self._visibility(mapping.visibility_timeout))
        with self._lock:
            for m in messages:
                with contextlib.suppress(Exception):
                    self._sqs.change_message_visibility(
                        QueueUrl=mapping.queue_url,
                        ReceiptHandle=m["ReceiptHandle"],
                        VisibilityTimeout=timeout,
                    )

    def run_once(self) -> int:
        """Deliver every pending event, then poll the queues once; how many deliveries."""
        count = 0
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self.deliver(event)
            count += 1
        return count + self.poll_queues()

    def idle(self) -> bool:
        """No event waiting and nothing being delivered right now."""
        return self._events.empty() and self._busy == 0

    def wait_interval(self) -> float:
        """How long the service thread may sleep: until the next held message is due."""
        if not self._held:
            return self._poll_interval
        return max(
            0.001, min(self._poll_interval, min(h[0] for h in self._held) - time.monotonic())
        )

    # -- the Lambda service thread

    def start(self) -> EventRouter:
        """Deliver on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="lambda-service", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop delivering (what is in flight finishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=self.wait_interval())
            except queue.Empty:
                event = None
            self._busy += 1
            try:
                # What had arrived by now is delivered before the queues are polled, so that
                # notices that came together share a batch (as a batching window would have);
                # what these deliveries cause waits for the next round, after the poll.
                if event is not None:
                    self.deliver(event)
                    for _ in range(self._events.qsize()):
                        self.deliver(self._events.get_nowait())
                self.poll_queues()
            except Exception as exc:  # never let the Lambda service die silently
                log.exception("router failure")
                self.errors.append(exc)
            finally:
                self._busy -= 1

    @contextlib.contextmanager
    def running(self) -> Iterator[EventRouter]:
        """``start`` for the duration of the block."""
        self.start()
        try:
            yield self
        finally:
            self.stop()


def stack_params(
    *,
    cluster: str,
    asg_name: str,
    coordinator_url: str,
    coordinator_org: str,
    token_secret_arn: str,
    hook_name: str = "fleetdrain-terminating",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``sam deploy --parameter-overrides`` of a drill deployment."""
    params = {
        "ClusterName": cluster,
        "AutoScalingGroupName": asg_name,
        "LifecycleHookName": hook_name,
        "CoordinatorUrl": coordinator_url,
        "CoordinatorOrg": coordinator_org,
        "CoordinatorTokenSecretArn": token_secret_arn,
    }
    params.update(extra or {})
    return params


__all__ = [
    "DeployedFunction",
    "DeployedRule",
    "Deployment",
    "EventRouter",
    "Invocation",
    "LambdaContext",
    "QueueMapping",
    "deploy_stack",
    "drop_no_values",
    "expand_template",
    "resolve_handler",
    "stack_params",
]
