//! One name per device, with where it came from: the name an owner gave the device
//! in a group wins over the hostname the device sent with its DHCP request. Every
//! answer that lists devices names them through here, and says whether the MAC is
//! a random, locally administered one (the vendor lookup at the relay skips those).

use std::collections::HashMap;

use serde::Serialize;

use crate::policy::model::{Desired, Mac};
use crate::system::files::Files;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NameSource {
    /// Given by the owner (a group's device `name`).
    Owner,
    /// The DHCP hostname.
    Hostname,
}

/// The owner's names and the DHCP hostnames, read once per answer.
#[derive(Debug, Default)]
pub struct Names {
    pub owner: HashMap<Mac, String>,
    pub dhcp: HashMap<Mac, String>,
}

/// What every device object says of its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: Option<String>,
    pub name_source: Option<NameSource>,
    pub randomized: bool,
}

impl Names {
    /// The owner's names from the policy, the hostnames from dnsmasq's leases (a
    /// missing lease file names nobody).
    pub fn read(d: &Desired, files: &dyn Files) -> Names {
        Names {
            owner: owner_names(d),
            dhcp: hostnames(files),
        }
    }

    pub fn hostname(&self, mac: &Mac) -> Option<String> {
        self.dhcp.get(mac).cloned()
    }

    pub fn of(&self, mac: &Mac) -> Identity {
        identity(
            mac,
            self.owner.get(mac).map(String::as_str),
            self.dhcp.get(mac).map(String::as_str),
        )
    }
}

/// The owner's name wins over the DHCP hostname; an empty name is no name.
pub fn identity(mac: &Mac, owner: Option<&str>, hostname: Option<&str>) -> Identity {
    let (name, name_source) = match (owner.filter(|n| !n.is_empty()), hostname) {
        (Some(n), _) => (Some(n.to_owned()), Some(NameSource::Owner)),
        (None, Some(h)) if !h.is_empty() => (Some(h.to_owned()), Some(NameSource::Hostname)),
        _ => (None, None),
    };
    Identity {
        name,
        name_source,
        randomized: mac.is_local(),
    }
}

/// MAC → the name its group gives it.
pub fn owner_names(d: &Desired) -> HashMap<Mac, String> {
    d.groups
        .values()
        .flat_map(|g| &g.devices)
        .filter_map(|x| Some((x.mac, x.name.clone()?)))
        .collect()
}

/// MAC → hostname from dnsmasq's leases.
pub fn hostnames(files: &dyn Files) -> HashMap<Mac, String> {
    let text = files.read_to_string(super::LEASES_PATH).unwrap_or_default();
    super::parse::leases(&text)
        .into_iter()
        .filter_map(|l| Some((l.mac, l.hostname?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owners_name_wins_and_random_macs_are_said() {
        let intel = Mac::parse("3c:a9:f4:00:01:01").unwrap();
        let random = Mac::parse("da:a1:19:00:00:01").unwrap();
        let both = identity(&intel, Some("Alice's laptop"), Some("alice-laptop"));
        assert_eq!(both.name.as_deref(), Some("Alice's laptop"));
        assert_eq!(both.name_source, Some(NameSource::Owner));
        assert!(!both.randomized);
        let dhcp = identity(&random, Some(""), Some("bob-phone"));
        assert_eq!(
            (dhcp.name.as_deref(), dhcp.name_source, dhcp.randomized),
            (Some("bob-phone"), Some(NameSource::Hostname), true)
        );
        let none = identity(&intel, None, None);
        assert_eq!((none.name, none.name_source), (None, None));
    }
}
