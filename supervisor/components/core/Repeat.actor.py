"""core/Repeat: sends every packet it gets on ``in`` out of ``out``, unchanged."""
from reflow import actor


@actor(name="Repeat", inports=["in"], outports=["out"], description="Forwards packets unchanged",
       category="core", tags=["icon:forward"])
async def process(context):
    return {"out": context.get_payload()["in"]}
