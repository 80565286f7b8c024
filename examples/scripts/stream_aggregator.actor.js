// The seed's JavaScript actor example, unmodified.
const { actor, ActorContext, Message } = require('reflow');

@actor({
    name: "StreamAggregator",
    inports: ["stream", "window"],
    outports: ["aggregated", "stats"],
    stateBackend: "redis"
})
async function aggregateStream(context) {
    const payload = context.getPayload();
    const state = context.getState();
    
    const streamData = payload.get("stream");
    const windowSize = payload.get("window") || 10;
    
    // Aggregate data
    const buffer = state.get("buffer", []);
    buffer.push(streamData.unwrap());
    
    if (buffer.length > windowSize) {
        buffer.shift();
    }
    
    state.set("buffer", buffer);
    const avg = buffer.reduce((a, b) => a + b, 0) / buffer.length;
    
    return {
        aggregated: Message.float(avg),
        stats: Message.object({
            count: buffer.length,
            average: avg
        })
    };
}
