# The seed's DataProcessor, unmodified below the helper it calls.
from reflow import actor, ActorContext, Message
from typing import Dict


def transform_data(data, config):
    """Scale every number by config["scale"] (default 1); non-lists become one-element lists."""
    values = data.unwrap() if isinstance(data, Message) else data
    cfg = config.unwrap() if isinstance(config, Message) else config
    scale = (cfg or {}).get("scale", 1)
    if not isinstance(values, list):
        values = [] if values is None else [values]
    return [v * scale if isinstance(v, (int, float)) else v for v in values]


@actor(
    name="DataProcessor",
    inports=["data", "config"],
    outports=["processed", "metrics"],
    state_backend="redis"
)
async def process_data(context: ActorContext) -> Dict[str, Message]:
    """Processes input data with configurable operations."""
    
    payload = context.get_payload()
    state = context.get_state()
    
    data = payload.get("data")
    config = payload.get("config", {})
    
    # Process data
    result = transform_data(data, config)
    
    # Update state
    count = state.increment("process_count")
    
    return {
        "processed": Message.array(result),
        "metrics": Message.object({"count": count})
    }
