//! The block lists that ship inside the agent: the categories a group can block
//! by name, and the DNS-over-HTTPS endpoints every filtered group blocks so that a
//! browser cannot resolve around its filter. The lists are text files in
//! `agent/lists/`, compiled in (a router may have no way to fetch them); a unit test
//! proves each one parses without an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::domain::{self, Domain};
use super::list;

/// A category shipped with the agent.
#[derive(Debug)]
pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    /// The list, in the [`list::parse_text`] format.
    pub text: &'static str,
}

impl Builtin {
    /// The category's names. A shipped list parses without errors (tested).
    pub fn domains(&self) -> Vec<Domain> {
        list::parse_text(self.text).domains
    }
}

pub const BUILTIN: &[Builtin] = &[
    Builtin {
        name: "ads",
        description: "Advertising and tracking",
        text: include_str!("../../lists/ads.txt"),
    },
    Builtin {
        name: "adult",
        description: "Pornography and explicit content",
        text: include_str!("../../lists/adult.txt"),
    },
    Builtin {
        name: "social",
        description: "Social networks and their messengers",
        text: include_str!("../../lists/social.txt"),
    },
    Builtin {
        name: "gaming",
        description: "Game stores, online games and game streaming",
        text: include_str!("../../lists/gaming.txt"),
    },
    Builtin {
        name: "gambling",
        description: "Betting, casinos, poker and lotteries",
        text: include_str!("../../lists/gambling.txt"),
    },
];

pub fn builtin(name: &str) -> Option<&'static Builtin> {
    BUILTIN.iter().find(|b| b.name == name)
}

/// A category (built-in or custom) name: `[a-z0-9][a-z0-9_-]{0,31}`, so it can
/// name a file and a URL path segment as it is.
pub fn validate_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err("empty category name".into());
    };
    if bytes.len() > 32 {
        return Err(format!(
            "category name {:?} is {} bytes; at most 32",
            domain::shorten(name, 40),
            bytes.len()
        ));
    }
    if !matches!(first, b'a'..=b'z' | b'0'..=b'9') {
        return Err(format!(
            "category name {name:?} must start with a lower-case letter or a digit"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
    {
        return Err(format!(
            "category name {name:?} has {c:?}; only a-z, 0-9, '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// DoH endpoints to block: by name (the group's resolver answers NXDOMAIN) and by
/// address (for clients configured with a bare address). Each part sorted and
/// deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DohList {
    pub names: Vec<Domain>,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Parses the DoH list format: one entry per line, a host name or an IP address;
/// `#` comments and blank lines ignored. The first bad line is the error.
pub fn parse_doh(text: &str) -> Result<DohList, String> {
    let mut doh = DohList::default();
    for (index, raw) in text.lines().enumerate() {
        let entry = raw.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        match entry.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => doh.v4.push(a),
            Ok(IpAddr::V6(a)) => doh.v6.push(a),
            Err(_) => match domain::normalize(entry) {
                Ok(d) => doh.names.push(d),
                Err(e) => return Err(format!("line {}: {e}", index + 1)),
            },
        }
    }
    doh.names.sort_unstable();
    doh.names.dedup();
    doh.v4.sort_unstable();
    doh.v4.dedup();
    doh.v6.sort_unstable();
    doh.v6.dedup();
    Ok(doh)
}

const DOH_TEXT: &str = include_str!("../../lists/doh.txt");

/// The shipped DoH list.
pub fn builtin_doh() -> DohList {
    // A compiled-in constant; `shipped_lists_parse_cleanly` proves it parses.
    parse_doh(DOH_TEXT).expect("agent/lists/doh.txt parses")
}

/// Firefox asks for this name before enabling DoH by default, and leaves DoH off
/// when the answer is NXDOMAIN (the "canary domain"): filtered groups block it.
pub const USE_APPLICATION_DNS: &str = "use-application-dns.net";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_lists_parse_cleanly() {
        let names: Vec<&str> = BUILTIN.iter().map(|b| b.name).collect();
        assert_eq!(names, ["ads", "adult", "social", "gaming", "gambling"]);
        for b in BUILTIN {
            validate_name(b.name).unwrap();
            let list = list::parse_text(b.text);
            assert_eq!(list.errors, [], "{}", b.name);
            assert_eq!(list.duplicates, 0, "{}", b.name);
            let n = list.domains.len();
            assert!((30..=150).contains(&n), "{} has {n} domains", b.name);
            assert!(b.text.starts_with("# NetPilot built-in category"));
            assert_eq!(b.domains(), list.domains);
        }
        let doh = builtin_doh();
        assert!(doh.names.len() >= 20, "{doh:?}");
        for name in [
            "dns.google",
            "cloudflare-dns.com",
            "mozilla.cloudflare-dns.com",
            "dns.quad9.net",
            "doh.opendns.com",
            "dns.nextdns.io",
            "doh.cleanbrowsing.org",
            "dns.adguard-dns.com",
        ] {
            assert!(doh.names.iter().any(|d| d.as_str() == name), "{name}");
        }
        for a in [
            "8.8.8.8",
            "8.8.4.4",
            "1.1.1.1",
            "1.0.0.1",
            "9.9.9.9",
            "149.112.112.112",
            "208.67.222.222",
            "208.67.220.220",
            "94.140.14.14",
        ] {
            assert!(doh.v4.contains(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2620:fe::fe",
        ] {
            assert!(doh.v6.contains(&a.parse().unwrap()), "{a}");
        }
        assert_eq!(
            domain::normalize(USE_APPLICATION_DNS).unwrap().as_str(),
            USE_APPLICATION_DNS
        );
    }

    #[test]
    fn categories_are_found_by_name() {
        assert_eq!(builtin("gambling").map(|b| b.name), Some("gambling"));
        assert!(builtin("Gambling").is_none());
        assert!(builtin("news").is_none());
    }

    #[test]
    fn category_names() {
        for ok in ["ads", "0day", "my-list_2", &"a".repeat(32)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_name(""), Err("empty category name".into()));
        assert_eq!(
            validate_name("-ads"),
            Err("category name \"-ads\" must start with a lower-case letter or a digit".into())
        );
        assert_eq!(
            validate_name("Ads"),
            Err("category name \"Ads\" must start with a lower-case letter or a digit".into())
        );
        assert_eq!(
            validate_name("ads/x"),
            Err("category name \"ads/x\" has '/'; only a-z, 0-9, '_' and '-' are allowed".into())
        );
        assert_eq!(
            validate_name(&"a".repeat(33)),
            Err(format!(
                "category name {:?} is 33 bytes; at most 32",
                "a".repeat(33)
            ))
        );
    }

    #[test]
    fn doh_list_format() {
        let doh =
            parse_doh("# c\n\nDNS.Example.\n9.9.9.9 # quad9\n2620:fe::fe\n9.9.9.9\ndns.example\n")
                .unwrap();
        assert_eq!(
            doh.names.iter().map(Domain::as_str).collect::<Vec<_>>(),
            ["dns.example"]
        );
        assert_eq!(doh.v4, [Ipv4Addr::new(9, 9, 9, 9)]);
        assert_eq!(doh.v6, ["2620:fe::fe".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(
            parse_doh("ok.example\nbad name\n"),
            Err(r#"line 2: "bad name": contains a space (one name per entry)"#.into())
        );
    }
}
