//! `GET /api/scan` (the devices on the network, with what the policy says of each)
//! and `GET /api/scan/router` (the router itself).

use std::sync::Arc;

use super::{AgentError, Reply};
use crate::app::App;
use crate::system::sysinfo;

/// The sources and the usage reading (the one the usage endpoints share: a stale
/// one is read again once, for all of them) side by side.
pub async fn devices(app: &Arc<App>) -> Result<Reply, AgentError> {
    let scanner = &app.scanner;
    let (gathered, usage) = tokio::join!(scanner.gather(), app.usage.for_scan());
    let now = scanner.now();
    let out = app
        .policy
        .read(|d| scanner.finish(gathered, d, usage, now))
        .await;
    scanner.mark(&out);
    Reply::ok(out)
}

/// Reading `/proc` and friends blocks; it runs off the async threads.
pub async fn router(app: &Arc<App>) -> Result<Reply, AgentError> {
    let files = app.files.clone();
    let info = tokio::task::spawn_blocking(move || sysinfo::collect(files.as_ref()))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    Reply::ok(info)
}
