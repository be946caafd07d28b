"""`event-pipeline` in Python: the demo check (README, "The demo, step by step"), step for step and message for message
the same as the Rust one in `plugins/event-pipeline`. Follows one analytics event through the
collector (HTTP), the warehouse (SQL) and the report (HTTP), comparing its fields at every stage
with what the test sent and with what the previous stage saw."""

import json

import wit_world
import stepwise
from stepwise import failed, passed, pending

PARAMS_SCHEMA = {
    "type": "object",
    "required": ["event_id"],
    "properties": {
        "event_id": {"type": "string", "minLength": 1},
        "name": {"type": "string"},
        "amount_cents": {"type": "integer"},
        "user_id": {"type": "string"},
        "collector_url": {"type": "string"},
        "source": {"type": "string"},
    },
}


class Params:
    def __init__(self, raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("event_id"), str):
            raise ValueError("invalid params: event_id must be a string")
        self.event_id = raw["event_id"]
        self.collector_url = raw.get("collector_url", "http://127.0.0.1:9000")
        self.source = raw.get("source", "warehouse")
        # The fields the caller asked to verify.
        self.expected = {field: raw[field] for field in ("name", "amount_cents", "user_id")
                         if raw.get(field) is not None}


def as_json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def mismatch(stage, record, expected):
    """The first field of `expected` that `record` holds differently, as a failure message."""
    for field, want in sorted(expected.items()):
        got = record.get(field)
        if got != want or type(got) is not type(want):
            return f"{stage}: {field} is {as_json(got)}, expected {as_json(want)}"
    return None


def fetch_record(stage, url, not_yet):
    """`(record, None)` from a 200 answer with JSON, else `(None, the step's outcome)`: a
    refused request fails, anything else not there yet stays pending."""
    try:
        response = stepwise.get(url)
    except stepwise.HttpDenied as error:
        return None, failed(str(error))
    except stepwise.HttpError as error:
        return None, pending(str(error))
    if response.status == 404:
        return None, pending(not_yet)
    if response.status != 200:
        return None, pending(f"{stage} answered {response.status}")
    try:
        record = response.json()
    except stepwise.HttpError as error:
        return None, failed(f"{stage}: {error}")
    if not isinstance(record, dict):
        return None, failed(f"{stage}: response body is not the expected JSON: not an object")
    return record, None


def check_collector(params):
    url = f"{params.collector_url.rstrip('/')}/events/{params.event_id}"
    record, outcome = fetch_record("collector", url, "event not in the collector yet")
    if outcome:
        return outcome
    message = mismatch("collector", record, params.expected)
    if message:
        return failed(message)
    stepwise.info(f"collector has event {params.event_id}")
    return passed(record)


def check_warehouse(params, input):
    statement = "SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ?"
    try:
        rows = stepwise.query(params.source, statement, [params.event_id])
    except stepwise.SqlError as error:
        return failed(str(error)) if error.kind in ("denied", "read-only") else pending(str(error))
    if not rows:
        return pending("event not in the warehouse yet")
    row = rows[0]
    message = mismatch("warehouse", row, params.expected)
    if message:
        return failed(message)
    # The warehouse must agree with what the collector saw, not only with the caller.
    collected = stepwise.output_of(input, "collector")
    if isinstance(collected, dict):
        seen = {field: collected[field] for field in ("name", "amount_cents", "user_id")
                if field in collected}
        message = mismatch("warehouse vs collector", row, seen)
        if message:
            return failed(message)
    stepwise.info(f"warehouse has event {params.event_id}")
    return passed(row)


def check_report(params):
    url = f"{params.collector_url.rstrip('/')}/report/events/{params.event_id}"
    report, outcome = fetch_record("report", url, "event not in the report yet")
    if outcome:
        return outcome
    count = report.get("count")
    count = count if isinstance(count, int) and not isinstance(count, bool) else 0
    if count != 1:
        return failed(f"report counts the event {count} times, expected once")
    expected = {}
    if "amount_cents" in params.expected:
        expected["amount_cents"] = params.expected["amount_cents"]
    message = mismatch("report", report, expected)
    if message:
        return failed(message)
    stepwise.info(f"report counts event {params.event_id}")
    return passed(report)


class WitWorld(wit_world.WitWorld):
    def describe(self):
        return stepwise.check_info(
            name="event-pipeline",
            version="0.1.0",
            description="Verifies one event in the collector, the warehouse and the report, "
                        "with consistent fields.",
            steps=[
                stepwise.step("collector", "the collector received the event", 10_000),
                stepwise.step("warehouse", "the warehouse table has the event with the same fields", 15_000),
                stepwise.step("report", "the report counts the event once with the same amount", 15_000),
            ],
            params_schema=PARAMS_SCHEMA,
        )

    def run_step(self, input):
        try:
            params = Params(stepwise.params(input))
        except ValueError as error:
            return failed(str(error))
        if input.step == "collector":
            return check_collector(params)
        if input.step == "warehouse":
            return check_warehouse(params, input)
        if input.step == "report":
            return check_report(params)
        return failed(f"unknown step {as_json(input.step)}")
