//! The group policy engine (DESIGN §5): the model and its validation, the schedule
//! and time-zone maths, the pure compiler from desired state to kernel rules, the
//! changes the API makes, their persistence, and the engine that diffs, applies
//! atomically and verifies.

pub mod compile;
pub mod dnsfilter;
pub mod engine;
pub mod interfaces;
pub mod model;
pub mod ops;
pub mod persist;
pub mod schedule;
pub mod tz;
