//! Durations on the command line and in `/etc/config/netpilot`: `250ms`, `20s`,
//! `1m30s`, `3h`, `1d`. A few lines instead of a dependency: every byte counts on the
//! router's flash, and these are the only forms the agent documents.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("{0:?}: expected a number followed by ms, s, m, h or d (e.g. 250ms, 20s, 1m30s)")]
    Malformed(String),
    #[error("{0:?} is too long")]
    Overflow(String),
}

/// Parses one or more `<integer><unit>` groups (spaces between groups allowed).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let bad = || DurationError::Malformed(text.to_owned());
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphabetic())
            .count();
        let (unit, after) = after.split_at(unit_len);
        let scale: u64 = match unit {
            "ms" => 1,
            "s" | "sec" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| DurationError::Overflow(text.to_owned()))?;
        total_ms = n
            .checked_mul(scale)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
        rest = after.trim_start();
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_forms() {
        let ms = |v| Ok(Duration::from_millis(v));
        assert_eq!(parse("250ms"), ms(250));
        assert_eq!(parse("20s"), ms(20_000));
        assert_eq!(parse("1m"), ms(60_000));
        assert_eq!(parse("1m30s"), ms(90_000));
        assert_eq!(parse("1h 30m"), ms(5_400_000));
        assert_eq!(parse(" 3h "), ms(10_800_000));
        assert_eq!(parse("1d"), ms(86_400_000));
        assert_eq!(parse("0s"), ms(0));
        assert_eq!(parse("10sec"), ms(10_000));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        for bad in ["20", "s", "1.5s", "-1s", "1 s", "5 minutes", "1x", "1s!"] {
            assert!(
                matches!(parse(bad), Err(DurationError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse("18446744073709551615d"),
            Err(DurationError::Overflow(_))
        ));
    }
}
