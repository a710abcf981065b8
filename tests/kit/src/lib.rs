//! Test support shared by the agent's unit tests, the integration tests
//! (`netpilot-tests`) and the benches. It depends on no NetPilot crate, so the
//! agent can use it as a dev-dependency.
//!
//! - [`netns`]: throwaway network namespaces, and the `netns_` marker convention
//!   with the one check of what such a test needs (root, tools).
//! - [`rng`]: the one deterministic generator for generated test inputs.

pub mod netns;
pub mod rng;

pub use netns::{require, Netns};
pub use rng::XorShift;
