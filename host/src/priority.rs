//! Which threads the kernel runs first when they want the CPU together: the host's before
//! plugin calls. A call's own thread runs at niceness 10, a weight about nine times smaller,
//! so that however much CPU plugins burn, the host gets most of it. Weight alone decides how
//! the CPU is shared, not how soon a waking thread gets it: the kernel (EEVDF) lets the
//! running thread finish a slice of its own first, 1.4 ms here, and a tick, a claim and a
//! reply each wake a chain of host threads. So the host's threads also ask for a short slice
//! (`sched_runtime` of a normal thread, Linux ≥ 6.12): a host thread that wakes takes the CPU
//! from a CPU-bound plugin at once. Elsewhere, or when the kernel refuses, threads stay as
//! they are.
//!
//! The epoch ticker is what stops guest code, so it must never wait for the CPU behind the
//! code it stops: a call runs its first millisecond inline on a runtime worker, at the host's
//! priority, and a CPU-bound plugin there kept the ticker (and with it the hand-off to a call
//! thread) off the CPU until the kernel's next scheduler tick, up to 7 ms (`perf sched`,
//! twenty hostile runs logging in a loop). Where the process may (root, `CAP_SYS_NICE` or an
//! `RLIMIT_RTPRIO`), the ticker runs real-time at the lowest priority: it wakes every
//! millisecond for a microsecond's work, and the kernel's real-time throttling bounds it
//! anyway.

/// The slice the host's threads ask for: the shortest the kernel allows.
#[cfg(target_os = "linux")]
const HOST_SLICE_NS: u64 = 100_000;

/// How much nicer than the host a plugin call's thread is.
#[cfg(target_os = "linux")]
const CALL_NICENESS: i32 = 10;

/// Gives the calling thread, and every thread it starts from then on (they inherit it), the
/// host's short slice. Called first thing on the main thread, before the async runtime and
/// the database's threads exist.
pub fn favour_host_threads() {
    #[cfg(target_os = "linux")]
    set_scheduling(None, HOST_SLICE_NS);
}

/// Makes the current thread one whose work may wait behind the host's, once: nicer than the
/// host (raising niceness needs no privilege), and with the kernel's default slice instead of
/// the host's short one, which it inherited from the host thread that started it. Plugin
/// calls (and compiles, which may wait too) and the message taps run on such threads.
pub(crate) fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        thread_local! {
            static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        LOWERED.with(|lowered| {
            if !lowered.replace(true) {
                set_scheduling(Some(CALL_NICENESS), 0);
            }
        });
    }
}

/// Makes the calling thread (the epoch ticker) real-time at the lowest priority if the
/// process may; returns whether it did.
#[cfg(target_os = "linux")]
pub(crate) fn make_ticker_thread_real_time() -> bool {
    let parameters = libc::sched_param { sched_priority: 1 };
    // SAFETY: a plain syscall on the calling thread (0) with a valid parameter block; on
    // failure the thread keeps its policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &parameters) == 0 }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn make_ticker_thread_real_time() -> bool {
    false
}

/// Sets the calling thread's niceness (when given) and slice (0: the kernel's default).
#[cfg(target_os = "linux")]
fn set_scheduling(niceness: Option<i32>, slice_ns: u64) {
    if !set_attributes(niceness, slice_ns)
        && let Some(niceness) = niceness
    {
        // A kernel without `sched_setattr`, or another policy: niceness alone.
        // SAFETY: a plain syscall; on Linux a thread id names one thread for `setpriority`.
        unsafe {
            let thread = libc::gettid() as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, thread, niceness);
        }
    }
}

/// `sched_setattr` on the calling thread, keeping its policy, for the normal and batch
/// policies only (whose slice this is); false if not done.
#[cfg(target_os = "linux")]
fn set_attributes(niceness: Option<i32>, slice_ns: u64) -> bool {
    const SCHED_NORMAL: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: the struct is zeroed plain data of the size the syscalls are told; thread 0 is
    // the calling thread. A failure leaves the thread as it was.
    unsafe {
        let mut attributes: libc::sched_attr = std::mem::zeroed();
        if libc::syscall(libc::SYS_sched_getattr, 0, &mut attributes, size, 0) != 0
            || !matches!(attributes.sched_policy, SCHED_NORMAL | SCHED_BATCH)
        {
            return false;
        }
        attributes.size = size;
        attributes.sched_flags = 0;
        attributes.sched_runtime = slice_ns;
        if let Some(niceness) = niceness {
            attributes.sched_nice = niceness;
        }
        libc::syscall(libc::SYS_sched_setattr, 0, &attributes, 0) == 0
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn attributes() -> libc::sched_attr {
        let size = std::mem::size_of::<libc::sched_attr>() as u32;
        // SAFETY: as in `set_attributes`.
        unsafe {
            let mut attributes: libc::sched_attr = std::mem::zeroed();
            assert_eq!(
                libc::syscall(libc::SYS_sched_getattr, 0, &mut attributes, size, 0),
                0
            );
            attributes
        }
    }

    /// A host thread's short slice is passed on to the threads it starts; a call thread is
    /// nicer than the host and gets the default slice back.
    #[test]
    fn host_threads_get_a_short_slice_and_call_threads_yield_to_them() {
        std::thread::spawn(|| {
            super::favour_host_threads();
            let host = attributes();
            let started = std::thread::spawn(attributes).join().expect("thread");
            if host.sched_runtime == super::HOST_SLICE_NS {
                assert_eq!(started.sched_runtime, super::HOST_SLICE_NS, "inherited");
            } else {
                eprintln!(
                    "SKIPPED slice checks: this kernel has no slices of normal threads (slice {})",
                    host.sched_runtime
                );
            }
            super::lower_thread_priority();
            let call = attributes();
            assert_eq!(call.sched_nice, super::CALL_NICENESS);
            assert_ne!(call.sched_runtime, super::HOST_SLICE_NS);
        })
        .join()
        .expect("the checks passed");
    }

    /// The epoch ticker is real-time where the process may be, and otherwise stays as it was.
    #[test]
    fn the_ticker_thread_is_real_time_where_the_process_may_be() {
        std::thread::spawn(|| {
            let made = super::make_ticker_thread_real_time();
            // SAFETY: a plain query of the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            if made {
                assert_eq!(policy, libc::SCHED_FIFO);
            } else {
                assert_eq!(policy, libc::SCHED_OTHER);
                eprintln!("SKIPPED the real-time check: this process may not make one");
            }
        })
        .join()
        .expect("the checks passed");
    }
}
