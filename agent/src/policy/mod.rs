//! The group policy engine (DESIGN §5): the model and its validation, the schedule
//! and time-zone maths, the DNS categories, the pure compiler from desired state to
//! kernel rules, the changes the API makes and their persistence; then the pure
//! plan of an apply, the shell that executes it, and the engine that runs
//! compile → plan → execute → verify.

pub mod categories;
pub mod compile;
pub mod engine;
pub mod execute;
pub mod fw4;
pub mod interfaces;
pub mod model;
pub mod ops;
pub mod persist;
pub mod plan;
pub mod schedule;
pub mod tz;

/// Groups the engine's and the planner's tests are built from.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::model::{Bandwidth, Device, Group, Mac, Policy};

    /// Group 3 "Kids" with devices `02:00:00:00:00:<d>`, limited to `kbps` both ways.
    pub fn kids(devices: &[u8], kbps: Option<u32>) -> Group {
        Group {
            id: 3,
            name: "Kids".into(),
            devices: devices
                .iter()
                .map(|d| Device {
                    mac: Mac([2, 0, 0, 0, 0, *d]),
                    ipv4: None,
                    ipv6: None,
                    name: None,
                })
                .collect(),
            policy: Policy {
                bandwidth: Bandwidth {
                    down_kbps: kbps,
                    up_kbps: kbps,
                },
                ..Policy::default()
            },
        }
    }

    /// [`kids`] without a limit, blocking these domains.
    pub fn filtered(devices: &[u8], block: &[&str]) -> Group {
        let mut g = kids(devices, None);
        g.policy.dns.block = block
            .iter()
            .map(|b| crate::dns::domain::normalize(b).unwrap())
            .collect();
        g
    }
}
