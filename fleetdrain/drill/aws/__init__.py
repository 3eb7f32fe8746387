"""The drill's AWS: template.yaml deployed into moto, the event rules, moto's gaps filled,
stand-ins.

Its parts: ``template`` (the one reader of template.yaml: tags, parameters, conditions),
``rules`` (the template's EventBridge rules and the one pattern matcher), ``world`` (the stack
deployed into moto, and the router that plays EventBridge and Lambda), ``gaps`` (what moto
lacks: lifecycle actions, task protection, SIGTERM on DRAINING/StopTask, AWS's events) and
``endpoints`` (the ECS agent and IMDS stand-ins a task talks to).
"""
