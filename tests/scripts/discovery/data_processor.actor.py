from reflow import actor, ActorContext, Message
from typing import Dict

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
