//! The one `bindgen!` of the host: Rust types and traits for the `stepwise:plugin/check` world.
//! Only `runtime` and `capabilities` use them; the runner sees `model` types.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "stepwise:plugin/check",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
    },
    require_store_data_send: true,
    // Recordings keep what each call asked and was answered (`capabilities::recording`).
    additional_derives: [serde::Serialize, serde::Deserialize],
});

pub use stepwise::plugin::{kv, log, messages, sql, types};
