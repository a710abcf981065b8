//! Errors at the agent's edges (command line, configuration, start-up): a message
//! with its causes, for a person to read. What `anyhow` does for the relay, in the
//! few lines the agent needs: `anyhow` also brings std's backtrace capture and its
//! symbol demangler into the binary (about 40 KB on mipsel), which a router, with
//! stripped binaries and no backtraces, cannot use.

use std::fmt;

/// A message and, after `: `, the chain of causes that led to it.
pub struct Error(String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(m: impl fmt::Display) -> Error {
        Error(m.to_string())
    }

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            let c = cause.to_string();
            // thiserror's `#[error("…: {source}")]` already shows its cause.
            if !s.ends_with(&c) {
                s.push_str(": ");
                s.push_str(&c);
            }
            next = cause.source();
        }
        s
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Any error converts, as with `?` into `anyhow::Error`; so `Error` itself cannot
/// be a `std::error::Error` (the two impls would overlap).
impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Error {
        Error(Error::chain(&e))
    }
}

/// `.context("…")` on a failing result or a missing value.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: std::error::Error> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {}", Error::chain(&e))))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {}", what(), Error::chain(&e))))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(what))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| Error::msg(what()))
    }
}

/// Returns early with a formatted [`Error`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::msg(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_shown_once_each() {
        let e: Error = Outer(std::io::Error::other("disk full")).into();
        assert_eq!(e.to_string(), "outer: disk full");
        let r: Result<()> = Err(std::io::Error::other("no such file")).context("reading x");
        assert_eq!(r.unwrap_err().to_string(), "reading x: no such file");
        let none: Option<u8> = None;
        assert_eq!(none.context("missing").unwrap_err().to_string(), "missing");
        let f = || -> Result<()> { crate::bail!("bad {}", 7) };
        assert_eq!(f().unwrap_err().to_string(), "bad 7");
    }
}
