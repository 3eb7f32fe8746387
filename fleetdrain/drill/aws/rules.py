"""EventBridge rules: the template's rules read out, and an event matched against a pattern.

The one rule reader and the one matcher of the drill. :func:`event_rules` reads a template's
rules in either form: template.yaml as written (a SAM function's ``EventBridgeRule`` events,
and ``AWS::Events::Rule`` resources of its own) or as the SAM transform expands it (every rule
an ``AWS::Events::Rule``, every SQS event an ``AWS::Lambda::EventSourceMapping``). A rule may
target a function, or a queue that a function consumes (the lifecycle and spot notices go
through a queue, so that one invocation takes a batch of them): either way it is read out as
the function the event reaches, and for a queue the queue it goes through
(:attr:`EventRule.queue`). :func:`matches` is EventBridge's pattern matching, done by moto's
own matcher, so the drill routes an event exactly where moto's EventBridge would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetdrain.drill.aws.template import ACCOUNT, REGION, conditions, parameter_values, resolve

Event = dict[str, Any]
Pattern = dict[str, Any]

_FUNCTION_TYPES = ("AWS::Serverless::Function", "AWS::Lambda::Function")


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """Whether ``event`` matches the EventBridge ``pattern`` (moto's matcher)."""
    from moto.events.models import EventPattern

    matcher = EventPattern.load(json.dumps(pattern))
    return bool(matcher.matches_event(event))  # type: ignore[arg-type]


@dataclass(frozen=True)
class EventRule:
    """An EventBridge rule of a template aimed at one of its functions, parameters resolved.

    A rule with several targets is one :class:`EventRule` per target; a target queue that
    several functions consume (not a sensible template) one per function.
    """

    #: The logical id of the function the event reaches: the rule's target, or the consumer
    #: of the rule's target queue.
    function: str
    #: The rule's name in the template: the event's key under a SAM function's ``Events``, or
    #: the logical id of an ``AWS::Events::Rule``.
    name: str
    pattern: Pattern
    #: The target's ``Id`` (an ``AWS::Events::Rule``'s; a SAM event leaves it to the transform).
    target_id: str | None = None
    #: The logical id of the queue between the rule and :attr:`function`, when the rule's
    #: target is a queue the function consumes (a SAM ``SQS`` event, or an
    #: ``AWS::Lambda::EventSourceMapping``): the function then gets the event as the body of
    #: an SQS record, in a batch. ``None``: the rule invokes the function itself.
    queue: str | None = None

    def matches(self, event: Event) -> bool:
        """Whether EventBridge would deliver ``event`` by this rule."""
        return matches(self.pattern, event)


def _get_att_arn(value: Any) -> str | None:
    """``X`` of ``Fn::GetAtt [X, Arn]`` (or ``"X.Arn"``), else ``None``."""
    if not isinstance(value, dict) or set(value) != {"Fn::GetAtt"}:
        return None
    att = value["Fn::GetAtt"]
    if isinstance(att, str):
        att = att.split(".", 1)
    if isinstance(att, list) and len(att) == 2 and att[1] == "Arn" and isinstance(att[0], str):
        return att[0]
    return None


def _function_ref(value: Any) -> str | None:
    """The logical id an event source mapping's ``FunctionName`` names (``Ref`` or
    ``Fn::GetAtt ... Arn``), else ``None``."""
    if isinstance(value, dict) and set(value) == {"Ref"} and isinstance(value["Ref"], str):
        return value["Ref"]
    return _get_att_arn(value)


def queue_consumers(template: Mapping[str, Any], params: Mapping[str, str]) -> dict[str, list[str]]:
    """The template's queues that its functions consume: queue logical id -> function logical
    ids, from each SAM function's ``SQS`` events whose ``Queue`` is the queue's
    ``Fn::GetAtt ... Arn`` and each ``AWS::Lambda::EventSourceMapping`` whose
    ``EventSourceArn`` is (a mapping whose ``Condition`` is false for ``params`` is left out)."""
    resources = template.get("Resources", {})
    active = conditions(template, params)
    out: dict[str, list[str]] = {}

    def add(queue: str | None, function: str | None) -> None:
        if queue is None or function is None:
            return
        if resources.get(queue, {}).get("Type") != "AWS::SQS::Queue":
            return
        if resources.get(function, {}).get("Type") not in _FUNCTION_TYPES:
            return
        if function not in out.setdefault(queue, []):
            out[queue].append(function)

    for logical_id, resource in resources.items():
        props = resource.get("Properties") or {}
        condition = resource.get("Condition")
        if condition is not None and not active.get(condition, True):
            continue
        if resource.get("Type") == "AWS::Serverless::Function":
            for spec in (props.get("Events") or {}).values():
                if spec.get("Type") == "SQS":
                    add(_get_att_arn((spec.get("Properties") or {}).get("Queue")), logical_id)
        elif resource.get("Type") == "AWS::Lambda::EventSourceMapping":
            add(_get_att_arn(props.get("EventSourceArn")), _function_ref(props.get("FunctionName")))
    return out


def event_rules(
    template: Mapping[str, Any],
    params: Mapping[str, str],
    region: str = REGION,
    account: str = ACCOUNT,
) -> list[EventRule]:
    """Every EventBridge rule of ``template`` aimed at a function, its pattern resolved against
    ``params``: each SAM function's ``EventBridgeRule`` events, then each ``AWS::Events::Rule``
    target that is a function's ``Fn::GetAtt ... Arn`` (:attr:`EventRule.queue` ``None``), or a
    queue's that a function consumes (:attr:`EventRule.queue` that queue, see
    :func:`queue_consumers`); a target that is neither reaches no function and is left out."""
    values = parameter_values(template, params, region, account)
    resources = template.get("Resources", {})
    consumers = queue_consumers(template, params)
    rules = []
    for logical_id, resource in resources.items():
        props = resource.get("Properties", {})
        if resource.get("Type") == "AWS::Serverless::Function":
            for name, spec in (props.get("Events") or {}).items():
                if spec.get("Type") == "EventBridgeRule":
                    pattern = resolve(spec["Properties"]["Pattern"], values)
                    rules.append(EventRule(logical_id, name, pattern))
        elif resource.get("Type") == "AWS::Events::Rule" and "EventPattern" in props:
            pattern = resolve(props["EventPattern"], values)
            for target in props.get("Targets", []):
                ref = _get_att_arn(target.get("Arn"))
                if ref is None:
                    continue
                kind = resources.get(ref, {}).get("Type")
                if kind == "AWS::SQS::Queue":
                    for function in consumers.get(ref, []):
                        rules.append(EventRule(function, logical_id, pattern, target["Id"], ref))
                elif kind in _FUNCTION_TYPES:
                    rules.append(EventRule(ref, logical_id, pattern, target["Id"]))
    return rules
