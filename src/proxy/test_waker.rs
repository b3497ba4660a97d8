//! A waker that counts its wake-ups, for the unit tests of the proxy's own wakers and watches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Wake;

/// Counts how many times it was woken (`.0`).
pub(crate) struct Count(pub(crate) AtomicUsize);

impl Count {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Count(AtomicUsize::new(0)))
    }
}

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
