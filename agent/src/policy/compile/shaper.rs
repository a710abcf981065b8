//! The tc half of the compiler: which HTB classes a group needs, per direction.
//!
//! A group with a limit gets its base class `1:(0x100 + slot)`; each distinct
//! tighter limit its schedules impose gets a class of its own from the group's
//! range `1:(0x1000 + 64·slot)…`, so a schedule switches class by rule, not by a tc
//! change at the window's edge. Classes exist only where traffic is steered into
//! them.

use std::collections::BTreeMap;

use super::CompileError;
use crate::policy::model::{Bandwidth, GroupId};
use crate::policy::schedule::{KernelSchedule, Restriction};
use crate::system::tc::MAJOR as TC_MAJOR;

const BASE_CLASS: u16 = 0x100;
const SCHEDULE_CLASS: u16 = 0x1000;
const SCHEDULE_CLASSES_PER_GROUP: u16 = 64;

/// Which egress a class shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// LAN bridge egress: traffic to devices.
    Down,
    /// WAN device egress: traffic from devices.
    Up,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Down, Side::Up];

    /// The rate of `b` in this direction.
    pub fn rate(self, b: Bandwidth) -> Option<u32> {
        match self {
            Side::Up => b.up_kbps,
            Side::Down => b.down_kbps,
        }
    }
}

/// The HTB classes wanted per side: class minor → rate in kbit/s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcPlan {
    pub down: BTreeMap<u16, u32>,
    pub up: BTreeMap<u16, u32>,
}

impl TcPlan {
    pub fn side(&self, side: Side) -> &BTreeMap<u16, u32> {
        match side {
            Side::Down => &self.down,
            Side::Up => &self.up,
        }
    }
}

pub fn base_class(slot: u8) -> u16 {
    BASE_CLASS + slot as u16
}

pub fn classid(minor: u16) -> String {
    format!("{TC_MAJOR:x}:{minor:x}")
}

/// One group's classes: its base limit and the tighter limits its schedules
/// impose, each with the class that enforces it.
#[derive(Debug, Clone)]
pub struct GroupClasses {
    pub base: Bandwidth,
    pub base_minor: u16,
    /// In the order the week meets them.
    limits: Vec<(Bandwidth, u16)>,
}

impl GroupClasses {
    /// The class enforcing `limit`, one of the schedule limits found by [`classes`].
    pub fn class_of(&self, limit: Bandwidth) -> u16 {
        self.limits
            .iter()
            .find(|(l, _)| *l == limit)
            .map(|(_, minor)| *minor)
            .expect("every schedule limit has a class")
    }
}

/// The group's classes, added to `tc`.
pub fn classes(
    group: GroupId,
    slot: u8,
    base: Bandwidth,
    sched: &KernelSchedule,
    tc: &mut TcPlan,
) -> Result<GroupClasses, CompileError> {
    // A few at most: a list, in the order the week meets them.
    let mut limits: Vec<Bandwidth> = Vec::new();
    for p in &sched.pieces {
        if let Restriction::Limit { down_kbps, up_kbps } = p.restriction {
            let eff = base.tighter(Bandwidth { down_kbps, up_kbps });
            if eff != base && !limits.contains(&eff) {
                limits.push(eff);
            }
        }
    }
    if limits.len() > SCHEDULE_CLASSES_PER_GROUP as usize {
        return Err(CompileError::TooManyLimits {
            group,
            needed: limits.len(),
            max: SCHEDULE_CLASSES_PER_GROUP,
        });
    }
    let limits: Vec<(Bandwidth, u16)> = limits
        .iter()
        .enumerate()
        .map(|(k, b)| {
            (
                *b,
                SCHEDULE_CLASS + slot as u16 * SCHEDULE_CLASSES_PER_GROUP + k as u16,
            )
        })
        .collect();
    let base_minor = base_class(slot);
    // A class per direction only where traffic is steered into it: the base rate,
    // and a schedule's rate where it is tighter than the base.
    if let Some(k) = base.down_kbps {
        tc.down.insert(base_minor, k);
    }
    if let Some(k) = base.up_kbps {
        tc.up.insert(base_minor, k);
    }
    for (b, minor) in &limits {
        if let Some(k) = b.down_kbps.filter(|_| b.down_kbps != base.down_kbps) {
            tc.down.insert(*minor, k);
        }
        if let Some(k) = b.up_kbps.filter(|_| b.up_kbps != base.up_kbps) {
            tc.up.insert(*minor, k);
        }
    }
    Ok(GroupClasses {
        base,
        base_minor,
        limits,
    })
}
