// `{name}`: a Stepwise check in JavaScript.
//
// Build: `stepwise plugin build` (it runs componentize-js), then try it:
// `stepwise dev dist/{name}.wasm --params '{"expect": "hello"}'`
// and upload it: `curl -X PUT http://127.0.0.1:8080/v1/plugins/{name} --data-binary @dist/{name}.wasm`.
//
// Each step is called once per tick until it passes or fails; return `pending(...)` to be asked
// again. Calls may repeat after a host crash: keep them idempotent. `stepwise.js` wraps what the
// host grants: HTTP (`stepwise.get`), SQL (`stepwise.query`) and logging (`stepwise.info`).

import * as stepwise from './stepwise.js';
import { passed, pending } from './stepwise.js';

export function describe() {
  return stepwise.checkInfo({
    name: '{name}',
    version: '0.1.0',
    description: 'Passes once params.expect is a non-empty string.',
    steps: [stepwise.step('expect', 'checks params.expect', { timeoutMs: 60_000 })],
    paramsSchema: { type: 'object', properties: { expect: { type: 'string' } } },
  });
}

export function runStep(input) {
  const params = stepwise.params(input);
  stepwise.info(`step ${input.step} attempt ${input.attempt}`);
  const expected = params?.expect;
  if (typeof expected === 'string' && expected !== '') {
    return passed({ expect: expected });
  }
  return pending('params.expect is not set yet');
}
