//! Graceful shutdown: one cancellation token plus a task tracker.
//!
//! Drain order: stop accepting → end live sessions (each seals its recording and emits its
//! end event) → wait for the tracked tasks → flush the SIEM sink → exit.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the accept loops and every session task.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled once when the gateway starts draining.
    pub token: CancellationToken,
    /// Tracks session tasks so `run` can wait for them to seal their recordings.
    pub tracker: TaskTracker,
}

impl Shutdown {
    /// Creates a fresh, not-yet-cancelled shutdown handle.
    pub fn new() -> Self {
        Self::default()
    }
}
