"""`{name}`: a Stepwise check in Python.

Build: `stepwise plugin build` (it runs componentize-py), then try it:
`stepwise dev dist/{name}.wasm --params '{"expect": "hello"}'`
and upload it: `curl -X PUT http://127.0.0.1:8080/v1/plugins/{name} --data-binary @dist/{name}.wasm`.

Each step is called once per tick until it passes or fails; return `pending(...)` to be asked
again. Calls may repeat after a host crash: keep them idempotent. `stepwise.py` wraps what the
host grants: HTTP (`stepwise.get`), SQL (`stepwise.query`) and logging (`stepwise.info`).
"""

import wit_world

import stepwise
from stepwise import passed, pending


class WitWorld(wit_world.WitWorld):
    def describe(self):
        return stepwise.check_info(
            name="{name}",
            version="0.1.0",
            description="Passes once params.expect is a non-empty string.",
            steps=[stepwise.step("expect", "checks params.expect", timeout_ms=60_000)],
            params_schema={"type": "object", "properties": {"expect": {"type": "string"}}},
        )

    def run_step(self, input):
        params = stepwise.params(input)
        stepwise.info(f"step {input.step} attempt {input.attempt}")
        expected = params.get("expect") if isinstance(params, dict) else None
        if isinstance(expected, str) and expected:
            return passed({"expect": expected})
        return pending("params.expect is not set yet")
