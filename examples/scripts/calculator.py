"""A small calculator: applies ``op`` to ``a`` and ``b`` (or scales ``value`` by the configured factor)."""

from reflow import ActorContext, Message, actor

OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


@actor(
    name="Calculator",
    inports=["a", "b", "op", "value"],
    outports=["result", "error"],
    version="1.0.0",
    tags=["math", "example"],
    config_schema={"type": "object", "properties": {"factor": {"type": "number"}}},
)
async def calculate(context: ActorContext):
    """Adds, subtracts, multiplies or divides two numbers; or multiplies ``value`` by config ``factor``."""
    if context.has_input("value"):
        factor = context.get_config().get("factor", 1)
        return {"result": context.get_input("value") * factor}
    op = context.get_input("op", "add")
    if op not in OPS:
        return {"error": Message.error(f"unknown op {op!r}; use one of {', '.join(OPS)}")}
    a, b = context.get_input("a", 0), context.get_input("b", 0)
    count = context.get_state().increment("calculations")
    await context.send_output("result", OPS[op](a, b))
    return {"result": OPS[op](a, b), "count": count}
