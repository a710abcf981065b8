//! Wire types shared by the relay and the agent: the response envelope, error codes,
//! the link's paths and headers, enrollment messages and the table of routed API
//! paths. No I/O and no HTTP stack: both sides map these onto hyper themselves.

pub mod envelope;
pub mod error_code;
pub mod link;
#[cfg(feature = "pin")]
pub mod pin;
pub mod routes;

pub use envelope::{Envelope, ErrorBody, Meta};
pub use error_code::ErrorCode;
