//! Guest SDK for Stepwise checks: a Rust check is one [`Check`] impl plus [`export_check!`].
//!
//! ```ignore
//! struct MyCheck;
//! impl stepwise_plugin::Check for MyCheck {
//!     fn describe() -> stepwise_plugin::CheckInfo { /* name, steps, params schema */ }
//!     fn run_step(input: stepwise_plugin::StepInput) -> stepwise_plugin::StepOutcome { /* ... */ }
//! }
//! stepwise_plugin::export_check!(MyCheck);
//! ```
//!
//! Step calls are at-least-once: after a host crash a step may be called again with the same
//! attempt number, so make each step idempotent (read and compare; do not write as a side
//! effect of checking).

// Generated code: its shapes follow the WIT, not our lint settings.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "stepwise:plugin/check",
        pub_export_macro: true,
        default_bindings_module: "stepwise_plugin::bindings",
        generate_all,
    });
}

pub mod http;
pub mod kv;
pub mod log;
pub mod messages;
pub mod sql;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use bindings::Guest as Check;
pub use bindings::stepwise::plugin::types::{CheckInfo, StepInfo, StepInput, StepOutcome};

/// Exports a type implementing [`Check`] as the plugin's `describe` and `run-step`.
#[macro_export]
macro_rules! export_check {
    ($check:ident) => {
        $crate::bindings::export!($check with_types_in $crate::bindings);
    };
}

impl StepInput {
    /// The run's params, deserialized.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.params).map_err(|error| format!("invalid params: {error}"))
    }

    /// Outputs of the steps that passed so far, by step name.
    pub fn outputs(&self) -> Map<String, Value> {
        serde_json::from_str(&self.outputs).unwrap_or_default()
    }

    /// The output of an earlier step, deserialized, if it passed and has that shape.
    pub fn output_of<T: DeserializeOwned>(&self, step: &str) -> Option<T> {
        self.outputs()
            .remove(step)
            .and_then(|value| serde_json::from_value(value).ok())
    }
}

/// The step passed; `output` is kept as its JSON output.
pub fn passed(output: &impl Serialize) -> StepOutcome {
    match serde_json::to_string(output) {
        Ok(json) => StepOutcome::Passed(json),
        Err(error) => StepOutcome::Failed(format!("could not serialize the step output: {error}")),
    }
}

/// Not there yet: the host asks again on the next tick.
pub fn pending(message: impl Into<String>) -> StepOutcome {
    StepOutcome::Pending(message.into())
}

/// The check's verdict: the run fails at this step.
pub fn failed(message: impl Into<String>) -> StepOutcome {
    StepOutcome::Failed(message.into())
}

/// The placeholder of the operator's secret `name` (`{{secret:NAME}}`). The host sets the
/// secret's value itself, at the header or query parameter the operator declared for it, on
/// every request of a plugin granted the secret to one of the secret's hosts; the placeholder
/// says so in the code and is accepted only at that place (anywhere else, the request is
/// refused). The plugin never holds the value: the host takes it out of every response before
/// the plugin reads it, and out of anything the plugin returns or logs.
pub fn secret(name: &str) -> String {
    format!("{{{{secret:{name}}}}}")
}
