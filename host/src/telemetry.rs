//! The tracing subscriber on stderr, filtered by `STEPWISE_LOG` (default `info`): one line per
//! record, plain text (coloured only on a terminal, so log files hold no escape codes), or one
//! JSON object per line with `STEPWISE_LOG_FORMAT=json` for log shippers.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, also OpenTelemetry traces over OTLP/HTTP (README, "Traces"):
//! a span per run, per tick and per step call. A run's ticks may run on several nodes and
//! hours apart, so no process holds a run's span open: its trace id is the run id (a UUID is
//! 16 bytes, as a trace id) and its span id comes from the run id too, so that every tick, on
//! any node, names the same parent; the runner reports the run span itself, with the run's
//! own start and end times, when the run finishes. Without the variable there is no exporter,
//! no OpenTelemetry layer, and the helpers below return at once.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::model::{RunId, RunStatus, UnixMillis};

/// The target of the spans that are exported; nothing else (sqlx, hyper …) is.
pub const TARGET: &str = "stepwise::trace";

/// The exporter, while there is one: kept to flush it at exit.
static TRACING: OnceLock<(SdkTracerProvider, Tracer)> = OnceLock::new();

pub fn init() {
    let filter = EnvFilter::try_from_env("STEPWISE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("STEPWISE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            eprintln!("warning: STEPWISE_LOG_FORMAT={other:?} is not text or json; using text");
            false
        }
    };
    let format = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let format = if json {
        format.json().flatten_event(true).boxed()
    } else {
        format.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    let traces = exporter().map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.target() == TARGET
            }))
    });
    // A second init (tests start several servers in one process) is harmless; ignore it.
    let _ = tracing_subscriber::registry()
        .with(traces)
        .with(format.with_filter(filter))
        .try_init();
}

/// The OTLP/HTTP exporter of `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is added), in
/// protobuf, or JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`.
fn exporter() -> Option<Tracer> {
    std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|value| !value.is_empty())?;
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => {
            eprintln!(
                "warning: OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (http/protobuf or http/json); using http/protobuf"
            );
            Protocol::HttpBinary
        }
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("warning: no OpenTelemetry traces: {error}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("stepwise").build())
        .build();
    let tracer = provider.tracer("stepwise");
    let _ = TRACING.set((provider, tracer.clone()));
    Some(tracer)
}

/// Sends the spans still buffered; at exit.
pub fn shutdown() {
    if let Some((provider, _)) = TRACING.get()
        && let Err(error) = provider.shutdown()
    {
        eprintln!("warning: flushing OpenTelemetry traces: {error}");
    }
}

/// The run's span, as every tick's parent: a remote parent, as it may live on another node.
pub fn run_context(run: &RunId) -> Option<Context> {
    TRACING.get()?;
    Some(Context::new().with_remote_span_context(run_span_context(run)?))
}

fn run_span_context(run: &RunId) -> Option<SpanContext> {
    let id = uuid::Uuid::parse_str(run.as_str()).ok()?;
    let bytes = id.as_bytes();
    let span_id: [u8; 8] = bytes[8..].try_into().ok()?;
    Some(SpanContext::new(
        TraceId::from_bytes(*bytes),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// The W3C `traceparent` of `span`, for the requests a step call sends: the system under
/// check joins the run's trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    TRACING.get()?;
    let context = span.context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Reports the span of a run that just finished, from its creation to `finished_at`, with its
/// status: `passed` is OK, any other end an error with the run's message.
pub fn run_finished(
    run: &RunId,
    plugin: &str,
    status: RunStatus,
    message: Option<&str>,
    created_at: UnixMillis,
    finished_at: UnixMillis,
) {
    let Some((_, tracer)) = TRACING.get() else {
        return;
    };
    let Some(context) = run_span_context(run) else {
        return;
    };
    let time = |millis: UnixMillis| UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    let mut span = tracer
        .span_builder("run")
        .with_trace_id(context.trace_id())
        .with_span_id(context.span_id())
        .with_kind(SpanKind::Internal)
        .with_start_time(time(created_at))
        .with_attributes([
            KeyValue::new("stepwise.run_id", run.to_string()),
            KeyValue::new("stepwise.plugin", plugin.to_owned()),
            KeyValue::new("stepwise.status", status.as_str()),
        ])
        .start_with_context(tracer, &Context::new());
    span.set_status(if status == RunStatus::Passed {
        Status::Ok
    } else {
        Status::error(message.unwrap_or(status.as_str()).to_owned())
    });
    span.end_with_timestamp(time(finished_at));
}
