"""The drill's AWS: template.yaml deployed into moto, the event rules, moto's gaps filled,
stand-ins."""
