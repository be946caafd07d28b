//! The WASI context every plugin gets: built from an empty `WasiCtxBuilder`, so no preopened
//! directories, no environment, no arguments and no sockets. Only clocks and randomness remain,
//! which the Rust standard library needs. Stderr is captured so that a panic message can be
//! shown with the trap it caused.

use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Bytes of guest stderr kept per step call.
const STDERR_CAPACITY: usize = 16 * 1024;

/// Builds the default-deny WASI context and the pipe that collects the guest's stderr.
pub fn wasi_context() -> (WasiCtx, MemoryOutputPipe) {
    let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
    let ctx = WasiCtxBuilder::new().stderr(stderr.clone()).build();
    (ctx, stderr)
}
