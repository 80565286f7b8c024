'use strict';
const { actor, Message } = require('reflow');

/**
 * Averages the last `window` numbers it was sent.
 * Braces in comments {{ and "quotes' must not confuse the scanner.
 *
 * @param {ActorContext} context
 * @returns {object}
 */
module.exports = actor({
    name: 'MovingAverage',
    inports: ['value', 'window',],       // trailing commas, single quotes
    outports: ['average'],
    awaitAllInports: false,
    version: '2.1.0',
    tags: ['math', "stream"],
    category: 'statistics',
    config_schema: {type: 'object', properties: {window: {type: 'integer', minimum: 1}}},
    memory: '64MB',
    timeout: '1.5s',
    state_backend: 'redis',
}, async function movingAverage(context) {
    const state = context.getState();
    const buffer = await state.get('buffer', []);
    buffer.push(context.getInput('value'));
    const size = context.getInput('window') || 10;
    while (buffer.length > size) buffer.shift();
    await state.set('buffer', buffer);
    const label = `avg of ${buffer.length} {values}`;
    return { average: Message.float(buffer.reduce((a, b) => a + b, 0) / buffer.length), label };
});
