//! DNS filtering inside the policy engine: the category lists (shipped ones and
//! those replaced through the API) and the pure plan of which filtered group gets
//! which resolver instance, on which port, with which servers file. The nftables
//! side (redirects, DoT/DoH/QUIC refusals) is in `compile`; running the resolvers is
//! `system::dnsmasq`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::model::{Category, Desired, GroupId};
use crate::dns::categories::{self, DohList};
use crate::dns::domain::{self, Domain};
use crate::dns::filter;
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

pub fn digest_domains(domains: &[Domain]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for d in domains {
        ctx.update(d.as_str().as_bytes());
        ctx.update(b"\n");
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A category named `name`; it is `builtin` when the agent ships one of that name.
pub fn category(
    name: &str,
    description: &str,
    domains: Vec<Domain>,
    updated_unix: Option<i64>,
) -> Category {
    Category {
        name: name.to_owned(),
        description: description.to_owned(),
        digest: digest_domains(&domains),
        domains: Arc::new(domains),
        builtin: categories::builtin(name).is_some(),
        updated_unix,
    }
}

/// The lists the agent ships, parsed once.
pub fn builtin_categories() -> BTreeMap<String, Arc<Category>> {
    static PARSED: std::sync::OnceLock<BTreeMap<String, Arc<Category>>> =
        std::sync::OnceLock::new();
    PARSED.get_or_init(parse_builtin).clone()
}

fn parse_builtin() -> BTreeMap<String, Arc<Category>> {
    categories::BUILTIN
        .iter()
        .map(|b| {
            let parsed = crate::dns::list::parse_text(b.text);
            debug_assert_eq!(parsed.error_count, 0, "shipped list {} parses", b.name);
            (
                b.name.to_owned(),
                Arc::new(category(b.name, b.description, parsed.domains, None)),
            )
        })
        .collect()
}

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
    lan_if: &str,
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
                let f = filter::compile(&blocks, &dns.allow);
                (Arc::new(f.text), f.blocked, f.allowed)
            }
        };
        instances.insert(
            slot,
            Planned {
                group: *id,
                key,
                spec: InstanceSpec {
                    id: instance_id(slot),
                    port: port_of(cfg.port_base, slot),
                    listen: Vec::new(),
                    interface: lan_if.to_owned(),
                    upstreams: cfg.upstreams.clone(),
                    servers,
                    cache_size: cfg.cache_size,
                },
                blocked,
                allowed,
            },
        );
    }
    DnsPlan { instances }
}
