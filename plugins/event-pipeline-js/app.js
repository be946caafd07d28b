// `event-pipeline` in JavaScript: the demo check (README, "The demo, step by step"), step for step and message for
// message the same as the Rust one in `plugins/event-pipeline`. Follows one analytics event
// through the collector (HTTP), the warehouse (SQL) and the report (HTTP), comparing its
// fields at every stage with what the test sent and with what the previous stage saw.

import * as stepwise from './stepwise.js';
import { failed, passed, pending } from './stepwise.js';

const FIELDS = ['amount_cents', 'name', 'user_id'];

const PARAMS_SCHEMA = {
  type: 'object',
  required: ['event_id'],
  properties: {
    event_id: { type: 'string', minLength: 1 },
    name: { type: 'string' },
    amount_cents: { type: 'integer' },
    user_id: { type: 'string' },
    collector_url: { type: 'string' },
    source: { type: 'string' },
  },
};

function readParams(raw) {
  if (raw === null || typeof raw !== 'object' || typeof raw.event_id !== 'string') {
    throw new Error('invalid params: event_id must be a string');
  }
  // The fields the caller asked to verify.
  const expected = {};
  for (const field of FIELDS) {
    if (raw[field] !== undefined && raw[field] !== null) expected[field] = raw[field];
  }
  return {
    eventId: raw.event_id,
    collectorUrl: raw.collector_url ?? 'http://127.0.0.1:9000',
    source: raw.source ?? 'warehouse',
    expected,
  };
}

/** The first field of `expected` that `record` holds differently, as a failure message. */
function mismatch(stage, record, expected) {
  for (const field of Object.keys(expected).sort()) {
    const got = record[field] ?? null;
    const want = expected[field];
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      return `${stage}: ${field} is ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`;
    }
  }
  return undefined;
}

function httpProblem(error) {
  if (!(error instanceof stepwise.HttpError)) throw error;
  return error instanceof stepwise.HttpDenied ? failed(error.message) : pending(error.message);
}

function fetchRecord(stage, url, notYet) {
  let response;
  try {
    response = stepwise.get(url);
  } catch (error) {
    return { outcome: httpProblem(error) };
  }
  if (response.status === 404) return { outcome: pending(notYet) };
  if (response.status !== 200) return { outcome: pending(`${stage} answered ${response.status}`) };
  try {
    return { record: response.json() };
  } catch (error) {
    return { outcome: failed(`${stage}: ${error.message}`) };
  }
}

function checkCollector(params) {
  const base = params.collectorUrl.replace(/\/+$/, '');
  const { record, outcome } = fetchRecord(
    'collector',
    `${base}/events/${params.eventId}`,
    'event not in the collector yet',
  );
  if (outcome) return outcome;
  const message = mismatch('collector', record, params.expected);
  if (message) return failed(message);
  stepwise.info(`collector has event ${params.eventId}`);
  return passed(record);
}

function checkWarehouse(params, input) {
  const statement = 'SELECT event_id, name, amount_cents, user_id FROM events WHERE event_id = ?';
  let rows;
  try {
    rows = stepwise.query(params.source, statement, [params.eventId]);
  } catch (error) {
    if (!(error instanceof stepwise.SqlError)) throw error;
    return error.kind === 'denied' || error.kind === 'read-only'
      ? failed(error.message)
      : pending(error.message);
  }
  if (rows.length === 0) return pending('event not in the warehouse yet');
  const row = rows[0];
  let message = mismatch('warehouse', row, params.expected);
  if (message) return failed(message);
  // The warehouse must agree with what the collector saw, not only with the caller.
  const collected = stepwise.outputOf(input, 'collector');
  if (collected !== null && typeof collected === 'object') {
    const seen = {};
    for (const field of FIELDS) {
      if (field in collected) seen[field] = collected[field];
    }
    message = mismatch('warehouse vs collector', row, seen);
    if (message) return failed(message);
  }
  stepwise.info(`warehouse has event ${params.eventId}`);
  return passed(row);
}

function checkReport(params) {
  const base = params.collectorUrl.replace(/\/+$/, '');
  const { record: report, outcome } = fetchRecord(
    'report',
    `${base}/report/events/${params.eventId}`,
    'event not in the report yet',
  );
  if (outcome) return outcome;
  const count = Number.isInteger(report.count) ? report.count : 0;
  if (count !== 1) return failed(`report counts the event ${count} times, expected once`);
  const expected = {};
  if ('amount_cents' in params.expected) expected.amount_cents = params.expected.amount_cents;
  const message = mismatch('report', report, expected);
  if (message) return failed(message);
  stepwise.info(`report counts event ${params.eventId}`);
  return passed(report);
}

export function describe() {
  return stepwise.checkInfo({
    name: 'event-pipeline',
    version: '0.1.0',
    description:
      'Verifies one event in the collector, the warehouse and the report, with consistent fields.',
    steps: [
      stepwise.step('collector', 'the collector received the event', { timeoutMs: 10_000 }),
      stepwise.step('warehouse', 'the warehouse table has the event with the same fields', {
        timeoutMs: 15_000,
      }),
      stepwise.step('report', 'the report counts the event once with the same amount', {
        timeoutMs: 15_000,
      }),
    ],
    paramsSchema: PARAMS_SCHEMA,
  });
}

export function runStep(input) {
  let params;
  try {
    params = readParams(stepwise.params(input));
  } catch (error) {
    return failed(error.message);
  }
  switch (input.step) {
    case 'collector':
      return checkCollector(params);
    case 'warehouse':
      return checkWarehouse(params, input);
    case 'report':
      return checkReport(params);
    default:
      return failed(`unknown step ${JSON.stringify(input.step)}`);
  }
}
