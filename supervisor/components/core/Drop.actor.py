"""core/Drop: takes every packet it gets on ``in`` and sends nothing."""
from reflow import actor


@actor(name="Drop", inports=["in"], outports=[], description="Drops every packet",
       category="core", tags=["icon:trash-o"])
async def process(context):
    return {}
