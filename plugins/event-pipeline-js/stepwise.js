// Helpers for a Stepwise check written in JavaScript (built with componentize-js).
//
// The host grants a check four capabilities and nothing else: outbound HTTP to the hosts in
// its grant, SQL queries, typed Redis reads and message reads on the sources in its grant, and
// log lines stored with the attempt. This module wraps them, and the WIT types, in plain JavaScript:
//
//   params(input), outputs(input)          the run's params and earlier steps' outputs
//   passed(value), pending(msg), failed(msg)  a step's outcome
//   get(url), request(method, url, ...)     HTTP, synchronous; throws HttpDenied when the
//                                           grant refuses the host (`fetch` works too, in an
//                                           async runStep, but cannot tell a denial apart)
//   query(source, statement, params)       SQL with bound parameters; rows as objects
//   kv.get(source, key), kv.hgetall(...)   typed Redis reads; values as Uint8Array
//                                           (kv.text for a string)
//   messages.find(source, subject, { jsonFields, headers, limit })
//                                           what was published on a bus since the run started
//   info(msg), warn(msg), ...              log lines
//   secret(name)                           the placeholder the host replaces with a secret

import { log as hostLog } from 'stepwise:plugin/log@0.1.0';
import { query as hostQuery } from 'stepwise:plugin/sql@0.1.0';
import * as hostKv from 'stepwise:plugin/kv@0.1.0';
import { find as hostFind } from 'stepwise:plugin/messages@0.1.0';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, OutgoingRequest, OutgoingBody, IncomingBody } from 'wasi:http/types@0.2.12';

// --- describing the check ----------------------------------------------------------------

/** One step: `timeoutMs` is how long it may stay pending, `maxAttempts` how often. */
export function step(name, description, { timeoutMs, maxAttempts } = {}) {
  return {
    name,
    description,
    timeoutMs: timeoutMs === undefined ? undefined : BigInt(timeoutMs),
    maxAttempts,
  };
}

/** What `describe` returns; `paramsSchema` is a JSON Schema the host checks params against. */
export function checkInfo({ name, version, description, steps, paramsSchema }) {
  return {
    name,
    version,
    description,
    steps,
    paramsSchema: paramsSchema === undefined ? undefined : JSON.stringify(paramsSchema),
  };
}

// --- a step's input and outcome ----------------------------------------------------------

/** The run's params (an object when the trigger sent one). */
export function params(input) {
  return JSON.parse(input.params);
}

/** Step name -> output of every step that passed so far in this run. */
export function outputs(input) {
  return JSON.parse(input.outputs);
}

/** The output of the earlier step `stepName`, or undefined if it has not passed. */
export function outputOf(input, stepName) {
  return outputs(input)[stepName];
}

/** The step passed; `output` (any JSON value) is kept and shown to the following steps. */
export function passed(output = null) {
  return { tag: 'passed', val: JSON.stringify(output) };
}

/** Not there yet: the host asks again on the next tick, until the step's timeout. */
export function pending(message) {
  return { tag: 'pending', val: String(message) };
}

/** The check's verdict: the step and the run fail. */
export function failed(message) {
  return { tag: 'failed', val: String(message) };
}

// --- HTTP --------------------------------------------------------------------------------

/** A request that got no response: connection, protocol or limit errors. */
export class HttpError extends Error {}

/** The host refused the request: its host is not in the grant, or it is internal. */
export class HttpDenied extends HttpError {}

export class Response {
  constructor(status, headers, body) {
    this.status = status;
    this.headers = headers;
    this.body = body;
  }

  text() {
    return new TextDecoder().decode(this.body);
  }

  json() {
    try {
      return JSON.parse(this.text());
    } catch (error) {
      throw new HttpError(`response body is not the expected JSON: ${error.message}`);
    }
  }

  header(name) {
    const wanted = name.toLowerCase();
    const found = this.headers.find(([key]) => key.toLowerCase() === wanted);
    return found === undefined ? undefined : found[1];
  }
}

/** `GET url`. */
export function get(url) {
  return request('GET', url);
}

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'];

/** Sends one request and reads the whole response (the host caps its size and time). */
export function request(method, url, { headers = [], body } = {}) {
  const [scheme, authority, path] = splitUrl(url);
  const fields = new Fields();
  const encoder = new TextEncoder();
  for (const [name, value] of headers) {
    fields.append(name, encoder.encode(value));
  }
  const outgoing = new OutgoingRequest(fields);
  const upper = method.toUpperCase();
  outgoing.setMethod(
    METHODS.includes(upper) ? { tag: upper.toLowerCase() } : { tag: 'other', val: upper },
  );
  outgoing.setScheme({ tag: scheme });
  outgoing.setAuthority(authority);
  outgoing.setPathWithQuery(path);
  const bytes = typeof body === 'string' ? encoder.encode(body) : body;
  const outgoingBody = bytes === undefined ? undefined : outgoing.body();
  let future;
  try {
    future = handle(outgoing, undefined);
    if (outgoingBody !== undefined) {
      const stream = outgoingBody.write();
      for (let start = 0; start < bytes.length; start += 4096) {
        stream.blockingWriteAndFlush(bytes.subarray(start, start + 4096));
      }
      stream[Symbol.dispose]?.();
      OutgoingBody.finish(outgoingBody, undefined);
    }
  } catch (error) {
    throw httpError(error.payload, url);
  }
  future.subscribe().block();
  const answer = future.get();
  if (answer === undefined || answer.tag === 'err') {
    throw new HttpError(`request to ${url}: no response`);
  }
  if (answer.val.tag === 'err') {
    throw httpError(answer.val.val, url);
  }
  const response = answer.val.val;
  const status = response.status();
  const decoder = new TextDecoder();
  const responseHeaders = response
    .headers()
    .entries()
    .map(([name, value]) => [name, decoder.decode(value)]);
  const incoming = response.consume();
  const stream = incoming.stream();
  const chunks = [];
  let length = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (error) {
      if (error.payload?.tag === 'closed') break;
      throw new HttpError(`reading the response from ${url}: ${error.payload?.val?.toDebugString?.() ?? error}`);
    }
    chunks.push(chunk);
    length += chunk.length;
  }
  stream[Symbol.dispose]?.();
  IncomingBody.finish(incoming);
  const all = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    all.set(chunk, offset);
    offset += chunk.length;
  }
  return new Response(status, responseHeaders, all);
}

function splitUrl(url) {
  const invalid = new HttpError(`${url}: expected http://host[:port]/path or https://…`);
  const separator = url.indexOf('://');
  if (separator < 0) throw invalid;
  const scheme = url.slice(0, separator).toLowerCase();
  if (scheme !== 'http' && scheme !== 'https') throw invalid;
  const rest = url.slice(separator + 3);
  const cuts = [rest.indexOf('/'), rest.indexOf('?')].filter((index) => index >= 0);
  const cut = cuts.length === 0 ? rest.length : Math.min(...cuts);
  const authority = rest.slice(0, cut);
  let path = rest.slice(cut);
  if (authority === '') throw invalid;
  if (!path.startsWith('/')) path = `/${path}`;
  return [scheme.toUpperCase(), authority, path];
}

function httpError(code, url) {
  switch (code?.tag) {
    case 'HTTP-request-denied':
      return new HttpDenied(
        `request to ${url} denied by the host (the attempt's log says why: a host outside ` +
          'allowed_hosts, an internal address, or a secret it may not carry there)',
      );
    case 'connection-refused':
      return new HttpError(`request to ${url} failed: connection refused`);
    case 'connection-timeout':
    case 'connection-read-timeout':
    case 'HTTP-response-timeout':
      return new HttpError(`request to ${url} failed: timed out`);
    case 'HTTP-response-body-size':
      return new HttpError(
        `request to ${url} failed: response body larger than the host's limit` +
          (code.val === undefined ? '' : ` of ${code.val} bytes`),
      );
    case 'DNS-error':
    case 'destination-not-found':
      return new HttpError(`request to ${url} failed: host not found`);
    default:
      return new HttpError(`request to ${url} failed: ${code?.tag ?? code}`);
  }
}

// --- SQL ---------------------------------------------------------------------------------

const SQL_ERRORS = {
  denied: 'denied',
  'read-only': 'read-only',
  'limit-exceeded': 'limit exceeded',
  'query-failed': 'query failed',
};

/** A query the host or the database refused. `kind` is "denied", "read-only",
 * "limit exceeded" or "query failed"; the message starts with it. */
export class SqlError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.kind = kind;
  }
}

/** Runs `statement` on `source` with `params` bound in order (`?` on SQLite, `$1` on
 * PostgreSQL) and returns each row as an object keyed by column name. Integers come back as
 * numbers when they fit, as BigInt otherwise. */
export function query(source, statement, params = []) {
  let rows;
  try {
    rows = hostQuery(source, statement, params.map(toValue));
  } catch (error) {
    const payload = error.payload;
    if (payload === undefined) throw error;
    throw new SqlError(SQL_ERRORS[payload.tag] ?? payload.tag, payload.val);
  }
  return rows.rows.map((row) =>
    Object.fromEntries(rows.columns.map((column, index) => [column, fromValue(row[index])])),
  );
}

function toValue(value) {
  if (value === null || value === undefined) return { tag: 'null' };
  if (typeof value === 'boolean') return { tag: 'boolean', val: value };
  if (typeof value === 'bigint') return { tag: 'int', val: value };
  if (typeof value === 'number') {
    return Number.isInteger(value) ? { tag: 'int', val: BigInt(value) } : { tag: 'float', val: value };
  }
  if (typeof value === 'string') return { tag: 'text', val: value };
  if (value instanceof Uint8Array) return { tag: 'bytes', val: value };
  return { tag: 'text', val: JSON.stringify(value) };
}

function fromValue(value) {
  switch (value.tag) {
    case 'null':
      return null;
    case 'int':
      return value.val >= BigInt(Number.MIN_SAFE_INTEGER) && value.val <= BigInt(Number.MAX_SAFE_INTEGER)
        ? Number(value.val)
        : value.val;
    case 'bytes':
      return Array.from(value.val);
    default:
      return value.val;
  }
}

// --- Redis -------------------------------------------------------------------------------

/** A read the host or Redis refused; the same kinds as SqlError. */
export class KvError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.kind = kind;
  }
}

function kvCall(name, ...args) {
  try {
    return hostKv[name](...args);
  } catch (error) {
    const payload = error.payload;
    if (payload === undefined) throw error;
    throw new KvError(SQL_ERRORS[payload.tag] ?? payload.tag, payload.val);
  }
}

const decoder = new TextDecoder();

/** Typed reads of the Redis sources granted to the check, one per read command. Keys, fields,
 * members and patterns are strings; values come back as Uint8Array. */
export const kv = {
  text: (value) => (value === undefined || value === null ? null : decoder.decode(value)),
  get: (source, key) => kvCall('get', source, key) ?? null,
  getText: (source, key) => kv.text(kv.get(source, key)),
  mget: (source, keys) => kvCall('mget', source, keys).map((value) => value ?? null),
  exists: (source, key) => kvCall('exists', source, key),
  ttl: (source, key) => Number(kvCall('ttl', source, key)),
  type: (source, key) => kvCall('type', source, key),
  hget: (source, key, field) => kvCall('hget', source, key, field) ?? null,
  hgetall: (source, key) => kvCall('hgetall', source, key),
  hmget: (source, key, fields) => kvCall('hmget', source, key, fields).map((value) => value ?? null),
  smembers: (source, key) => kvCall('smembers', source, key),
  sismember: (source, key, member) => kvCall('sismember', source, key, member),
  scard: (source, key) => Number(kvCall('scard', source, key)),
  lrange: (source, key, start, stop) => kvCall('lrange', source, key, BigInt(start), BigInt(stop)),
  llen: (source, key) => Number(kvCall('llen', source, key)),
  zrange: (source, key, start, stop) =>
    kvCall('zrange', source, key, BigInt(start), BigInt(stop)).map(({ member, score }) => [member, score]),
  zscore: (source, key, member) => kvCall('zscore', source, key, member) ?? null,
  zcard: (source, key) => Number(kvCall('zcard', source, key)),
  xrange: (source, key, start = '-', end = '+', count = 100) =>
    kvCall('xrange', source, key, start, end, count),
  xrevrange: (source, key, end = '+', start = '-', count = 100) =>
    kvCall('xrevrange', source, key, end, start, count),
  /** One page of keys: `{ cursor, keys }`; the scan is complete at cursor "0". */
  scan: (source, cursor = '0', pattern = null, count = 100) =>
    kvCall('scan', source, cursor, pattern ?? undefined, count),
};

// --- logging and secrets -----------------------------------------------------------------

export const trace = (message) => hostLog('trace', String(message));
export const debug = (message) => hostLog('debug', String(message));
export const info = (message) => hostLog('info', String(message));
export const warn = (message) => hostLog('warn', String(message));
export const error = (message) => hostLog('error', String(message));

/** The placeholder of the operator's secret `name`. The host sets the value itself, at the
 * header or query parameter the operator declared, on every request of a check granted the
 * secret to one of its hosts; the placeholder is accepted only there (elsewhere the request is
 * refused). The check never holds the value: responses are redacted before it reads them. */
export function secret(name) {
  return `{{secret:${name}}}`;
}

// --- message buses -----------------------------------------------------------------------

/** A read the host or the broker refused: the kinds of SqlError, and "window lost" when the
 * host cannot say what was published since the run started. */
export class MessagesError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.kind = kind;
  }
}

/** Reads of the message sources granted to the check. */
export const messages = {
  /** The messages on `subject` published since the run started whose JSON fields (by dotted
   * path: "user.id") and headers equal the values given, oldest first. Each has subject,
   * payload (Uint8Array), headers ([name, value] pairs), publishedAtMs, position, and
   * text() and json(). */
  find(source, subject, { jsonFields = {}, headers = {}, limit = 100 } = {}) {
    const conditions = [
      ...Object.entries(jsonFields).map(([name, value]) => ({
        tag: 'json-field',
        val: { name, equals: typeof value === 'string' ? value : JSON.stringify(value) },
      })),
      ...Object.entries(headers).map(([name, equals]) => ({ tag: 'header', val: { name, equals } })),
    ];
    let found;
    try {
      found = hostFind(source, subject, conditions, limit);
    } catch (error) {
      const payload = error.payload;
      if (payload === undefined) throw error;
      const kind = payload.tag === 'window-lost' ? 'window lost' : SQL_ERRORS[payload.tag] ?? payload.tag;
      throw new MessagesError(kind, payload.val);
    }
    return found.map((message) => ({
      ...message,
      text: () => decoder.decode(message.payload),
      json: () => JSON.parse(decoder.decode(message.payload)),
    }));
  },
};
