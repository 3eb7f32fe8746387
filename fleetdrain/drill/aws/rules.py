"""EventBridge rules: the template's rules read out, and an event matched against a pattern.

The one rule reader and the one matcher of the drill. :func:`event_rules` reads a template's
rules in either form: a SAM function's ``EventBridgeRule`` events (template.yaml as written)
or ``AWS::Events::Rule`` resources (what the SAM transform expands those to). :func:`matches`
is EventBridge's pattern matching, done by moto's own matcher, so the drill routes an event
exactly where moto's EventBridge would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetdrain.drill.aws.template import ACCOUNT, REGION, parameter_values, resolve

Event = dict[str, Any]
Pattern = dict[str, Any]


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """Whether ``event`` matches the EventBridge ``pattern`` (moto's matcher)."""
    from moto.events.models import EventPattern

    matcher = EventPattern.load(json.dumps(pattern))
    return bool(matcher.matches_event(event))  # type: ignore[arg-type]


@dataclass(frozen=True)
class EventRule:
    """An EventBridge rule of a template aimed at one of its functions, parameters resolved.

    A rule with several targets is one :class:`EventRule` per target.
    """

    function: str  # the logical id of the target function
    #: The rule's name in the template: the event's key under a SAM function's ``Events``, or
    #: the logical id of an ``AWS::Events::Rule``.
    name: str
    pattern: Pattern
    #: The target's ``Id`` (an ``AWS::Events::Rule``'s; a SAM event leaves it to the transform).
    target_id: str | None = None

    def matches(self, event: Event) -> bool:
        """Whether EventBridge would deliver ``event`` by this rule."""
        return matches(self.pattern, event)


def event_rules(
    template: Mapping[str, Any],
    params: Mapping[str, str],
    region: str = REGION,
    account: str = ACCOUNT,
) -> list[EventRule]:
    """Every EventBridge rule of ``template`` aimed at a function, its pattern resolved against
    ``params``: each SAM function's ``EventBridgeRule`` events, then each ``AWS::Events::Rule``
    target that is a function's ``Fn::GetAtt ... Arn``."""
    values = parameter_values(template, params, region, account)
    rules = []
    for logical_id, resource in template.get("Resources", {}).items():
        props = resource.get("Properties", {})
        if resource.get("Type") == "AWS::Serverless::Function":
            for name, spec in (props.get("Events") or {}).items():
                if spec.get("Type") == "EventBridgeRule":
                    pattern = resolve(spec["Properties"]["Pattern"], values)
                    rules.append(EventRule(logical_id, name, pattern))
        elif resource.get("Type") == "AWS::Events::Rule" and "EventPattern" in props:
            pattern = resolve(props["EventPattern"], values)
            for target in props.get("Targets", []):
                arn = target.get("Arn")
                if isinstance(arn, dict) and "Fn::GetAtt" in arn:
                    rules.append(EventRule(arn["Fn::GetAtt"][0], logical_id, pattern, target["Id"]))
    return rules
