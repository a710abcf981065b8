//! The bottom layer: what every other module may use and that uses none of them —
//! the injected clock and calendar arithmetic, the shutdown signal, giving memory
//! back to the system, private files, and the one place that starts (and signals)
//! processes.

pub mod clock;
pub mod memory;
pub mod private;
pub mod process;
pub mod shutdown;

/// A boxed future: what the seam traits return, so they stay object safe.
pub type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
