//! Compiles a filtered group's block and allow sets into the text of a dnsmasq
//! `--servers-file`, the configuration of that group's resolver.
//!
//! Semantics: a name is blocked iff some blocked entry covers it (is equal to it or
//! a parent of it) and no allowed entry covers it; allowed wins outright. dnsmasq
//! gives that with two kinds of line, because it uses the longest matching domain:
//!
//! - `server=/d/` (no upstream): answered locally, NXDOMAIN for `d` and below;
//! - `server=/a/#`: forwarded to the normal upstreams, for an allowed `a` that lies
//!   inside a blocked `d`.
//!
//! The output is the minimal set of such lines: a blocked entry under another blocked
//! entry, or under an allowed entry, adds nothing, and an allowed entry outside every
//! block needs no line. Equal inputs give byte-equal text, so the shell can compare
//! it with the file on disk before reloading dnsmasq.

use std::fmt::Write;

use super::domain::Domain;

/// A compiled filter: the file's text and its line counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterFile {
    pub text: String,
    /// `server=/d/` lines written.
    pub blocked: usize,
    /// `server=/a/#` lines written.
    pub allowed: usize,
}

/// `blocked`: every list the group blocks (categories, its own blockDomains, DoH
/// names, use-application-dns.net).
/// `allowed`: the group's allowDomains. Semantics: a name is blocked iff some
/// blocked entry covers it (equal or subdomain) and no allowed entry covers it —
/// allowed wins outright.
pub fn compile(blocked: &[&[Domain]], allowed: &[Domain]) -> FilterFile {
    let allow = Cover::of(allowed.iter());
    let all_blocks = Cover::of(blocked.iter().flat_map(|list| list.iter()));
    // Both sides are minimal covers in key order: one merge pass each.
    let allow_entries: Vec<&Entry> = allow.entries.iter().collect();
    let mut next_allow = Walker::new(&allow.keys, &allow_entries);
    let block: Vec<&Entry> = all_blocks
        .entries
        .iter()
        .filter(|e| !next_allow.covered(all_blocks.key(e)))
        .collect();
    let mut next_block = Walker::new(&all_blocks.keys, &block);
    // An allowed name needs a line only strictly inside a remaining block (one
    // equal to a block removed that block above).
    let holes: Vec<&Entry> = allow_entries
        .iter()
        .copied()
        .filter(|e| {
            let key = allow.key(e);
            next_block.covered(key) && next_block.candidate_len() < key.len()
        })
        .collect();

    let size: usize = block.iter().map(|e| e.name.len() + 10).sum::<usize>()
        + holes.iter().map(|e| e.name.len() + 11).sum::<usize>()
        + 64;
    let mut text = String::with_capacity(size);
    let _ = writeln!(
        text,
        "# netpilot dns filter: {} blocked, {} allowed",
        block.len(),
        holes.len()
    );
    for e in &block {
        text.push_str("server=/");
        text.push_str(e.name);
        text.push_str("/\n");
    }
    for e in &holes {
        text.push_str("server=/");
        text.push_str(e.name);
        text.push_str("/#\n");
    }
    FilterFile {
        text,
        blocked: block.len(),
        allowed: holes.len(),
    }
}

/// A name and where its sort key lies in [`Cover::keys`]. The key is the labels in
/// reverse order, each followed by a 0 byte (`ads.example.com` →
/// `com\0example\0ads\0`). Sorted by key, a name's subdomains follow it directly (0
/// sorts before every label byte, so `example-x.com` cannot fall between
/// `example.com` and `ads.example.com`), and "covered by" is "the key starts with",
/// which makes both the minimal cover and the comparison of two covers linear passes.
struct Entry<'a> {
    start: usize,
    end: usize,
    name: &'a str,
}

/// Names sorted by key, without duplicates and without any name covered by another
/// of them. All keys share one buffer: one allocation, not one per name.
struct Cover<'a> {
    keys: Vec<u8>,
    entries: Vec<Entry<'a>>,
}

impl<'a> Cover<'a> {
    fn of(names: impl Iterator<Item = &'a Domain>) -> Self {
        let mut keys = Vec::new();
        let mut entries = Vec::new();
        for d in names {
            let start = keys.len();
            for label in d.as_str().rsplit('.') {
                keys.extend_from_slice(label.as_bytes());
                keys.push(0);
            }
            entries.push(Entry {
                start,
                end: keys.len(),
                name: d.as_str(),
            });
        }
        let key = |e: &Entry| &keys[e.start..e.end];
        entries.sort_unstable_by(|a, b| key(a).cmp(key(b)));
        let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
        for e in entries {
            match kept.last() {
                Some(last) if key(&e).starts_with(key(last)) => {}
                _ => kept.push(e),
            }
        }
        Cover {
            keys,
            entries: kept,
        }
    }

    fn key(&self, e: &Entry) -> &[u8] {
        &self.keys[e.start..e.end]
    }
}

/// Answers "is this key covered by an entry of the cover?" for keys asked in
/// ascending order. In a minimal cover the only entry that can cover a key is the
/// greatest one not above it (an entry between it and the key would lie inside it).
struct Walker<'k> {
    keys: &'k [u8],
    entries: &'k [&'k Entry<'k>],
    next: usize,
    candidate: Option<&'k [u8]>,
}

impl<'k> Walker<'k> {
    fn new(keys: &'k [u8], entries: &'k [&'k Entry<'k>]) -> Self {
        Walker {
            keys,
            entries,
            next: 0,
            candidate: None,
        }
    }

    fn covered(&mut self, key: &[u8]) -> bool {
        while let Some(e) = self.entries.get(self.next) {
            let k = &self.keys[e.start..e.end];
            if k > key {
                break;
            }
            self.candidate = Some(k);
            self.next += 1;
        }
        self.candidate.is_some_and(|c| key.starts_with(c))
    }

    fn candidate_len(&self) -> usize {
        self.candidate.map_or(0, <[u8]>::len)
    }
}

#[cfg(test)]
mod tests {
    use super::super::domain::{is_within, normalize};
    use super::*;

    fn domains(names: &[&str]) -> Vec<Domain> {
        names.iter().map(|n| normalize(n).unwrap()).collect()
    }

    #[test]
    fn golden_small_case() {
        let category = domains(&[
            "ads.example.com",
            "x.ads.example.com",
            "tracker.example.net",
            "example-x.com",
            "games.example.org",
        ]);
        let own = domains(&["ads.example.com", "b.example-x.com", "social.example"]);
        let doh = domains(&["dns.example.net", "use-application-dns.net"]);
        let allowed = domains(&[
            "ok.ads.example.com",
            "deep.ok.ads.example.com",
            "games.example.org",
            "unrelated.example",
            "example.net",
        ]);
        let file = compile(&[&category, &own, &doh], &allowed);
        assert_eq!(
            file.text,
            include_str!("golden/filter_small.txt"),
            "got:\n{}",
            file.text
        );
        assert_eq!((file.blocked, file.allowed), (4, 1));
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let a = domains(&["b.example", "a.example", "c.a.example", "z.example"]);
        let mut b = a.clone();
        b.reverse();
        let allowed = domains(&["ok.b.example"]);
        let one = compile(&[&a], &allowed);
        let two = compile(&[&b[..2], &b[2..]], &allowed);
        assert_eq!(one, two);
        assert_eq!(
            compile(&[], &[]).text,
            "# netpilot dns filter: 0 blocked, 0 allowed\n"
        );
    }

    /// What dnsmasq does with the file: the longest matching `server=` domain
    /// decides; `#` forwards, an empty server answers NXDOMAIN.
    fn dnsmasq_blocks(text: &str, query: &str) -> bool {
        let mut best: Option<(&str, bool)> = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let rule = line.strip_prefix("server=/").unwrap();
            let (domain, forward) = match rule.strip_suffix("/#") {
                Some(d) => (d, true),
                None => (rule.strip_suffix('/').unwrap(), false),
            };
            if is_within(query, domain) && best.is_none_or(|(b, _)| domain.len() > b.len()) {
                best = Some((domain, forward));
            }
        }
        matches!(best, Some((_, false)))
    }

    #[test]
    fn output_implements_the_semantics() {
        // Small random worlds over a few labels, so that entries nest, collide and
        // shadow each other often; every name of the world is queried.
        let labels = ["a", "b", "c", "a-b"];
        let mut rng = netpilot_testkit::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next_u64();
        let mut world = Vec::new();
        for x in labels {
            world.push(format!("{x}.test"));
            for y in labels {
                world.push(format!("{y}.{x}.test"));
                for z in labels {
                    world.push(format!("{z}.{y}.{x}.test"));
                }
            }
        }
        let world: Vec<Domain> = world.iter().map(|n| normalize(n).unwrap()).collect();
        let (mut blocked_seen, mut allowed_seen) = (0, 0);
        for _ in 0..300 {
            let pick = |next: &mut dyn FnMut() -> u64, n: u64| -> Vec<Domain> {
                let count = next() % n;
                (0..count)
                    .map(|_| world[(next() % world.len() as u64) as usize].clone())
                    .collect()
            };
            let b1 = pick(&mut next, 8);
            let b2 = pick(&mut next, 4);
            let allow = pick(&mut next, 5);
            let file = compile(&[&b1, &b2], &allow);
            let mut blocks = 0;
            let mut forwards = 0;
            for q in &world {
                let q = q.as_str();
                let covered = |list: &[Domain]| list.iter().any(|d| is_within(q, d.as_str()));
                let want = (covered(&b1) || covered(&b2)) && !covered(&allow);
                assert_eq!(
                    dnsmasq_blocks(&file.text, q),
                    want,
                    "query {q}\nblocked {b1:?} {b2:?}\nallowed {allow:?}\n{}",
                    file.text
                );
                blocks += usize::from(want);
                forwards += usize::from(!want);
            }
            blocked_seen += blocks;
            allowed_seen += forwards;
            let lines = file.text.lines().count() - 1;
            assert_eq!(lines, file.blocked + file.allowed);
            // Minimal: no blocked line is covered by another line.
            let names: Vec<&str> = file
                .text
                .lines()
                .skip(1)
                .map(|l| {
                    l.trim_start_matches("server=/")
                        .trim_end_matches('#')
                        .trim_end_matches('/')
                })
                .collect();
            for (i, a) in names.iter().enumerate().take(file.blocked) {
                for (j, b) in names.iter().enumerate().take(file.blocked) {
                    assert!(i == j || !is_within(a, b), "{a} under {b}\n{}", file.text);
                }
            }
        }
        assert!(
            blocked_seen > 1000 && allowed_seen > 1000,
            "{blocked_seen} {allowed_seen}"
        );
    }
}
