//! nlbwmon's accounting period, derived from UCI `database_interval` the way the
//! daemon derives it (nlbwmon's `timing.c`: `interval_pton`, `interval_timestamp`).
//! `nlbw -c list` names no period until nlbwmon first saves its database (up to
//! `commit_interval`, 24 h by default, after a start or a reset), so the agent
//! computes the current one instead of answering `null`.

use crate::runtime::clock::{civil_from_days, days_from_civil};

/// A parsed `database_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    /// `NN`: the period starts on day NN of each month; zero or negative counts
    /// back from the month's end (`0` = its last day, `-1` the day before).
    Monthly(i32),
    /// `YYYY-MM-DD/NN`: periods of NN days from that date.
    Fixed { start: (i64, u32, u32), days: i32 },
}

/// nlbwmon's own default when UCI names no interval ("assuming 1st of month").
pub const DEFAULT: Interval = Interval::Monthly(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid nlbwmon database_interval {0:?} (want NN or YYYY-MM-DD/NN)")]
pub struct BadInterval(pub String);

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            28 + u32::from(leap)
        }
    }
}

impl Interval {
    /// The daemon's `interval_pton`, with its range checks (year 2000–3000, a real
    /// day of that month, a positive number of days).
    pub fn parse(spec: &str) -> Result<Interval, BadInterval> {
        let bad = || BadInterval(spec.to_owned());
        let s = spec.trim();
        if let Some((date, n)) = s.split_once('/') {
            let mut parts = date.splitn(3, '-');
            let mut num = |max_len: usize| {
                parts
                    .next()
                    .filter(|p| !p.is_empty() && p.len() <= max_len)
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(bad)
            };
            let (y, m, d) = (num(4)?, num(2)?, num(2)?);
            let days: i32 = n.parse().map_err(|_| bad())?;
            let y = i64::from(y);
            if !(2000..=3000).contains(&y)
                || !(1..=12).contains(&m)
                || d == 0
                || d > days_in_month(y, m)
                || days <= 0
            {
                return Err(bad());
            }
            return Ok(Interval::Fixed {
                start: (y, m, d),
                days,
            });
        }
        s.parse::<i32>().map(Interval::Monthly).map_err(|_| bad())
    }

    /// The start date (`YYYY-MM-DD`, as `nlbw -c list` prints it) of the period
    /// holding `now`, where `offset` is the router's UTC offset (seconds east) at
    /// a Unix time: the daemon works in local time.
    ///
    /// Quirks kept on purpose, because the answer must match the daemon's period
    /// names: a positive monthly day past the month's end is not clamped (day 31
    /// seen on March 5 names `YYYY-02-31`), and a fixed interval's start is
    /// snapped to a UTC midnight (`base -= base % 86400`).
    pub fn current(&self, now: i64, offset: &dyn Fn(i64) -> i32) -> String {
        let local = |t: i64| (t + i64::from(offset(t))).div_euclid(86_400);
        match *self {
            Interval::Monthly(date) => {
                let (mut y, mut m, d) = civil_from_days(local(now));
                let back = |y: &mut i64, m: &mut u32| {
                    if *m > 1 {
                        *m -= 1;
                    } else {
                        *m = 12;
                        *y -= 1;
                    }
                };
                let day = if date > 0 {
                    if (d as i32) < date {
                        back(&mut y, &mut m);
                    }
                    date
                } else {
                    if (d as i32) < date + days_in_month(y, m) as i32 {
                        back(&mut y, &mut m);
                    }
                    let md = days_in_month(y, m) as i32;
                    (date + md).clamp(1, md)
                };
                format!("{y:04}-{m:02}-{day:02}")
            }
            Interval::Fixed {
                start: (y, m, d),
                days,
            } => {
                // mktime of the local midnight, then the daemon's UTC snap.
                let midnight = days_from_civil(y, i64::from(m), i64::from(d)) * 86_400;
                let mut base = midnight - i64::from(offset(midnight));
                base -= base % 86_400;
                let today = now - now % 86_400;
                let step = i64::from(days) * 86_400;
                // C's `%` truncates like Rust's: before the start date the result
                // is negative and the "period" is the start itself, as in nlbwmon.
                let start = today - (today - base) % step;
                crate::runtime::clock::ymd(local(start))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(_: i64) -> i32 {
        0
    }

    fn at(y: i64, m: i64, d: i64, hour: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + hour * 3600
    }

    #[test]
    fn parses_what_nlbwmon_accepts_and_refuses_the_rest() {
        assert_eq!(Interval::parse("1"), Ok(Interval::Monthly(1)));
        assert_eq!(Interval::parse("-1"), Ok(Interval::Monthly(-1)));
        assert_eq!(
            Interval::parse("2026-11-05/30"),
            Ok(Interval::Fixed {
                start: (2026, 11, 5),
                days: 30
            })
        );
        for bad in [
            "",
            "x",
            "1x",
            "2026-11-05",
            "2026-02-30/7",
            "1999-01-01/7",
            "2026-13-01/7",
            "2026-11-05/0",
            "2026-11-05/-3",
            "2026-11-05/x",
        ] {
            assert!(Interval::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn monthly_periods_start_on_their_day_like_nlbwmon() {
        let p = |spec: &str, t: i64| Interval::parse(spec).unwrap().current(t, &utc);
        // The 1st: this month.
        assert_eq!(p("1", at(2026, 12, 4, 21)), "2026-12-01");
        assert_eq!(p("1", at(2026, 1, 1, 0)), "2026-01-01");
        // The 15th: before it, last month's (across a year too).
        assert_eq!(p("15", at(2026, 12, 4, 21)), "2026-11-15");
        assert_eq!(p("15", at(2026, 1, 14, 23)), "2025-12-15");
        assert_eq!(p("15", at(2026, 12, 15, 0)), "2026-12-15");
        // Not clamped, as in the daemon: day 31 seen from March 5 names Feb 31.
        assert_eq!(p("31", at(2026, 3, 5, 12)), "2026-02-31");
        // 0 and below count back from the month's end.
        assert_eq!(p("0", at(2026, 12, 31, 1)), "2026-12-31");
        assert_eq!(p("0", at(2026, 12, 30, 1)), "2026-11-30");
        assert_eq!(p("-1", at(2026, 3, 30, 1)), "2026-03-30");
        assert_eq!(p("-1", at(2026, 3, 29, 1)), "2026-02-27");
        assert_eq!(p("-40", at(2026, 3, 29, 1)), "2026-03-01");
    }

    #[test]
    fn fixed_periods_step_from_their_start() {
        let p = |spec: &str, t: i64| Interval::parse(spec).unwrap().current(t, &utc);
        assert_eq!(p("2026-11-05/30", at(2026, 11, 5, 0)), "2026-11-05");
        assert_eq!(p("2026-11-05/30", at(2026, 12, 4, 23)), "2026-11-05");
        assert_eq!(p("2026-11-05/30", at(2026, 12, 5, 0)), "2026-12-05");
        assert_eq!(p("2026-11-05/7", at(2026, 12, 4, 21)), "2026-12-03");
        // Before its start the daemon names the start itself.
        assert_eq!(p("2026-12-10/7", at(2026, 12, 4, 21)), "2026-12-10");
    }

    #[test]
    fn the_local_day_decides() {
        // 2026-12-31 23:30 UTC is already 2027-01-01 in UTC+2: a new monthly period.
        let east = |_: i64| 7200;
        let t = at(2026, 12, 31, 23) + 1800;
        assert_eq!(Interval::Monthly(1).current(t, &utc), "2026-12-01");
        assert_eq!(Interval::Monthly(1).current(t, &east), "2027-01-01");
        // A fixed start is local midnight; the daemon then snaps it to the UTC
        // midnight at or before it (here the previous day's), and names periods by
        // the local date of that.
        let spec = Interval::parse("2026-11-05/1").unwrap();
        assert_eq!(spec.current(at(2026, 12, 4, 12), &east), "2026-12-04");
    }
}
