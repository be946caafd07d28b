//! The WASI context every plugin gets: built from an empty `WasiCtxBuilder`, so no preopened
//! directories, no environment, no arguments and no sockets. Only clocks and randomness remain,
//! which the Rust standard library needs. Stderr is captured so that a panic message can be
//! shown with the trap it caused. The wall clock is the host's, set off by a
//! [`WallClockShift`] only while a recording is replayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostWallClock, WasiCtx, WasiCtxBuilder};

/// Bytes of guest stderr kept per step call.
const STDERR_CAPACITY: usize = 16 * 1024;

/// Builds the default-deny WASI context and the pipe that collects the guest's stderr.
pub fn wasi_context(wall_clock: WallClockShift) -> (WasiCtx, MemoryOutputPipe) {
    let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
    let ctx = WasiCtxBuilder::new()
        .stderr(stderr.clone())
        .wall_clock(wall_clock)
        .build();
    (ctx, stderr)
}

/// Milliseconds the guest's wall clock is ahead of the host's (behind when negative): zero,
/// except in a replay, whose calls see the clock their recording saw. Shared with the store,
/// which sets it before each call.
#[derive(Clone, Default)]
pub struct WallClockShift(Arc<AtomicI64>);

impl WallClockShift {
    pub fn set(&self, shift_ms: Option<i64>) {
        self.0.store(shift_ms.unwrap_or(0), Ordering::Relaxed);
    }
}

impl HostWallClock for WallClockShift {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let shift = self.0.load(Ordering::Relaxed);
        if shift >= 0 {
            now + Duration::from_millis(shift as u64)
        } else {
            now.saturating_sub(Duration::from_millis(shift.unsigned_abs()))
        }
    }
}
