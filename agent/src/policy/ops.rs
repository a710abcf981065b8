//! The changes the API makes to the desired state, as pure functions on [`Desired`]:
//! syncing groups, policies, deleting, the device lists and reset. The engine runs
//! one on a copy, applies the result to the kernel and only then keeps it.

use std::collections::{BTreeMap, HashSet};

use netpilot_proto::ErrorCode;

use super::model::{
    too_many_devices, Category, Desired, Group, GroupId, Invalid, ListKind, Policy, Target,
    GUEST_GROUP, MAX_CATEGORIES, MAX_DEVICES, MAX_GROUPS, MAX_LIST_ENTRIES,
};

/// A change that names a group that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("group {0} does not exist")]
    NoSuchGroup(GroupId),
}

pub fn guest() -> Group {
    Group {
        id: GUEST_GROUP,
        name: "Guests".into(),
        devices: Vec::new(),
        policy: Policy::default(),
    }
}

/// The state of a fresh agent: the guest group and nothing else.
pub fn initial() -> Desired {
    let mut d = Desired::default();
    normalize(&mut d).expect("the initial state is valid");
    d
}

/// Restores the invariants after a change: the guest group exists, every group has
/// a slot and no freed slot lingers, and the limits hold.
pub fn normalize(d: &mut Desired) -> Result<(), Invalid> {
    d.groups.entry(GUEST_GROUP).or_insert_with(guest);
    if d.groups.len() > MAX_GROUPS {
        return Err(Invalid {
            code: ErrorCode::LimitExceeded,
            message: format!(
                "{} groups; a router holds at most {MAX_GROUPS}",
                d.groups.len()
            ),
        });
    }
    let devices: usize = d.groups.values().map(|g| g.devices.len()).sum();
    if devices > MAX_DEVICES {
        return Err(too_many_devices(devices));
    }
    let groups = &d.groups;
    d.slots.retain(|id, _| groups.contains_key(id));
    if !d.slots.contains_key(&GUEST_GROUP) && !d.slots.values().any(|s| *s == 1) {
        d.slots.insert(GUEST_GROUP, 1);
    }
    let mut used: HashSet<u8> = d.slots.values().copied().collect();
    let mut free = (1..=MAX_GROUPS as u8)
        .filter(|s| !used.contains(s))
        .collect::<Vec<_>>()
        .into_iter();
    for id in d.groups.keys() {
        if !d.slots.contains_key(id) {
            let s = free.next().expect("fewer groups than slots");
            used.insert(s);
            d.slots.insert(*id, s);
        }
    }
    d.lists.retain(|_, v| !v.is_empty());
    for (name, c) in super::categories::builtin_categories() {
        d.categories.entry(name).or_insert(c);
    }
    for g in d.groups.values() {
        if let Some(c) = g
            .policy
            .dns
            .categories
            .iter()
            .find(|c| !d.categories.contains_key(*c))
        {
            let known: Vec<&str> = d.categories.keys().map(String::as_str).collect();
            return Err(Invalid {
                code: ErrorCode::UnknownCategory,
                message: format!(
                    "group {}: DNS category {c:?} does not exist; known: {}",
                    g.id,
                    known.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Replaces a DNS category's list, or adds a new category.
pub fn set_category(d: &mut Desired, category: Category) -> Result<(), OpError> {
    if !d.categories.contains_key(&category.name) && d.categories.len() >= MAX_CATEGORIES {
        return Err(Invalid {
            code: ErrorCode::LimitExceeded,
            message: format!("{MAX_CATEGORIES} categories exist; at most {MAX_CATEGORIES}"),
        }
        .into());
    }
    d.categories
        .insert(category.name.clone(), std::sync::Arc::new(category));
    Ok(())
}

/// Replaces (or creates) one group. Its devices leave whatever group they were in:
/// the web app's group is authoritative for the devices it lists.
pub fn sync_group(d: &mut Desired, group: Group) -> Result<(), OpError> {
    let macs: HashSet<_> = group.devices.iter().map(|x| x.mac).collect();
    for (id, g) in d.groups.iter_mut() {
        if *id != group.id {
            g.devices.retain(|x| !macs.contains(&x.mac));
        }
    }
    d.groups.insert(group.id, group);
    normalize(d)?;
    Ok(())
}

/// Makes the groups exactly `groups`: unlisted groups are removed (the guest group
/// stays, with its devices unless another group claims them).
pub fn sync_all(d: &mut Desired, groups: Vec<Group>) -> Result<(), OpError> {
    let mut seen: BTreeMap<_, GroupId> = BTreeMap::new();
    let mut ids = HashSet::new();
    for g in &groups {
        if !ids.insert(g.id) {
            return Err(Invalid {
                code: ErrorCode::InvalidGroup,
                message: format!("group {} is listed twice", g.id),
            }
            .into());
        }
        for dev in &g.devices {
            if let Some(other) = seen.insert(dev.mac, g.id) {
                return Err(Invalid {
                    code: ErrorCode::DuplicateDevice,
                    message: format!("device {} is in group {other} and group {}", dev.mac, g.id),
                }
                .into());
            }
        }
    }
    let total: usize = groups.iter().map(|g| g.devices.len()).sum();
    if total > MAX_DEVICES {
        return Err(too_many_devices(total).into());
    }
    let old_guest = d.groups.remove(&GUEST_GROUP);
    // Devices of removed groups that no listed group claims become guests, as
    // with a delete.
    let orphans: Vec<_> = std::mem::take(&mut d.groups)
        .into_values()
        .flat_map(|g| g.devices)
        .filter(|x| !seen.contains_key(&x.mac))
        .collect();
    for g in groups {
        d.groups.insert(g.id, g);
    }
    match d.groups.entry(GUEST_GROUP) {
        std::collections::btree_map::Entry::Vacant(slot) => {
            let mut guest = old_guest.unwrap_or_else(guest);
            guest.devices.retain(|x| !seen.contains_key(&x.mac));
            guest.devices.extend(orphans);
            slot.insert(guest);
        }
        std::collections::btree_map::Entry::Occupied(mut listed) => {
            let have: HashSet<_> = listed.get().devices.iter().map(|x| x.mac).collect();
            listed
                .get_mut()
                .devices
                .extend(orphans.into_iter().filter(|x| !have.contains(&x.mac)));
        }
    }
    normalize(d)?;
    Ok(())
}

pub fn set_policy(d: &mut Desired, id: GroupId, policy: Policy) -> Result<(), OpError> {
    let g = d.groups.get_mut(&id).ok_or(Invalid {
        code: ErrorCode::UnknownGroup,
        message: format!("group {id} does not exist; create it with POST /api/groups/sync"),
    })?;
    g.policy = policy;
    Ok(())
}

/// Deletes a group; its devices fall back to the guest group.
pub fn delete_group(d: &mut Desired, id: GroupId) -> Result<(), OpError> {
    if id == GUEST_GROUP {
        return Err(Invalid {
            code: ErrorCode::GuestGroup,
            message: "group 0 is the guest group; it cannot be deleted".into(),
        }
        .into());
    }
    let g = d.groups.remove(&id).ok_or(OpError::NoSuchGroup(id))?;
    d.groups
        .get_mut(&GUEST_GROUP)
        .expect("normalised state has a guest group")
        .devices
        .extend(g.devices);
    normalize(d)?;
    Ok(())
}

/// Adds to a list; false when already there.
pub fn list_add(d: &mut Desired, kind: ListKind, target: Target) -> Result<bool, OpError> {
    let list = d.lists.entry(kind).or_default();
    if list.binary_search(&target).is_ok() {
        return Ok(false);
    }
    if list.len() >= MAX_LIST_ENTRIES {
        return Err(Invalid {
            code: ErrorCode::LimitExceeded,
            message: format!(
                "the {} holds at most {MAX_LIST_ENTRIES} entries",
                kind.as_str()
            ),
        }
        .into());
    }
    insert_sorted(list, target);
    Ok(true)
}

/// Keeps a list sorted and free of repeats; false when `t` was already there.
/// (A sort would cost far more code than this on the router.)
pub fn insert_sorted(list: &mut Vec<Target>, t: Target) -> bool {
    match list.binary_search(&t) {
        Ok(_) => false,
        Err(i) => {
            list.insert(i, t);
            true
        }
    }
}

/// Removes from a list; false when it was not there.
pub fn list_remove(d: &mut Desired, kind: ListKind, target: Target) -> bool {
    let Some(list) = d.lists.get_mut(&kind) else {
        return false;
    };
    let before = list.len();
    list.retain(|t| *t != target);
    let changed = list.len() != before;
    normalize(d).expect("removing keeps the state valid");
    changed
}

/// Every group, device and list entry gone; only the default guest group is left.
/// Deletes an added category, or puts a shipped one back to the list it came
/// with. Refused while a group's policy blocks it (a shipped one can always go
/// back: its name stays).
pub fn remove_category(d: &mut Desired, name: &str) -> Result<(), OpError> {
    let unknown = || Invalid {
        code: ErrorCode::UnknownCategory,
        message: format!("DNS category {name:?} does not exist"),
    };
    let current = d.categories.get(name).ok_or_else(unknown)?;
    if current.builtin {
        if let Some(shipped) = super::categories::builtin_categories().remove(name) {
            d.categories.insert(name.to_owned(), shipped);
        }
        return Ok(());
    }
    let users: Vec<String> = d
        .groups
        .values()
        .filter(|g| g.policy.dns.categories.contains(name))
        .map(|g| g.id.to_string())
        .collect();
    if !users.is_empty() {
        return Err(Invalid {
            code: ErrorCode::CategoryInUse,
            message: format!(
                "DNS category {name:?} is blocked by group(s) {}; remove it from their policy first",
                users.join(", ")
            ),
        }
        .into());
    }
    d.categories.remove(name);
    Ok(())
}

/// Removes groups, devices and lists. The DNS categories stay: they are the
/// library policies draw on, not rules.
pub fn reset(d: &mut Desired) {
    let categories = std::mem::take(&mut d.categories);
    *d = initial();
    d.categories = categories;
}

/// Nothing to enforce: then NetPilot keeps no table and no qdisc at all.
pub fn is_trivial(d: &Desired) -> bool {
    d.lists.values().all(Vec::is_empty)
        && d.groups.values().all(|g| {
            g.policy.bandwidth.is_unlimited()
                && g.policy.internet == super::model::Internet::Allow
                && g.policy.schedules.is_empty()
                && !g.policy.dns.filters()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Device, Mac};

    fn dev(last: u8) -> Device {
        Device {
            mac: Mac([2, 0, 0, 0, 0, last]),
            ipv4: None,
            ipv6: None,
            name: None,
        }
    }

    fn group(id: GroupId, devs: &[u8]) -> Group {
        Group {
            id,
            name: format!("g{id}"),
            devices: devs.iter().map(|d| dev(*d)).collect(),
            policy: Policy::default(),
        }
    }

    #[test]
    fn an_added_category_goes_when_unused_and_a_shipped_one_goes_back() {
        let mut d = initial();
        let list = |names: &[&str]| {
            names
                .iter()
                .map(|n| crate::dns::domain::normalize(n).unwrap())
                .collect::<Vec<_>>()
        };
        let shipped = d.categories["social"].clone();
        set_category(
            &mut d,
            super::super::categories::category("social", "mine", list(&["a.example"]), Some(1)),
        )
        .unwrap();
        set_category(
            &mut d,
            super::super::categories::category("school", "", list(&["b.example"]), Some(1)),
        )
        .unwrap();
        let mut g = group(3, &[1]);
        g.policy.dns.categories.insert("school".into());
        sync_group(&mut d, g).unwrap();
        let e = remove_category(&mut d, "school").unwrap_err();
        assert!(
            matches!(&e, OpError::Invalid(i) if i.code == ErrorCode::CategoryInUse && i.message.contains("group(s) 3")),
            "{e}"
        );
        sync_group(&mut d, group(3, &[1])).unwrap();
        remove_category(&mut d, "school").unwrap();
        assert!(!d.categories.contains_key("school"));
        // Shipped: back to its list, even while used.
        remove_category(&mut d, "social").unwrap();
        assert_eq!(d.categories["social"], shipped);
        assert!(matches!(
            remove_category(&mut d, "nosuch"),
            Err(OpError::Invalid(i)) if i.code == ErrorCode::UnknownCategory
        ));
    }

    #[test]
    fn a_device_is_in_one_group_and_moves_with_sync() {
        let mut d = initial();
        sync_group(&mut d, group(3, &[1, 2])).unwrap();
        sync_group(&mut d, group(4, &[2, 3])).unwrap();
        assert_eq!(d.groups[&3].devices, vec![dev(1)]);
        assert_eq!(d.groups[&4].devices.len(), 2);
        assert_eq!(d.slots[&GUEST_GROUP], 1);
        assert_eq!(d.slots[&3], 2);
        assert_eq!(d.slots[&4], 3);
    }

    #[test]
    fn deleting_moves_devices_to_guests_and_frees_the_slot() {
        let mut d = initial();
        sync_group(&mut d, group(3, &[1])).unwrap();
        delete_group(&mut d, 3).unwrap();
        assert_eq!(d.groups[&GUEST_GROUP].devices, vec![dev(1)]);
        assert!(!d.slots.contains_key(&3));
        sync_group(&mut d, group(9, &[])).unwrap();
        assert_eq!(d.slots[&9], 2, "the freed slot is reused");
        assert_eq!(
            delete_group(&mut d, 0).unwrap_err(),
            OpError::Invalid(Invalid {
                code: ErrorCode::GuestGroup,
                message: "group 0 is the guest group; it cannot be deleted".into()
            })
        );
        assert_eq!(
            delete_group(&mut d, 77).unwrap_err(),
            OpError::NoSuchGroup(77)
        );
    }

    #[test]
    fn sync_all_replaces_groups_and_refuses_a_device_twice() {
        let mut d = initial();
        sync_group(&mut d, group(3, &[1])).unwrap();
        sync_group(&mut d, group(0, &[5, 6])).unwrap();
        sync_all(&mut d, vec![group(7, &[5]), group(8, &[2])]).unwrap();
        assert!(!d.groups.contains_key(&3));
        // Group 3's device 1 was not claimed: a guest now, as after a delete.
        assert_eq!(d.groups[&GUEST_GROUP].devices, vec![dev(6), dev(1)]);
        let err = sync_all(&mut d, vec![group(7, &[5]), group(8, &[5])]).unwrap_err();
        assert!(
            matches!(
                err,
                OpError::Invalid(Invalid {
                    code: ErrorCode::DuplicateDevice,
                    ..
                })
            ),
            "{err:?}"
        );
        let err = set_policy(&mut d, 99, Policy::default()).unwrap_err();
        assert!(matches!(
            err,
            OpError::Invalid(Invalid {
                code: ErrorCode::UnknownGroup,
                ..
            })
        ));
    }

    #[test]
    fn limits_are_refused_clearly() {
        let mut d = initial();
        let many: Vec<Group> = (1..=MAX_GROUPS as u32).map(|i| group(i, &[])).collect();
        let err = sync_all(&mut d, many).unwrap_err();
        assert!(err.to_string().contains("at most 250"), "{err}");
    }

    #[test]
    fn lists_are_sets_and_reset_clears_everything() {
        let mut d = initial();
        let t = Target::Mac(Mac([2, 0, 0, 0, 0, 9]));
        assert!(list_add(&mut d, ListKind::Block, t).unwrap());
        assert!(!list_add(&mut d, ListKind::Block, t).unwrap());
        assert!(!is_trivial(&d));
        assert!(list_remove(&mut d, ListKind::Block, t));
        assert!(!list_remove(&mut d, ListKind::Block, t));
        assert!(is_trivial(&d));
        sync_group(&mut d, group(3, &[1])).unwrap();
        reset(&mut d);
        assert_eq!(d, initial());
    }
}
