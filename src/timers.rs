//! Where streamgate's timers run.
//!
//! Every deadline streamgate keeps (the layers' idle and keepalive timers, the proxy's timeouts,
//! hyper's) is a tokio timer. By default it belongs to the runtime it is created on, which then
//! needs `enable_time`. [`spawn_thread`] moves them all to a thread of their own instead, so that
//! the runtime that serves the traffic can be built with `enable_io` alone:
//!
//! ```no_run
//! streamgate::timers::spawn_thread().expect("timer thread");
//! let rt = tokio::runtime::Builder::new_current_thread()
//!     .enable_io()
//!     .build()
//!     .unwrap();
//! ```
//!
//! Why: a runtime with a time driver runs it every time it parks, before and after waiting for
//! its sockets, whether a timer is due or not (its lock, a scan of the timer wheel, clock reads).
//! When a proxy relays a stream as fast as it comes, it parks once per read-and-write cycle, and
//! callgrind counts that work at about 500 instructions per cycle: a seventh of all the proxy does
//! per event. On a thread of their own, timers cost the serving thread nothing while none is due;
//! one that fires wakes its task across threads (a few microseconds), which happens when a stream
//! times out or a heartbeat is due, not per event.
//!
//! [`spawn_thread`] is for the whole process, and for good:
//! - Only timers created through streamgate follow it: other code on a runtime without
//!   `enable_time` that calls `tokio::time` panics, as tokio documents.
//! - Paused time (`tokio::time::pause`, `start_paused`) no longer drives streamgate's timers, in
//!   any runtime of the process.
//! - The thread runs until the process exits. Should it ever stop (a waker that panics as a timer
//!   fires), the process aborts rather than leave every later timer failing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Interval, Sleep, Timeout};

static THREAD: OnceLock<Handle> = OnceLock::new();
/// Held while the thread starts, so that one process starts one.
static STARTING: Mutex<()> = Mutex::new(());

/// Starts the timer thread, once per process; later calls return at once. From then on the
/// timers streamgate creates run there, whatever runtime creates and polls them.
///
/// Fails only if the thread or its runtime cannot be created.
pub fn spawn_thread() -> std::io::Result<()> {
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if THREAD.get().is_some() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("streamgate-timers".into())
        // The driver fires timers only while the runtime is blocked on something: forever.
        .spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(std::future::pending::<()>())
            }));
            eprintln!("streamgate: the timer thread stopped; aborting");
            std::process::abort();
        })?;
    let _ = THREAD.set(handle);
    Ok(())
}

/// Runs `f`, which creates tokio timers, in the context that owns them: the timer thread's
/// runtime once started, else the caller's.
fn within<R>(f: impl FnOnce() -> R) -> R {
    match THREAD.get() {
        Some(h) => {
            let _in = h.enter();
            f()
        }
        None => f(),
    }
}

/// [`tokio::time::sleep`] on streamgate's timers.
pub(crate) fn sleep(d: Duration) -> Sleep {
    within(|| tokio::time::sleep(d))
}

/// [`tokio::time::sleep_until`] on streamgate's timers.
pub(crate) fn sleep_until(deadline: Instant) -> Sleep {
    within(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`] on streamgate's timers.
pub(crate) fn timeout<F: Future>(d: Duration, f: F) -> Timeout<F> {
    within(|| tokio::time::timeout(d, f))
}

/// [`tokio::time::interval`] on streamgate's timers.
pub(crate) fn interval(period: Duration) -> Interval {
    within(|| tokio::time::interval(period))
}

/// hyper's [`Timer`](hyper::rt::Timer) on streamgate's timers: what
/// [`TokioTimer`](hyper_util::rt::TokioTimer) does, in the context [`spawn_thread`] chose.
#[derive(Clone, Copy, Debug, Default)]
pub struct HyperTimer;

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        within(|| hyper_util::rt::TokioTimer::new().sleep(d))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        within(|| hyper_util::rt::TokioTimer::new().sleep_until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        // A tokio `Sleep` keeps the driver it was made on: resetting needs no context.
        hyper_util::rt::TokioTimer::new().reset(sleep, new_deadline);
    }

    fn now(&self) -> std::time::Instant {
        hyper_util::rt::TokioTimer::new().now()
    }
}
