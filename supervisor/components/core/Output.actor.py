"""core/Output: prints every packet it gets on ``in`` (the host's log and the FBP
protocol's network:output) and forwards it out of ``out``."""
import json

from reflow import actor


@actor(name="Output", inports=["in"], outports=["out"], description="Prints packets and forwards them",
       category="core", tags=["icon:terminal"])
async def process(context):
    value = context.get_input("in")
    try:
        print(value if isinstance(value, str) else json.dumps(value))
    except (TypeError, ValueError):
        print(repr(value))
    return {"out": context.get_payload()["in"]}
