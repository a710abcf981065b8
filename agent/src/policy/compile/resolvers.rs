//! The DNS half of the compiler: which filtered group gets which resolver
//! instance, on which port, with which servers file. The nftables side (the port-53
//! redirect, DoT/DoH/QUIC refusals) is in [`super::table`]; running the resolvers is
//! `system::dnsmasq`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::dns::categories::{self, DohList};
use crate::dns::domain::{self, Domain};
use crate::dns::servers_file;
use crate::policy::categories::digest_domains;
use crate::policy::model::{Category, Desired, GroupId};
use crate::system::dns_wire;
use crate::system::dnsmasq::InstanceSpec;

/// How filtered groups' resolvers are run; from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Group slot N's resolver listens on `port_base + N`.
    pub port_base: u16,
    /// Where the filtering resolvers forward what they do not block: on OpenWrt
    /// the router's own dnsmasq, so LAN host names keep resolving.
    pub upstreams: Vec<String>,
    pub doh: DohList,
    pub cache_size: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            // Below Linux's ephemeral ports and clear of mDNS (5353) for every slot.
            port_base: 5400,
            upstreams: vec!["127.0.0.1".into()],
            doh: categories::builtin_doh(),
            cache_size: 1000,
        }
    }
}

/// An upstream is written into a resolver's configuration: only an address and
/// an optional `#port` pass.
pub fn validate_upstream(u: &str) -> Result<(), UpstreamError> {
    let (addr, port) = u.split_once('#').unwrap_or((u, "53"));
    let ok_addr = addr.parse::<std::net::IpAddr>().is_ok();
    let ok_port = port.parse::<u16>().is_ok_and(|p| p > 0);
    if ok_addr && ok_port {
        Ok(())
    } else {
        Err(UpstreamError(u.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("DNS upstream {0:?} is not an IP address with an optional #port")]
pub struct UpstreamError(String);

/// One filtered group's resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub group: GroupId,
    /// Over everything the servers file is made of: an equal key, an equal file.
    pub key: String,
    pub spec: InstanceSpec,
    pub blocked: usize,
    pub allowed: usize,
}

impl Planned {
    /// `group 3`, as messages name it.
    pub fn group_label(&self) -> &str {
        &self.spec.label
    }
}

/// Resolver instances by group slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsPlan {
    pub instances: BTreeMap<u8, Planned>,
}

pub fn instance_id(slot: u8) -> String {
    format!("g{slot}")
}

pub fn port_of(base: u16, slot: u8) -> u16 {
    base.saturating_add(slot as u16)
}

/// What each filtered group's resolver must hold. `previous` is the plan live now:
/// a group whose inputs did not change keeps its servers file without building it
/// again (100,000 domains are tens of milliseconds a time).
pub fn plan(
    desired: &Desired,
    cfg: &DnsConfig,
    lan_ifs: &[&str],
    previous: Option<&DnsPlan>,
) -> DnsPlan {
    let use_app = domain::normalize(categories::USE_APPLICATION_DNS).expect("valid name");
    let mut instances = BTreeMap::new();
    for (id, group) in &desired.groups {
        let dns = &group.policy.dns;
        let Some(&slot) = desired.slots.get(id) else {
            continue;
        };
        if !dns.filters() {
            continue;
        }
        let lists: Vec<&Category> = dns
            .categories
            .iter()
            .filter_map(|c| desired.categories.get(c).map(|c| c.as_ref()))
            .collect();
        let mut k = ring::digest::Context::new(&ring::digest::SHA256);
        for c in &lists {
            k.update(c.name.as_bytes());
            k.update(b"=");
            k.update(c.digest.as_bytes());
            k.update(b";");
        }
        for (tag, l) in [("b", &dns.block), ("a", &dns.allow), ("d", &cfg.doh.names)] {
            k.update(tag.as_bytes());
            k.update(digest_domains(l).as_bytes());
        }
        let key: String = k.finish().as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let reuse = previous
            .and_then(|p| p.instances.get(&slot))
            .filter(|p| p.key == key);
        let (servers, blocked, allowed) = match reuse {
            Some(p) => (p.spec.servers.clone(), p.blocked, p.allowed),
            None => {
                let mut blocks: Vec<&[Domain]> =
                    lists.iter().map(|c| c.domains.as_slice()).collect();
                blocks.push(&dns.block);
                blocks.push(&cfg.doh.names);
                blocks.push(std::slice::from_ref(&use_app));
                let f = servers_file::compile(&blocks, &dns.allow);
                // The canaries last: the resolver is asked for them after every
                // start and reload, to prove this very list is in force.
                let mut text = f.text;
                text.push_str(&dns_wire::canary_lines(&key));
                (Arc::new(text), f.blocked, f.allowed)
            }
        };
        let canary = dns_wire::list_canary(&key);
        instances.insert(
            slot,
            Planned {
                group: *id,
                key,
                spec: InstanceSpec {
                    id: instance_id(slot),
                    port: port_of(cfg.port_base, slot),
                    listen: Vec::new(),
                    interfaces: lan_ifs.iter().map(|i| (*i).to_owned()).collect(),
                    upstreams: cfg.upstreams.clone(),
                    servers,
                    cache_size: cfg.cache_size,
                    canary,
                    label: format!("group {id}"),
                },
                blocked,
                allowed,
            },
        );
    }
    DnsPlan { instances }
}
