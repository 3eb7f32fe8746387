"""The drill's fleet: tasks as real agent processes, the runtime that stops them as ECS does."""
