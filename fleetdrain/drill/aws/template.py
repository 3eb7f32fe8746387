"""template.yaml as data: read with its CloudFormation tags, parameters and conditions resolved.

The one reader of the stack's template for the drill: the deploy (:mod:`.world`) and the rule
matcher (:mod:`.rules`) both read it through here, so a ``!Ref`` or ``!Sub`` means the same to
each. Only what the drill needs is resolved: ``Ref`` and the string form of ``Fn::Sub`` against
parameter values, and the ``Conditions`` section; everything else is left for moto's
CloudFormation to resolve at deploy time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: The stack the drill deploys: the repository's own SAM template (``template.yaml`` at the
#: root, where ``sam deploy`` wants it). It ships in the package beside this module: in a
#: checkout ``fleetdrain/drill/aws/template.yaml`` is a symlink to the root's, which the wheel
#: build copies in as a file (package data), so an installed drill has it too.
TEMPLATE = Path(__file__).with_name("template.yaml")
#: The drill's pseudo parameters: moto's default account, in the region the drill deploys to.
ACCOUNT = "123456789012"
REGION = "us-east-1"

Template = dict[str, Any]


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (``!Ref X`` -> ``{"Ref": "X"}``)."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template(path: str | Path = TEMPLATE) -> Template:
    """A CloudFormation/SAM template as plain data (short-form tags expanded)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=_CfnLoader)  # a SafeLoader subclass
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a template")
    return data


def parameter_values(
    template: Mapping[str, Any],
    params: Mapping[str, str],
    region: str = REGION,
    account: str = ACCOUNT,
) -> dict[str, str]:
    """What a ``Ref`` resolves to in a stack of ``template`` deployed with ``params``: the
    pseudo parameters, then each parameter's ``Default``, overridden by ``params``."""
    return {
        "AWS::Region": region,
        "AWS::AccountId": account,
        "AWS::Partition": "aws",
        **{k: str(v.get("Default", "")) for k, v in template.get("Parameters", {}).items()},
        **params,
    }


def resolve(value: Any, values: Mapping[str, str]) -> Any:
    """Resolve ``Ref`` and ``Fn::Sub`` in ``value`` against ``values`` (see
    :func:`parameter_values`); other intrinsics are left as they are."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        if key == "Ref":
            if arg not in values:
                raise KeyError(f"no value for parameter {arg}")
            return values[arg]
        if key == "Fn::Sub":
            if not isinstance(arg, str):
                raise ValueError("only the string form of Fn::Sub is supported")

            def sub(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in values:
                    raise KeyError(f"no value for {name} in Fn::Sub")
                return values[name]

            return re.sub(r"\$\{([^}!]+)\}", sub, arg)
    if isinstance(value, dict):
        return {k: resolve(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, values) for v in value]
    return value


def conditions(template: Mapping[str, Any], params: Mapping[str, str]) -> dict[str, bool]:
    """Every entry of the template's ``Conditions``, evaluated for a stack deployed with
    ``params`` (``Fn::Equals``, ``Fn::Not``, ``Fn::And``, ``Fn::Or``, ``Condition``, ``Ref``)."""
    values = parameter_values(template, params)

    def ev(node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return values[arg]
            if key == "Fn::Equals":
                return ev(arg[0]) == ev(arg[1])
            if key == "Fn::Not":
                return not ev(arg[0])
            if key == "Fn::And":
                return all(ev(a) for a in arg)
            if key == "Fn::Or":
                return any(ev(a) for a in arg)
            if key == "Condition":
                return ev(template["Conditions"][arg])
        return node

    return {name: bool(ev(expr)) for name, expr in template.get("Conditions", {}).items()}
