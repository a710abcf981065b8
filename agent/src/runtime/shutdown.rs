//! Shutdown as a value every long-running task holds: a `watch` channel that turns
//! `true` once, when the agent stops. Tasks select on [`stopped`] beside their work
//! and return; `run` waits for them with a grace timeout.

use tokio::sync::watch;

/// What a task is given to learn that the agent stops.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once shutdown has been signalled (at once if it already was), or when
/// the sender is gone, which also means the agent stops.
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|s| *s).await;
}
