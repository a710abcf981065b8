//! The few bytes of the DNS wire format (RFC 1035) the agent needs to ask a
//! filtering resolver one question and judge its answer: is the canary refused the
//! way a blocked name is? No I/O; the socket is in `super::dnsmasq`.
//!
//! The canary: every filtering resolver's servers file blocks [`CANARY`] (fixed, for
//! people checking by hand) and a name unique to that version of the file
//! ([`list_canary`]), so an answer from the list before a reload cannot pass for the
//! new list being in force. `.invalid` is reserved (RFC 6761): no real name is hidden.

use std::fmt;

/// Blocked by every filtering resolver; `dig canary.netpilot.invalid` from a
/// filtered device answers NXDOMAIN when filtering is in force.
pub const CANARY: &str = "canary.netpilot.invalid";

/// The canary of one version of a servers file (`key`: `[0-9a-f]{16}`, the digest of
/// what the file is made of).
pub fn list_canary(key: &str) -> String {
    format!("{key}.list.netpilot.invalid")
}

/// The servers-file lines that block both canaries. They are appended after the
/// compiled list: longer than any allowed parent, so an allow entry cannot lift them
/// (dnsmasq uses the longest matching domain).
pub fn canary_lines(key: &str) -> String {
    format!("server=/{CANARY}/\nserver=/{}/\n", list_canary(key))
}

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("name {0:?} cannot be put in a query")]
    BadName(String),
    #[error("reply of {0} bytes is shorter than a DNS header")]
    Short(usize),
    #[error("reply id {got:#06x} does not match the query's {want:#06x}")]
    WrongId { got: u16, want: u16 },
    #[error("not a reply")]
    NotReply,
}

/// A recursive query for the A records of `name`.
pub fn query(id: u16, name: &str) -> Result<Vec<u8>, MessageError> {
    let bad = || MessageError::BadName(name.to_owned());
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // RD set: a client asks like this; one question, nothing else.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&TYPE_A.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

/// What the header of a reply says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub rcode: u8,
    pub answers: u16,
    pub authority: u16,
    pub truncated: bool,
}

/// The header of `reply` to the query with `id`.
pub fn parse_reply(id: u16, reply: &[u8]) -> Result<Reply, MessageError> {
    if reply.len() < 12 {
        return Err(MessageError::Short(reply.len()));
    }
    let got = u16::from_be_bytes([reply[0], reply[1]]);
    if got != id {
        return Err(MessageError::WrongId { got, want: id });
    }
    if reply[2] & 0x80 == 0 {
        return Err(MessageError::NotReply);
    }
    Ok(Reply {
        rcode: reply[3] & 0x0f,
        truncated: reply[2] & 0x02 != 0,
        answers: u16::from_be_bytes([reply[6], reply[7]]),
        authority: u16::from_be_bytes([reply[8], reply[9]]),
    })
}

impl Reply {
    /// Answered the way dnsmasq answers a `server=/name/` line: NXDOMAIN made up
    /// locally, with no record at all. A name forwarded unfiltered gets an address,
    /// a REFUSED or SERVFAIL, or an NXDOMAIN that carries the zone's SOA (RFC 2308;
    /// real resolvers send it, and dnsmasq passes it on).
    pub fn is_blocked(&self) -> bool {
        self.rcode == RCODE_NXDOMAIN && self.answers == 0 && self.authority == 0
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rcode = match self.rcode {
            0 => "NOERROR".to_owned(),
            1 => "FORMERR".to_owned(),
            2 => "SERVFAIL".to_owned(),
            3 => "NXDOMAIN".to_owned(),
            4 => "NOTIMP".to_owned(),
            5 => "REFUSED".to_owned(),
            n => format!("rcode {n}"),
        };
        write!(
            f,
            "{rcode} with {} answer(s) and {} authority record(s)",
            self.answers, self.authority
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_the_wire_format() {
        let q = query(0xbeef, "canary.netpilot.invalid.").unwrap();
        let mut want = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"\x06canary\x08netpilot\x07invalid\x00\x00\x01\x00\x01");
        assert_eq!(q, want);
        for bad in ["", ".", "a..b", "a b.test", &"x".repeat(64), "a/b"] {
            assert!(query(1, bad).is_err(), "{bad:?}");
        }
        assert!(query(1, &["a"; 130].join(".")).is_err(), "over 253 bytes");
    }

    /// A reply header with these flags and counts.
    fn reply(id: u16, flags: [u8; 2], an: u16, ns: u16) -> Vec<u8> {
        let mut r = id.to_be_bytes().to_vec();
        r.extend_from_slice(&flags);
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&an.to_be_bytes());
        r.extend_from_slice(&ns.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r
    }

    #[test]
    fn only_a_bare_local_nxdomain_counts_as_blocked() {
        // dnsmasq's answer for a `server=/name/` line (captured with dig: "qr ra",
        // NXDOMAIN, no answer, no authority).
        let blocked = parse_reply(7, &reply(7, [0x81, 0x83], 0, 0)).unwrap();
        assert!(blocked.is_blocked());
        assert_eq!(
            blocked.to_string(),
            "NXDOMAIN with 0 answer(s) and 0 authority record(s)"
        );
        for (flags, an, ns, what) in [
            ([0x81, 0x80], 1, 0, "an address"),
            ([0x81, 0x85], 0, 0, "REFUSED (no upstream answered)"),
            ([0x81, 0x82], 0, 0, "SERVFAIL"),
            ([0x81, 0x83], 0, 1, "an upstream NXDOMAIN with its SOA"),
        ] {
            let r = parse_reply(9, &reply(9, flags, an, ns)).unwrap();
            assert!(!r.is_blocked(), "{what}: {r}");
        }
        let r = parse_reply(9, &reply(9, [0x83, 0x80], 0, 0)).unwrap();
        assert!(r.truncated);
    }

    #[test]
    fn replies_that_are_not_ours_are_refused() {
        assert_eq!(parse_reply(1, &[0; 5]), Err(MessageError::Short(5)));
        assert_eq!(
            parse_reply(1, &reply(2, [0x81, 0x83], 0, 0)),
            Err(MessageError::WrongId { got: 2, want: 1 })
        );
        assert_eq!(
            parse_reply(1, &reply(1, [0x01, 0x00], 0, 0)),
            Err(MessageError::NotReply)
        );
    }

    #[test]
    fn the_canary_lines_block_both_names() {
        assert_eq!(
            canary_lines("00aa"),
            "server=/canary.netpilot.invalid/\nserver=/00aa.list.netpilot.invalid/\n"
        );
        query(1, &list_canary("0123456789abcdef")).unwrap();
    }
}
