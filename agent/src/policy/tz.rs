//! The router's time zone: OpenWrt keeps a POSIX TZ string (`CET-1CEST,M3.5.0,M10.5.0/3`)
//! in UCI `system.@system[0].timezone` and `/etc/TZ`; there is no zoneinfo database
//! on the router. This parses such strings and answers the two questions schedules
//! need: the UTC offset at an instant, and when it next changes.

use std::fmt;

use crate::runtime::clock::days_from_civil;
use crate::system::files::Files;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid POSIX TZ {tz:?}: {why}")]
pub struct TzError {
    pub tz: String,
    pub why: String,
}

/// A day rule: `Jn` (1–365, Feb 29 never counted), `n` (0–365), `Mm.w.d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Day {
    Julian1(u16),
    Julian0(u16),
    Month { month: u8, week: u8, weekday: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    day: Day,
    /// Local time of the change, seconds after midnight (may be negative or > 24 h).
    time: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    text: String,
    /// Seconds east of UTC in standard time.
    std: i32,
    /// Daylight saving time: offset east, start rule, end rule.
    dst: Option<(i32, Rule, Rule)>,
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn number(&mut self, max: u32) -> Option<u32> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let v: u32 = std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()?;
        (self.i > start && v <= max).then_some(v)
    }

    fn name(&mut self) -> Result<(), String> {
        if self.eat(b'<') {
            let start = self.i;
            while self
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'-')
            {
                self.i += 1;
            }
            if self.i - start < 3 || !self.eat(b'>') {
                return Err("a <quoted> name needs at least 3 letters, digits or signs".into());
            }
        } else {
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                self.i += 1;
            }
            if self.i - start < 3 {
                return Err("a zone name needs at least 3 letters".into());
            }
        }
        Ok(())
    }

    /// `[+-]hh[:mm[:ss]]` in seconds.
    fn hms(&mut self, max_hours: u32) -> Option<i32> {
        let sign = if self.eat(b'-') {
            -1
        } else {
            self.eat(b'+');
            1
        };
        let h = self.number(max_hours)?;
        let mut secs = h * 3600;
        if self.eat(b':') {
            secs += self.number(59)? * 60;
            if self.eat(b':') {
                secs += self.number(59)?;
            }
        }
        Some(sign * secs as i32)
    }

    fn rule(&mut self) -> Option<Rule> {
        let day = if self.eat(b'J') {
            Day::Julian1(self.number(365).filter(|n| *n >= 1)? as u16)
        } else if self.eat(b'M') {
            let month = self.number(12).filter(|n| *n >= 1)? as u8;
            if !self.eat(b'.') {
                return None;
            }
            let week = self.number(5).filter(|n| *n >= 1)? as u8;
            if !self.eat(b'.') {
                return None;
            }
            let weekday = self.number(6)? as u8;
            Day::Month {
                month,
                week,
                weekday,
            }
        } else {
            Day::Julian0(self.number(365)? as u16)
        };
        // POSIX 2024 allows -167..167 hours here.
        let time = if self.eat(b'/') { self.hms(167)? } else { 7200 };
        Some(Rule { day, time })
    }
}

impl Zone {
    pub fn utc() -> Zone {
        Zone {
            text: "UTC0".into(),
            std: 0,
            dst: None,
        }
    }

    pub fn parse(text: &str) -> Result<Zone, TzError> {
        let err = |why: &str| TzError {
            tz: text.to_owned(),
            why: why.to_owned(),
        };
        let t = text.trim();
        if t.is_empty() || t.len() > 128 || t.starts_with(':') {
            return Err(err(
                "expected a POSIX TZ string like CET-1CEST,M3.5.0,M10.5.0/3",
            ));
        }
        let mut c = Cursor {
            s: t.as_bytes(),
            i: 0,
        };
        c.name().map_err(|w| err(&w))?;
        // POSIX offsets count west; the rest of the agent counts east.
        let std = -c
            .hms(24)
            .ok_or_else(|| err("the standard offset is missing or out of range"))?;
        let mut dst = None;
        if c.peek().is_some() {
            c.name().map_err(|w| err(&w))?;
            let offset = if matches!(c.peek(), Some(b'+' | b'-' | b'0'..=b'9')) {
                -c.hms(24)
                    .ok_or_else(|| err("the DST offset is out of range"))?
            } else {
                std + 3600
            };
            let (start, end) = if c.eat(b',') {
                let start = c
                    .rule()
                    .ok_or_else(|| err("the DST start rule is invalid"))?;
                if !c.eat(b',') {
                    return Err(err("the DST end rule is missing"));
                }
                let end = c.rule().ok_or_else(|| err("the DST end rule is invalid"))?;
                (start, end)
            } else {
                // No rule: the US rules, as glibc assumes.
                let m = |month, week| Rule {
                    day: Day::Month {
                        month,
                        week,
                        weekday: 0,
                    },
                    time: 7200,
                };
                (m(3, 2), m(11, 1))
            };
            dst = Some((offset, start, end));
        }
        if c.peek().is_some() {
            return Err(err("unexpected text after the rules"));
        }
        Ok(Zone {
            text: t.to_owned(),
            std,
            dst,
        })
    }

    /// The changes in `year`: (instant, offset from then on), in time order.
    fn transitions(&self, year: i64) -> Vec<(i64, i32)> {
        let Some((dst, start, end)) = self.dst else {
            return Vec::new();
        };
        // The start is given in standard time, the end in daylight time.
        let on = rule_local(year, start) - self.std as i64;
        let off = rule_local(year, end) - dst as i64;
        // Southern zones end DST before they start it in the calendar year.
        if on <= off {
            vec![(on, dst), (off, self.std)]
        } else {
            vec![(off, self.std), (on, dst)]
        }
    }

    /// Seconds east of UTC in force at `unix`.
    pub fn offset_at(&self, unix: i64) -> i32 {
        if self.dst.is_none() {
            return self.std;
        }
        let year = year_of(unix);
        let mut current = None;
        for y in [year - 1, year, year + 1] {
            for (t, off) in self.transitions(y) {
                if t <= unix {
                    current = Some(off);
                }
            }
        }
        current.unwrap_or(self.std)
    }

    /// The first instant after `after` at which the offset changes.
    pub fn next_transition(&self, after: i64) -> Option<i64> {
        self.dst?;
        let year = year_of(after);
        let mut offset = self.offset_at(after);
        for y in [year - 1, year, year + 1, year + 2] {
            for (t, off) in self.transitions(y) {
                if t > after && off != offset {
                    return Some(t);
                }
                if t > after {
                    offset = off;
                }
            }
        }
        None
    }
}

/// Local midnight-based seconds of a rule in `year`, as if local time were UTC.
fn rule_local(year: i64, rule: Rule) -> i64 {
    let day = match rule.day {
        Day::Julian1(n) => {
            // Feb 29 is never counted: day 60 is always March 1.
            let n = n as i64;
            let extra = i64::from(is_leap(year) && n >= 60);
            days_from_civil(year, 1, 1) + n - 1 + extra
        }
        Day::Julian0(n) => days_from_civil(year, 1, 1) + n as i64,
        Day::Month {
            month,
            week,
            weekday,
        } => {
            let first = days_from_civil(year, month as i64, 1);
            let first_dow = (first + 4).rem_euclid(7);
            let mut day =
                first + (weekday as i64 - first_dow).rem_euclid(7) + (week as i64 - 1) * 7;
            let next_month = if month == 12 {
                days_from_civil(year + 1, 1, 1)
            } else {
                days_from_civil(year, month as i64 + 1, 1)
            };
            while day >= next_month {
                day -= 7;
            }
            day
        }
    };
    day * 86_400 + rule.time as i64
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn year_of(unix: i64) -> i64 {
    // Close enough to pick the neighbouring years to look at.
    1970 + unix.div_euclid(31_556_952)
}

/// The router's zone: the override, else UCI `system.timezone`, else `/etc/TZ`,
/// else UTC. A present but invalid setting is an error (schedules would be wrong).
pub fn router_zone(files: &dyn Files, override_tz: Option<&str>) -> Result<Zone, TzError> {
    if let Some(tz) = override_tz {
        return Zone::parse(tz);
    }
    if let Ok(text) = files.read_to_string("/etc/config/system") {
        if let Ok(sections) = crate::uci_format::parse(&text) {
            if let Some(tz) = sections
                .iter()
                .find(|s| s.kind == "system")
                .and_then(|s| s.get("timezone"))
            {
                return Zone::parse(tz);
            }
        }
    }
    match files.read_to_string("/etc/TZ") {
        Ok(tz) if !tz.trim().is_empty() => Zone::parse(tz.trim()),
        _ => Ok(Zone::utc()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::files::MemFiles;

    fn at(y: i64, m: i64, d: i64, h: i64, min: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60
    }

    #[test]
    fn berlin_switches_on_the_last_sundays_at_the_right_utc_instants() {
        let z = Zone::parse("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        // 2027: summer time from Sunday 28 March 01:00 UTC to Sunday 31 October 01:00 UTC.
        assert_eq!(
            z.next_transition(at(2027, 1, 10, 0, 0)),
            Some(at(2027, 3, 28, 1, 0))
        );
        assert_eq!(
            z.next_transition(at(2027, 3, 28, 1, 0)),
            Some(at(2027, 10, 31, 1, 0))
        );
        assert_eq!(z.offset_at(at(2027, 3, 28, 0, 59)), 3600);
        assert_eq!(z.offset_at(at(2027, 3, 28, 1, 0)), 7200);
        assert_eq!(z.offset_at(at(2027, 10, 31, 0, 59)), 7200);
        assert_eq!(z.offset_at(at(2027, 10, 31, 1, 0)), 3600);
        assert_eq!(z.offset_at(at(2026, 12, 31, 23, 0)), 3600);
    }

    #[test]
    fn southern_and_western_zones_and_fixed_offsets() {
        let nz = Zone::parse("NZST-12NZDT,M9.5.0,M4.1.0/3").unwrap();
        // Southern summer spans the new year.
        assert_eq!(nz.offset_at(at(2027, 1, 15, 0, 0)), 13 * 3600);
        assert_eq!(nz.offset_at(at(2027, 6, 15, 0, 0)), 12 * 3600);
        // DST ends Sunday 4 April 2027 03:00 NZDT = 3 April 14:00 UTC.
        assert_eq!(
            nz.next_transition(at(2027, 2, 1, 0, 0)),
            Some(at(2027, 4, 3, 14, 0))
        );
        let ny = Zone::parse("EST5EDT,M3.2.0,M11.1.0").unwrap();
        assert_eq!(ny.offset_at(at(2027, 7, 1, 12, 0)), -4 * 3600);
        // Second Sunday of March 2027 is the 14th, 02:00 EST = 07:00 UTC.
        assert_eq!(
            ny.next_transition(at(2027, 3, 1, 0, 0)),
            Some(at(2027, 3, 14, 7, 0))
        );
        let tehran = Zone::parse("<+0330>-3:30").unwrap();
        assert_eq!(tehran.offset_at(0), 3 * 3600 + 1800);
        assert_eq!(tehran.next_transition(0), None);
        let utc = Zone::parse("UTC0").unwrap();
        assert_eq!((utc.offset_at(123), utc.next_transition(123)), (0, None));
        // Julian days and a time past 24 h (POSIX 2024).
        let j = Zone::parse("XXX3YYY,J60/-1,300/26").unwrap();
        assert_eq!(
            j.offset_at(at(2028, 3, 1, 3, 0)),
            -2 * 3600,
            "J60 is 1 March even in a leap year"
        );
        assert_eq!(j.offset_at(at(2028, 2, 29, 12, 0)), -3 * 3600);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for bad in [
            "",
            "C",
            "CET",
            "CET-1CEST,M3.5.0",
            "CET-1CEST,M13.5.0,M10.5.0",
            "CET-1CEST,M3.6.0,M10.5.0",
            "CET-25",
            "CET-1CEST,J0,J10",
            ":Europe/Berlin",
            "CET-1 extra",
            "<AB>1",
            "CET-1CEST,M3.5.0/200,M10.5.0",
        ] {
            assert!(Zone::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_router_zone_comes_from_uci_then_etc_tz_then_utc() {
        let uci = MemFiles::default()
            .with("/etc/config/system", "config system\n\toption hostname 'r'\n\toption timezone 'CET-1CEST,M3.5.0,M10.5.0/3'\n\toption zonename 'Europe/Berlin'\n")
            .with("/etc/TZ", "EST5EDT,M3.2.0,M11.1.0\n");
        assert_eq!(
            router_zone(&uci, None).unwrap().to_string(),
            "CET-1CEST,M3.5.0,M10.5.0/3"
        );
        assert_eq!(router_zone(&uci, Some("UTC0")).unwrap().to_string(), "UTC0");
        let etc = MemFiles::default().with("/etc/TZ", "EST5EDT,M3.2.0,M11.1.0\n");
        assert_eq!(
            router_zone(&etc, None).unwrap().to_string(),
            "EST5EDT,M3.2.0,M11.1.0"
        );
        assert_eq!(
            router_zone(&MemFiles::default(), None).unwrap(),
            Zone::utc()
        );
    }
}
