//! The relay connection: everything the agent does with the relay, and nothing of
//! what the calls it carries mean. Like `system`, an adapter to something outside:
//!
//! - [`dial`]: a TLS connection to the relay (TCP deadline, rustls), and the
//!   router's credentials for calls made outside the link;
//! - [`tls`]: how the relay is trusted (system CAs, a CA file, a pinned
//!   fingerprint) and the unset-clock check;
//! - [`identity`] and [`enroll`]: the router's id and secret, and trading a one-time
//!   token for them;
//! - [`serve`]: the link itself — the upgrade to `netpilot-link/1` and the HTTP/2
//!   server on it, handing each call to the handler it is given, with
//!   [`backoff`] between attempts;
//! - [`report`]: events sent to the relay on a fresh connection (the Wi-Fi safe
//!   apply's proof that the relay is reachable), with a fake.

pub mod backoff;
pub mod dial;
pub mod enroll;
pub mod identity;
pub mod report;
pub mod serve;
pub mod tls;
