//! The bottom layer: what every other module may use and that uses none of them —
//! the injected clock and calendar arithmetic, the shutdown signal, and (in
//! `system::process` for now) starting processes.

pub mod clock;
pub mod shutdown;
