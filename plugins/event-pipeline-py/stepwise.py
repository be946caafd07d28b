"""Helpers for a Stepwise check written in Python (built with componentize-py).

The host grants a check four capabilities and nothing else: outbound HTTP to the hosts in its
grant, SQL queries, typed Redis reads and message reads on the sources in its grant, and log
lines stored with the attempt.
This module wraps them, and the WIT types, in plain Python:

    params(input), outputs(input)       the run's params and earlier steps' outputs, as dicts
    passed(value), pending(msg), failed(msg)   a step's outcome
    get(url), request(method, url, ...)  HTTP; raises HttpDenied when the grant refuses the host
    query(source, statement, params)    SQL with bound parameters; rows as dicts
    kv.get(source, key), kv.hgetall(...)   typed Redis reads; values as bytes (kv.text for str)
    messages.find(source, subject, json_fields={...}, headers={...})
                                        what was published on a bus since the run started
    info(msg), warn(msg), ...           log lines
    secret(name)                        the placeholder the host replaces with a secret
"""

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from componentize_py_types import Err
from wit_world.imports import kv as _kv
from wit_world.imports import log as _log
from wit_world.imports import messages as _messages
from wit_world.imports import outgoing_handler as _outgoing
from wit_world.imports import sql as _sql
from wit_world.imports import streams as _streams
from wit_world.imports import wasi_http_types as _http
from wit_world.imports.stepwise_plugin_types import (
    CheckInfo,
    StepInfo,
    StepInput,
    StepOutcome,
    StepOutcome_Failed,
    StepOutcome_Passed,
    StepOutcome_Pending,
)

__all__ = [
    "CheckInfo", "StepInfo", "StepInput", "StepOutcome",
    "check_info", "step", "params", "outputs", "output_of",
    "passed", "pending", "failed",
    "Response", "HttpError", "HttpDenied", "get", "request",
    "SqlError", "query", "KvError", "kv", "MessagesError", "Message", "messages",
    "trace", "debug", "info", "warn", "error", "secret",
]


# --- describing the check -----------------------------------------------------------------

def step(name: str, description: str, timeout_ms: Optional[int] = None,
         max_attempts: Optional[int] = None) -> StepInfo:
    """One step: `timeout_ms` is how long it may stay pending, `max_attempts` how often."""
    return StepInfo(name, description, timeout_ms, max_attempts)


def check_info(name: str, version: str, description: str, steps: List[StepInfo],
               params_schema: Optional[Dict[str, Any]] = None) -> CheckInfo:
    """What `describe` returns; `params_schema` is a JSON Schema the host checks params against."""
    schema = None if params_schema is None else json.dumps(params_schema)
    return CheckInfo(name, version, description, steps, schema)


# --- a step's input and outcome -----------------------------------------------------------

def params(input: StepInput) -> Dict[str, Any]:
    """The run's params (a dict when the trigger sent an object)."""
    return json.loads(input.params)


def outputs(input: StepInput) -> Dict[str, Any]:
    """Step name -> output of every step that passed so far in this run."""
    return json.loads(input.outputs)


def output_of(input: StepInput, step_name: str) -> Any:
    """The output of the earlier step `step_name`, or None if it has not passed."""
    return outputs(input).get(step_name)


def passed(output: Any = None) -> StepOutcome:
    """The step passed; `output` (any JSON value) is kept and shown to the following steps."""
    return StepOutcome_Passed(json.dumps(output, separators=(",", ":"), sort_keys=True))


def pending(message: str) -> StepOutcome:
    """Not there yet: the host asks again on the next tick, until the step's timeout."""
    return StepOutcome_Pending(message)


def failed(message: str) -> StepOutcome:
    """The check's verdict: the step and the run fail."""
    return StepOutcome_Failed(message)


# --- HTTP ---------------------------------------------------------------------------------

class HttpError(Exception):
    """A request that got no response: connection, protocol or limit errors."""


class HttpDenied(HttpError):
    """The host refused the request: its host is not in the grant, or it is internal."""


class Response:
    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise HttpError(f"response body is not the expected JSON: {error}") from None

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)


def get(url: str) -> Response:
    """`GET url`."""
    return request("GET", url)


_METHODS = {
    "GET": _http.Method_Get, "HEAD": _http.Method_Head, "POST": _http.Method_Post,
    "PUT": _http.Method_Put, "DELETE": _http.Method_Delete, "PATCH": _http.Method_Patch,
    "OPTIONS": _http.Method_Options,
}


def request(method: str, url: str, headers: Sequence[Tuple[str, str]] = (),
            body: Optional[bytes] = None) -> Response:
    """Sends one request and reads the whole response (the host caps its size and time)."""
    scheme, authority, path = _split_url(url)
    fields = _http.Fields()
    for name, value in headers:
        fields.append(name, value.encode())
    outgoing = _http.OutgoingRequest(fields)
    method_class = _METHODS.get(method.upper())
    outgoing.set_method(method_class() if method_class else _http.Method_Other(method.upper()))
    outgoing.set_scheme(scheme)
    outgoing.set_authority(authority)
    outgoing.set_path_with_query(path)
    outgoing_body = outgoing.body() if body is not None else None
    try:
        future = _outgoing.handle(outgoing, None)
        if outgoing_body is not None:
            with outgoing_body.write() as stream:
                for start in range(0, len(body), 4096):
                    stream.blocking_write_and_flush(body[start:start + 4096])
            _http.OutgoingBody.finish(outgoing_body, None)
    except Err as error:
        raise _http_error(error.value, url) from None
    future.subscribe().block()
    answer = future.get()
    if answer is None or isinstance(answer, Err) or isinstance(answer.value, Err):
        code = answer.value.value if answer is not None and not isinstance(answer, Err) else None
        if code is None:
            raise HttpError(f"request to {url}: no response")
        raise _http_error(code, url)
    response = answer.value.value
    status = response.status()
    response_headers = [(name, value.decode("utf-8", errors="replace"))
                        for name, value in response.headers().entries()]
    incoming = response.consume()
    chunks = []
    with incoming.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(64 * 1024))
            except Err as error:
                if isinstance(error.value, _streams.StreamError_Closed):
                    break
                code = _http.http_error_code(error.value.value)
                if code is None:
                    raise HttpError(f"reading the response from {url}: "
                                    f"{error.value.value.to_debug_string()}") from None
                raise _http_error(code, url) from None
    _http.IncomingBody.finish(incoming)
    return Response(status, response_headers, b"".join(chunks))


def _split_url(url: str):
    invalid = HttpError(f"{url}: expected http://host[:port]/path or https://…")
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise invalid
    schemes = {"http": _http.Scheme_Http, "https": _http.Scheme_Https}
    if scheme.lower() not in schemes:
        raise invalid
    cut = min((index for index in (rest.find("/"), rest.find("?")) if index >= 0),
              default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise invalid
    if not path.startswith("/"):
        path = "/" + path
    return schemes[scheme.lower()](), authority, path


def _http_error(code: Any, url: str) -> HttpError:
    if isinstance(code, _http.ErrorCode_HttpRequestDenied):
        return HttpDenied(
            f"request to {url} denied by the host (the attempt's log says why: a host outside "
            "allowed_hosts, an internal address, or a secret it may not carry there)")
    if isinstance(code, _http.ErrorCode_ConnectionRefused):
        what = "connection refused"
    elif isinstance(code, (_http.ErrorCode_ConnectionTimeout, _http.ErrorCode_ConnectionReadTimeout,
                           _http.ErrorCode_HttpResponseTimeout)):
        what = "timed out"
    elif isinstance(code, _http.ErrorCode_HttpResponseBodySize):
        what = ("response body larger than the host's limit" if code.value is None
                else f"response body larger than the host's limit of {code.value} bytes")
    elif isinstance(code, (_http.ErrorCode_DnsError, _http.ErrorCode_DestinationNotFound)):
        what = "host not found"
    else:
        what = type(code).__name__.removeprefix("ErrorCode_")
    return HttpError(f"request to {url} failed: {what}")


# --- SQL ----------------------------------------------------------------------------------

class _Refused(Exception):
    """What a source refused: `kind`, then the host's words; str(error) starts with the kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class SqlError(_Refused):
    """A query the host or the database refused. `kind` is "denied", "read-only",
    "limit exceeded" or "query failed"."""


_SQL_ERRORS = {
    _sql.SqlError_Denied: "denied",
    _sql.SqlError_ReadOnly: "read-only",
    _sql.SqlError_LimitExceeded: "limit exceeded",
    _sql.SqlError_QueryFailed: "query failed",
}


def query(source: str, statement: str, params: Sequence[Any] = ()) -> List[Dict[str, Any]]:
    """Runs `statement` on `source` with `params` bound in order (`?` on SQLite, `$1` on
    PostgreSQL) and returns each row as a dict keyed by column name."""
    try:
        rows = _sql.query(source, statement, [_to_value(param) for param in params])
    except Err as error:
        raise SqlError(_SQL_ERRORS[type(error.value)], error.value.value) from None
    return [dict(zip(rows.columns, map(_from_value, row))) for row in rows.rows]


def _to_value(value: Any) -> _sql.Value:
    if value is None:
        return _sql.Value_Null()
    if isinstance(value, bool):
        return _sql.Value_Boolean(value)
    if isinstance(value, int):
        return _sql.Value_Int(value)
    if isinstance(value, float):
        return _sql.Value_Float(value)
    if isinstance(value, (bytes, bytearray)):
        return _sql.Value_Bytes(bytes(value))
    if isinstance(value, str):
        return _sql.Value_Text(value)
    return _sql.Value_Text(json.dumps(value))


def _from_value(value: _sql.Value) -> Any:
    if isinstance(value, _sql.Value_Null):
        return None
    if isinstance(value, _sql.Value_Bytes):
        return list(value.value)
    return value.value


# --- Redis --------------------------------------------------------------------------------

class KvError(_Refused):
    """A read the host or Redis refused; the same kinds as SqlError ("denied", "read-only",
    "limit exceeded", "query failed")."""


_KV_ERRORS = {
    _kv.KvError_Denied: "denied",
    _kv.KvError_ReadOnly: "read-only",
    _kv.KvError_LimitExceeded: "limit exceeded",
    _kv.KvError_QueryFailed: "query failed",
}


def _kv_call(function, *args):
    try:
        return function(*args)
    except Err as error:
        raise KvError(_KV_ERRORS[type(error.value)], error.value.value) from None


class _Kv:
    """Typed reads of the Redis sources granted to the check, one per read command. Keys,
    fields, members and patterns are str; values come back as bytes."""

    @staticmethod
    def text(value: Optional[bytes]) -> Optional[str]:
        return None if value is None else bytes(value).decode("utf-8", "replace")

    def get(self, source: str, key: str) -> Optional[bytes]:
        return _kv_call(_kv.get, source, key)

    def get_text(self, source: str, key: str) -> Optional[str]:
        return self.text(self.get(source, key))

    def mget(self, source: str, keys: Sequence[str]) -> List[Optional[bytes]]:
        return _kv_call(_kv.mget, source, list(keys))

    def exists(self, source: str, key: str) -> bool:
        return _kv_call(_kv.exists, source, key)

    def ttl(self, source: str, key: str) -> int:
        return _kv_call(_kv.ttl, source, key)

    def type(self, source: str, key: str) -> str:
        return _kv_call(getattr(_kv, "type"), source, key)

    def hget(self, source: str, key: str, field: str) -> Optional[bytes]:
        return _kv_call(_kv.hget, source, key, field)

    def hgetall(self, source: str, key: str) -> Dict[bytes, bytes]:
        return dict(_kv_call(_kv.hgetall, source, key))

    def hmget(self, source: str, key: str, fields: Sequence[str]) -> List[Optional[bytes]]:
        return _kv_call(_kv.hmget, source, key, list(fields))

    def smembers(self, source: str, key: str) -> List[bytes]:
        return _kv_call(_kv.smembers, source, key)

    def sismember(self, source: str, key: str, member: str) -> bool:
        return _kv_call(_kv.sismember, source, key, member)

    def scard(self, source: str, key: str) -> int:
        return _kv_call(_kv.scard, source, key)

    def lrange(self, source: str, key: str, start: int, stop: int) -> List[bytes]:
        return _kv_call(_kv.lrange, source, key, start, stop)

    def llen(self, source: str, key: str) -> int:
        return _kv_call(_kv.llen, source, key)

    def zrange(self, source: str, key: str, start: int, stop: int) -> List[Tuple[bytes, float]]:
        return [(item.member, item.score) for item in _kv_call(_kv.zrange, source, key, start, stop)]

    def zscore(self, source: str, key: str, member: str) -> Optional[float]:
        return _kv_call(_kv.zscore, source, key, member)

    def zcard(self, source: str, key: str) -> int:
        return _kv_call(_kv.zcard, source, key)

    def xrange(self, source: str, key: str, start: str = "-", end: str = "+",
               count: int = 100) -> List[Tuple[str, Dict[bytes, bytes]]]:
        entries = _kv_call(_kv.xrange, source, key, start, end, count)
        return [(entry.id, dict(entry.fields)) for entry in entries]

    def xrevrange(self, source: str, key: str, end: str = "+", start: str = "-",
                  count: int = 100) -> List[Tuple[str, Dict[bytes, bytes]]]:
        entries = _kv_call(_kv.xrevrange, source, key, end, start, count)
        return [(entry.id, dict(entry.fields)) for entry in entries]

    def scan(self, source: str, cursor: str = "0", pattern: Optional[str] = None,
             count: int = 100) -> Tuple[str, List[bytes]]:
        """One page of keys: (next cursor, keys); the scan is complete at cursor "0"."""
        page = _kv_call(_kv.scan, source, cursor, pattern, count)
        return page.cursor, page.keys


kv = _Kv()


# --- message buses ------------------------------------------------------------------------

class MessagesError(_Refused):
    """A read the host or the broker refused: the kinds of SqlError, and "window lost" when the
    host cannot say what was published since the run started."""


_MESSAGES_ERRORS = {
    _messages.MessagesError_Denied: "denied",
    _messages.MessagesError_ReadOnly: "read-only",
    _messages.MessagesError_LimitExceeded: "limit exceeded",
    _messages.MessagesError_QueryFailed: "query failed",
    _messages.MessagesError_WindowLost: "window lost",
}


class Message:
    """One message: subject, payload (bytes), headers (name, value) pairs, published_at_ms
    and position (the stream sequence, or the tap's count)."""

    def __init__(self, message: _messages.Message):
        self.subject = message.subject
        self.payload = bytes(message.payload)
        self.headers = list(message.headers)
        self.published_at_ms = message.published_at_ms
        self.position = message.position

    def text(self) -> Optional[str]:
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def json(self) -> Any:
        return json.loads(self.payload)

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _Messages:
    """Reads of the message sources granted to the check."""

    def find(self, source: str, subject: str, json_fields: Optional[Dict[str, Any]] = None,
             headers: Optional[Dict[str, str]] = None, limit: int = 100) -> List[Message]:
        """The messages on `subject` published since the run started whose JSON fields (by
        dotted path: "user.id") and headers equal the values given, oldest first."""
        conditions = []
        for path, value in (json_fields or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            conditions.append(_messages.Condition_JsonField(_messages.FieldEquals(path, text)))
        for name, value in (headers or {}).items():
            conditions.append(_messages.Condition_Header(_messages.FieldEquals(name, value)))
        try:
            found = _messages.find(source, subject, conditions, limit)
        except Err as error:
            raise MessagesError(_MESSAGES_ERRORS[type(error.value)], error.value.value) from None
        return [Message(message) for message in found]


messages = _Messages()


# --- logging and secrets ------------------------------------------------------------------

def trace(message: str) -> None:
    _log.log(_log.Level.TRACE, message)


def debug(message: str) -> None:
    _log.log(_log.Level.DEBUG, message)


def info(message: str) -> None:
    _log.log(_log.Level.INFO, message)


def warn(message: str) -> None:
    _log.log(_log.Level.WARN, message)


def error(message: str) -> None:
    _log.log(_log.Level.ERROR, message)


def secret(name: str) -> str:
    """The placeholder of the operator's secret `name`. The host sets the value itself, at the
    header or query parameter the operator declared, on every request of a check granted the
    secret to one of its hosts; the placeholder is accepted only there (elsewhere the request
    is refused). The check never holds the value: responses are redacted before it reads them."""
    return "{{secret:" + name + "}}"
