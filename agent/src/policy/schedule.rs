//! Weekly schedules in local time → the pieces the kernel matches.
//!
//! nftables evaluates `meta hour` as UTC seconds of the day (the agent runs nft with
//! `TZ=UTC0`, so nft's own local-time conversion is a no-op) and `meta day` as the
//! weekday of `now − 60·sys_tz.tz_minuteswest` (0 = Sunday). So the windows are
//! combined into one weekly timeline (where they overlap the more restrictive wins),
//! shifted to UTC with the offset in force, and cut wherever the UTC day or the
//! kernel's weekday changes. Across the next DST change the pieces for both offsets
//! are emitted, guarded by `meta time`, so the rules stay right while the agent is
//! stopped; the agent compiles again at that change to look one change further.

use super::tz::Zone;

const WEEK: usize = 7 * 1440;

/// Bit i set = weekday i, 0 = Sunday … 6 = Saturday (nft's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weekdays(pub u8);

/// A window starting on each of `days` at `start_min`; `end_min <= start_min` runs
/// past midnight into the next day (22:00–06:30). Minutes are 0..1440.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWindow {
    pub days: Weekdays,
    pub start_min: u16,
    pub end_min: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Restriction {
    Block,
    /// `None`: that direction is not limited.
    Limit {
        down_kbps: Option<u32>,
        up_kbps: Option<u32>,
    },
}

impl Restriction {
    /// The more restrictive of two: a block beats any limit; limits combine per
    /// direction as the minimum.
    pub fn tighter(self, other: Restriction) -> Restriction {
        match (self, other) {
            (Restriction::Block, _) | (_, Restriction::Block) => Restriction::Block,
            (
                Restriction::Limit {
                    down_kbps: d1,
                    up_kbps: u1,
                },
                Restriction::Limit {
                    down_kbps: d2,
                    up_kbps: u2,
                },
            ) => {
                let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Restriction::Limit {
                    down_kbps: min(d1, d2),
                    up_kbps: min(u1, u2),
                }
            }
        }
    }
}

/// One kernel match: on kernel weekday `day`, UTC seconds `from_sec..=to_sec`,
/// within the optional absolute guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub not_before: Option<i64>,
    pub before: Option<i64>,
    pub day: u8,
    pub from_sec: u32,
    pub to_sec: u32,
    pub restriction: Restriction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSchedule {
    pub pieces: Vec<Piece>,
    /// Compile again at this instant (the DST change after which the guards run out).
    pub refresh_at: Option<i64>,
}

/// The effective restriction for every minute of the local week (Sunday 00:00 = 0).
fn timeline(windows: &[(LocalWindow, Restriction)]) -> Vec<Option<Restriction>> {
    let mut t: Vec<Option<Restriction>> = vec![None; WEEK];
    for (w, r) in windows {
        let start = w.start_min as usize;
        let end = w.end_min as usize;
        if start == end || start >= 1440 || end > 1440 {
            continue;
        }
        let len = if end > start {
            end - start
        } else {
            1440 - start + end
        };
        for day in (0..7).filter(|d| w.days.0 & (1 << d) != 0) {
            for m in 0..len {
                let i = (day * 1440 + start + m) % WEEK;
                t[i] = Some(match t[i] {
                    None => *r,
                    Some(x) => x.tighter(*r),
                });
            }
        }
    }
    t
}

/// Pieces for one UTC offset (seconds east).
fn pieces_for(
    t: &[Option<Restriction>],
    offset: i32,
    kernel_minutes_west: i32,
    not_before: Option<i64>,
    before: Option<i64>,
) -> Vec<Piece> {
    // UTC week minute u shows local minute u + offset.
    let shift = (offset / 60).rem_euclid(WEEK as i32) as usize;
    let kernel_day = |u: usize| -> u8 {
        (u as i64 - kernel_minutes_west as i64)
            .div_euclid(1440)
            .rem_euclid(7) as u8
    };
    let mut out = Vec::new();
    let mut u = 0;
    while u < WEEK {
        let r = t[(u + shift) % WEEK];
        let day = kernel_day(u);
        let utc_day = u / 1440;
        let mut end = u + 1;
        while end < WEEK
            && t[(end + shift) % WEEK] == r
            && kernel_day(end) == day
            && end / 1440 == utc_day
        {
            end += 1;
        }
        if let Some(restriction) = r {
            out.push(Piece {
                not_before,
                before,
                day,
                from_sec: (u % 1440) as u32 * 60,
                to_sec: ((end - 1) % 1440) as u32 * 60 + 59,
                restriction,
            });
        }
        u = end;
    }
    // In UTC-week order: deterministic, so the rules compile to the same text.
    out
}

pub fn compile(
    windows: &[(LocalWindow, Restriction)],
    zone: &Zone,
    now_unix: i64,
    kernel_minutes_west: i32,
) -> KernelSchedule {
    let t = timeline(windows);
    let now_offset = zone.offset_at(now_unix);
    let change = zone
        .next_transition(now_unix)
        .filter(|at| zone.offset_at(*at) != now_offset);
    match change {
        None => KernelSchedule {
            pieces: pieces_for(&t, now_offset, kernel_minutes_west, None, None),
            refresh_at: None,
        },
        Some(at) => {
            let mut pieces = pieces_for(&t, now_offset, kernel_minutes_west, None, Some(at));
            pieces.extend(pieces_for(
                &t,
                zone.offset_at(at),
                kernel_minutes_west,
                Some(at),
                None,
            ));
            KernelSchedule {
                pieces,
                refresh_at: Some(at),
            }
        }
    }
}

impl KernelSchedule {
    /// What the kernel would apply at `unix`, evaluating the pieces as nft does.
    pub fn active_at(&self, unix: i64, kernel_minutes_west: i32) -> Option<Restriction> {
        let day = (unix - 60 * kernel_minutes_west as i64)
            .div_euclid(86_400)
            .checked_add(4)
            .map(|d| d.rem_euclid(7) as u8)?;
        let sec = unix.rem_euclid(86_400) as u32;
        self.pieces
            .iter()
            .filter(|p| p.not_before.is_none_or(|t| unix >= t))
            .filter(|p| p.before.is_none_or(|t| unix < t))
            .filter(|p| p.day == day && (p.from_sec..=p.to_sec).contains(&sec))
            .map(|p| p.restriction)
            .reduce(Restriction::tighter)
    }
}

/// The reference: the restriction in force at `unix`, straight from local time.
pub fn local_active(
    windows: &[(LocalWindow, Restriction)],
    zone: &Zone,
    unix: i64,
) -> Option<Restriction> {
    let local = unix + zone.offset_at(unix) as i64;
    let day = (local.div_euclid(86_400) + 4).rem_euclid(7) as usize;
    let minute = (local.rem_euclid(86_400) / 60) as usize;
    timeline(windows)[day * 1440 + minute]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::clock::days_from_civil;

    const LIMIT: Restriction = Restriction::Limit {
        down_kbps: Some(1000),
        up_kbps: None,
    };

    fn w(days: u8, start: (u16, u16), end: (u16, u16)) -> LocalWindow {
        LocalWindow {
            days: Weekdays(days),
            start_min: start.0 * 60 + start.1,
            end_min: end.0 * 60 + end.1,
        }
    }

    fn piece(day: u8, from: (u32, u32), to: (u32, u32, u32), r: Restriction) -> Piece {
        Piece {
            not_before: None,
            before: None,
            day,
            from_sec: from.0 * 3600 + from.1 * 60,
            to_sec: to.0 * 3600 + to.1 * 60 + to.2,
            restriction: r,
        }
    }

    const WEEKDAYS: u8 = 0b0011_1110;
    const MONDAY_2026_11_23: i64 = 1_795_392_000;

    #[test]
    fn an_overnight_window_in_utc() {
        let s = compile(
            &[(w(WEEKDAYS, (22, 0), (6, 30)), Restriction::Block)],
            &Zone::utc(),
            MONDAY_2026_11_23,
            0,
        );
        assert_eq!(s.refresh_at, None);
        let mut want = Vec::new();
        for d in 1..=5u8 {
            want.push(piece(d, (22, 0), (23, 59, 59), Restriction::Block));
            want.push(piece(d + 1, (0, 0), (6, 29, 59), Restriction::Block));
        }
        want.sort_by_key(|p| (p.day, p.from_sec));
        assert_eq!(s.pieces, want);
    }

    #[test]
    fn the_same_window_in_berlin_winter_is_an_hour_earlier_in_utc() {
        let zone = Zone::parse("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let s = compile(
            &[(w(0b10, (22, 0), (6, 30)), Restriction::Block)],
            &zone,
            MONDAY_2026_11_23,
            0,
        );
        // Guarded at the March change, then the summer pieces follow.
        let before: Vec<&Piece> = s.pieces.iter().filter(|p| p.before.is_some()).collect();
        assert_eq!(
            before
                .iter()
                .map(|p| (p.day, p.from_sec, p.to_sec))
                .collect::<Vec<_>>(),
            vec![
                (1, 21 * 3600, 23 * 3600 + 59 * 60 + 59),
                (2, 0, 5 * 3600 + 29 * 60 + 59)
            ]
        );
        let after: Vec<&Piece> = s.pieces.iter().filter(|p| p.not_before.is_some()).collect();
        assert_eq!(after[0].from_sec, 20 * 3600);
        assert_eq!(
            s.refresh_at,
            Some(days_from_civil(2027, 3, 28) * 86_400 + 3600)
        );
    }

    #[test]
    fn a_window_across_the_week_wrap_and_overlaps() {
        let s = compile(
            &[(w(0b100_0000, (23, 0), (1, 0)), LIMIT)],
            &Zone::utc(),
            MONDAY_2026_11_23,
            0,
        );
        assert_eq!(
            s.pieces,
            vec![
                piece(0, (0, 0), (0, 59, 59), LIMIT),
                piece(6, (23, 0), (23, 59, 59), LIMIT)
            ]
        );
        let limits = [
            (w(0b10, (8, 0), (12, 0)), LIMIT),
            (
                w(0b10, (10, 0), (14, 0)),
                Restriction::Limit {
                    down_kbps: Some(5000),
                    up_kbps: Some(200),
                },
            ),
            (w(0b10, (11, 0), (11, 30)), Restriction::Block),
        ];
        let s = compile(&limits, &Zone::utc(), MONDAY_2026_11_23, 0);
        let both = Restriction::Limit {
            down_kbps: Some(1000),
            up_kbps: Some(200),
        };
        assert_eq!(
            s.pieces
                .iter()
                .map(|p| (p.from_sec / 60, p.to_sec / 60, p.restriction))
                .collect::<Vec<_>>(),
            vec![
                (480, 599, LIMIT),
                (600, 659, both),
                (660, 689, Restriction::Block),
                (690, 719, both),
                (
                    720,
                    839,
                    Restriction::Limit {
                        down_kbps: Some(5000),
                        up_kbps: Some(200)
                    }
                ),
            ]
        );
        // Order of the windows does not matter.
        let mut reversed = limits.to_vec();
        reversed.reverse();
        assert_eq!(compile(&reversed, &Zone::utc(), MONDAY_2026_11_23, 0), s);
        assert!(compile(&[], &Zone::utc(), 0, 0).pieces.is_empty());
        let t = MONDAY_2026_11_23 + 10 * 3600 + 60;
        assert_eq!(s.active_at(t, 0), local_active(&limits, &Zone::utc(), t));
        assert_eq!(s.active_at(t, 0), Some(both));
        assert!(compile(
            &[(w(0x7f, (0, 0), (0, 0)), Restriction::Block)],
            &Zone::utc(),
            0,
            0
        )
        .pieces
        .is_empty());
        let all_day = compile(
            &[(w(0b1, (0, 0), (23, 59)), Restriction::Block)],
            &Zone::utc(),
            0,
            0,
        );
        assert_eq!(
            all_day.pieces,
            vec![piece(0, (0, 0), (23, 58, 59), Restriction::Block)]
        );
    }

    /// The kernel's view equals local time, for random instants up to the second
    /// change ahead, in zones on both hemispheres and with a kernel tz offset.
    #[test]
    fn kernel_pieces_agree_with_local_time_across_dst() {
        let mut rng = netpilot_testkit::XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next_u64();
        let zones = [
            "CET-1CEST,M3.5.0,M10.5.0/3",
            "NZST-12NZDT,M9.5.0,M4.1.0/3",
            "EST5EDT,M3.2.0,M11.1.0",
            "<+0530>-5:30",
            "UTC0",
        ];
        for case in 0..60 {
            let zone = Zone::parse(zones[case % zones.len()]).unwrap();
            let windows: Vec<(LocalWindow, Restriction)> = (0..1 + next() % 4)
                .map(|_| {
                    let start = (next() % 1440) as u16;
                    let end = ((start as u64 + 1 + next() % 1439) % 1440) as u16;
                    let r = if next() % 2 == 0 {
                        Restriction::Block
                    } else {
                        LIMIT
                    };
                    (
                        LocalWindow {
                            days: Weekdays((next() % 127 + 1) as u8),
                            start_min: start,
                            end_min: end,
                        },
                        r,
                    )
                })
                .collect();
            let now = MONDAY_2026_11_23 + (next() % (365 * 86_400)) as i64;
            let west = [0, -60, 300][case % 3];
            let s = compile(&windows, &zone, now, west);
            let line = timeline(&windows);
            let horizon = s
                .refresh_at
                .and_then(|t| zone.next_transition(t))
                .unwrap_or(now + 30 * 86_400);
            for _ in 0..400 {
                let t = now + (next() % (horizon - now) as u64) as i64;
                // Skip the hour a DST change repeats or skips: local time is ambiguous there.
                if let Some(change) = zone.next_transition(t - 3 * 3600) {
                    if (t - change).abs() < 2 * 3600 {
                        continue;
                    }
                }
                let local = t + zone.offset_at(t) as i64;
                let minute = ((local.div_euclid(86_400) + 4).rem_euclid(7) * 1440
                    + local.rem_euclid(86_400) / 60) as usize;
                assert_eq!(
                    s.active_at(t, west),
                    line[minute],
                    "case {case} zone {zone} t {t} west {west}: {windows:?}"
                );
            }
        }
    }
}
