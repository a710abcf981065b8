//! The pure core of per-group DNS filtering: no I/O, no processes, no async.
//!
//! It owns what a filtered group's resolver is told, from the names in: the normal
//! form of a domain name ([`domain`]), parsing user and shipped block lists
//! ([`list`]), the built-in categories and DoH endpoints ([`categories`]), and
//! compiling block and allow sets into dnsmasq `--servers-file` text ([`servers_file`]).
//! Writing that file, running dnsmasq and steering a group's port 53 to it belong to
//! the system layer and the policy engine. The list format is documented in
//! `docs/dns-lists.md`.

pub mod categories;
pub mod domain;
pub mod list;
pub mod servers_file;
