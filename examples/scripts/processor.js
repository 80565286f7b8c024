// Processes text and numbers: the JavaScript half of the seed's two-script example
// (`python -m supervisor run examples/scripts/calculator.py examples/scripts/processor.js`).
const { actor, Message } = require('reflow');

@actor({
    name: "Processor",
    inports: ["input", "operation"],
    outports: ["output", "error"],
    version: "1.0.0",
    tags: ["text", "example"],
    stateBackend: "redis"
})
async function processInput(context) {
    const input = context.getInput("input");
    const operation = context.getInput("operation", "uppercase");
    const processed = context.getState().increment("processed");

    switch (operation) {
        case "uppercase": return { output: String(input).toUpperCase() };
        case "reverse":
            return { output: Array.isArray(input) ? [...input].reverse() : [...String(input)].reverse().join("") };
        case "length": return { output: input.length };
        case "sum": return { output: input.reduce((a, b) => a + b, 0) };
        case "count": return { output: processed };
        default:
            return { error: Message.error(`unknown operation ${JSON.stringify(operation)}; use uppercase, reverse, length, sum or count`) };
    }
}
