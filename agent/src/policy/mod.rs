//! The group policy engine (DESIGN §5): the model and its validation, the schedule
//! and time-zone maths, the DNS categories, the pure compiler from desired state to
//! kernel rules, the changes the API makes and their persistence; then the pure
//! plan of an apply, the shell that executes it, and the engine that runs
//! compile → plan → execute → verify.

pub mod categories;
pub mod compile;
pub mod engine;
pub mod execute;
pub mod interfaces;
pub mod model;
pub mod ops;
pub mod persist;
pub mod plan;
pub mod schedule;
pub mod tz;
