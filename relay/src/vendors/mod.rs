//! MAC vendors (issue 17): who made a device, from the IEEE registry. Owns the
//! registry the relay looks MACs up in — IEEE's MA-L, MA-M and MA-S blocks (and the
//! CID and IAB ones) as the `oui-data` crate embeds them, under an overlay of
//! IEEE-format CSV files an operator loads at start — and the rule between them:
//! the longest prefix wins, and at equal length the operator's file (it is newer).
//! A locally administered MAC (the 0x02 bit of the first octet: randomized, or
//! made up) names no vendor, whatever matches. Pure apart from reading those files
//! once at start; [`enrich`] holds the answer transforms, and which routes list
//! devices is [`DEVICE_ROUTES`].
//!
//! The registry lives on the relay, not the router: it is several MB, and a router's
//! flash has no room for it (README, "MAC vendors").

pub mod enrich;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use netpilot_proto::routes::Method;

/// The calls whose answers list devices (objects with a `mac`), which the relay
/// enriches; every other answer passes as the agent sent it. `GET
/// /api/device-usage/history` covers the CSV export too (`format=csv`).
pub const DEVICE_ROUTES: &[(Method, &str)] = &[
    (Method::Get, "/api/scan"),
    (Method::Get, "/api/device-usage/current"),
    (Method::Get, "/api/device-usage/device/{mac}"),
    (Method::Get, "/api/device-usage/history"),
    (Method::Get, "/api/device-usage/summary"),
    (Method::Get, "/api/groups"),
    (Method::Get, "/api/groups/{id}"),
    // Group changes answer with the group as stored, its devices included.
    (Method::Post, "/api/groups/sync"),
    (Method::Put, "/api/groups/{id}/policy"),
    // Their entries get a vendor when they carry a `mac` member (`null` for an
    // address entry's `null`); entries of only `target` and `kind` get none.
    (Method::Get, "/api/blocked"),
    (Method::Get, "/api/whitelist"),
    (Method::Get, "/api/blacklist"),
];

/// Whether answers to `method` `pattern` list devices.
pub fn lists_devices(method: Method, pattern: &str) -> bool {
    DEVICE_ROUTES
        .iter()
        .any(|(m, p)| *m == method && *p == pattern)
}

/// Why the vendor files could not be loaded; the relay does not start.
#[derive(Debug, thiserror::Error)]
pub enum VendorsError {
    #[error("cannot read vendor file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid vendor file {path} line {line}: {why}")]
    Row {
        path: PathBuf,
        line: u64,
        why: String,
    },
}

/// A MAC address, its 48 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(u64);

impl Mac {
    /// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` (either case) or twelve hex digits.
    pub fn parse(text: &[u8]) -> Option<Mac> {
        let mut v = 0u64;
        match text.len() {
            12 => {
                for c in text {
                    v = v << 4 | u64::from(hex_value(*c)?);
                }
            }
            17 => {
                let sep = text[2];
                if sep != b':' && sep != b'-' {
                    return None;
                }
                for (i, c) in text.iter().enumerate() {
                    if i % 3 == 2 {
                        if *c != sep {
                            return None;
                        }
                    } else {
                        v = v << 4 | u64::from(hex_value(*c)?);
                    }
                }
            }
            _ => return None,
        }
        Some(Mac(v))
    }

    /// Locally administered (the 0x02 bit of the first octet): a randomized
    /// ("private") address, or one made up by software; no vendor owns it.
    pub fn is_local(self) -> bool {
        (self.0 >> 40) & 0x02 != 0
    }

    /// The first `digits` hex digits.
    fn prefix(self, digits: u32) -> u64 {
        self.0 >> (4 * (12 - digits))
    }

    /// Twelve upper-case hex digits, on the stack.
    fn hex(self) -> [u8; 12] {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [0u8; 12];
        for (i, c) in out.iter_mut().enumerate() {
            *c = HEX[(self.0 >> (4 * (11 - i)) & 0xf) as usize];
        }
        out
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// What the registry says of one MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The organization the block is assigned to (IEEE's `Private` is one: an
    /// assignee that asked not to be named).
    Vendor(&'a str),
    /// A locally administered address: no vendor, ever.
    Local,
    /// No block holds it.
    Unknown,
}

/// The registry: the embedded one and the operator's overlay.
pub struct Vendors {
    overlay: Overlay,
    /// Embedded names as IEEE wrote them where `oui-data` changed them (its build
    /// turns two spaces into a line break), by assignment.
    repaired: HashMap<&'static str, Box<str>>,
}

/// The blocks of the operator's files: one table over all three lengths (the key
/// holds the prefix and its length in hex digits), names in one string.
#[derive(Default)]
struct Overlay {
    blocks: HashMap<u64, (u32, u32)>,
    names: String,
}

/// Block lengths, longest first: MA-S (and IAB), MA-M, MA-L (and CID).
const LENGTHS: [u32; 3] = [9, 7, 6];

fn key(digits: u32, prefix: u64) -> u64 {
    u64::from(digits) << 40 | prefix
}

impl Overlay {
    fn get(&self, digits: u32, mac: Mac) -> Option<&str> {
        let (start, len) = *self.blocks.get(&key(digits, mac.prefix(digits)))?;
        self.names
            .get(start as usize..start as usize + len as usize)
    }
}

impl Vendors {
    /// The embedded registry alone.
    pub fn embedded() -> Vendors {
        let repaired = oui_data::OUI_ENTRIES
            .values()
            .filter(|e| e.organization().contains('\n'))
            .map(|e| (e.oui(), e.organization().replace('\n', "  ").into()))
            .collect();
        Vendors {
            overlay: Overlay::default(),
            repaired,
        }
    }

    /// The embedded registry under the blocks of `files` (IEEE's CSV format), read
    /// in order: a later file's block wins over an earlier file's of the same
    /// assignment. Any file that cannot be read, or any bad row, is an error.
    pub fn load(files: &[PathBuf]) -> Result<Vendors, VendorsError> {
        let mut v = Vendors::embedded();
        let mut names: HashMap<Box<str>, (u32, u32)> = HashMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|source| VendorsError::Read {
                path: path.clone(),
                source,
            })?;
            v.overlay_from(std::io::BufReader::new(file), path, &mut names)?;
        }
        v.overlay.blocks.shrink_to_fit();
        v.overlay.names.shrink_to_fit();
        Ok(v)
    }

    /// Reads one IEEE-format CSV into the overlay; `path` names it in errors,
    /// `names` shares equal organization names between rows and files.
    fn overlay_from(
        &mut self,
        input: impl std::io::Read,
        path: &Path,
        names: &mut HashMap<Box<str>, (u32, u32)>,
    ) -> Result<(), VendorsError> {
        let bad = |line: u64, why: String| VendorsError::Row {
            path: path.to_owned(),
            line,
            why,
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(input);
        let mut record = csv::StringRecord::new();
        let mut header = true;
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    let why = match e.kind() {
                        csv::ErrorKind::Utf8 { err, .. } => format!("not UTF-8 text ({err})"),
                        _ => e.to_string(),
                    };
                    return Err(match e.into_kind() {
                        csv::ErrorKind::Io(source) => VendorsError::Read {
                            path: path.to_owned(),
                            source,
                        },
                        _ => bad(line, why),
                    });
                }
            }
            let line = record.position().map_or(0, |p| p.line());
            if header {
                header = false;
                let first = record.get(0).unwrap_or("").trim_start_matches('\u{feff}');
                let names: Vec<&str> = std::iter::once(first)
                    .chain(record.iter().skip(1))
                    .map(str::trim)
                    .take(3)
                    .collect();
                if names != ["Registry", "Assignment", "Organization Name"] {
                    return Err(bad(
                        line,
                        "the first row must be IEEE's header, \
                         \"Registry,Assignment,Organization Name,Organization Address\""
                            .into(),
                    ));
                }
                continue;
            }
            let field = |i: usize| record.get(i).map(str::trim).unwrap_or("");
            if record.len() < 3 {
                return Err(bad(
                    line,
                    format!("{} fields; a row has at least 3", record.len()),
                ));
            }
            let (registry, assignment, organization) = (field(0), field(1), field(2));
            let digits = match registry {
                "MA-L" | "CID" => 6,
                "MA-M" => 7,
                "MA-S" | "IAB" => 9,
                other => {
                    return Err(bad(
                        line,
                        format!(
                            "registry {:?} is none of MA-L, MA-M, MA-S, CID, IAB",
                            short(other)
                        ),
                    ))
                }
            };
            let prefix = (assignment.len() == digits as usize)
                .then(|| {
                    assignment
                        .bytes()
                        .try_fold(0u64, |v, c| Some(v << 4 | u64::from(hex_value(c)?)))
                })
                .flatten()
                .ok_or_else(|| {
                    bad(
                        line,
                        format!(
                            "{registry} assignment {:?} is not {digits} hex digits",
                            short(assignment)
                        ),
                    )
                })?;
            if organization.is_empty() {
                return Err(bad(line, "no organization name".into()));
            }
            let overlay = &mut self.overlay;
            let at = match names.get(organization) {
                Some(at) => *at,
                None => {
                    let too_many =
                        |_| bad(line, "the vendor files hold over 4 GiB of names".into());
                    let start = u32::try_from(overlay.names.len()).map_err(too_many)?;
                    let len = u32::try_from(organization.len()).map_err(too_many)?;
                    overlay.names.push_str(organization);
                    let at = (start, len);
                    names.insert(organization.into(), at);
                    at
                }
            };
            overlay.blocks.insert(key(digits, prefix), at);
        }
        if header {
            return Err(bad(1, "empty: IEEE's header row is missing".into()));
        }
        Ok(())
    }

    /// Blocks in the embedded registry.
    pub fn embedded_entries(&self) -> usize {
        oui_data::OUI_ENTRIES.len()
    }

    /// Blocks loaded from the operator's files.
    pub fn file_entries(&self) -> usize {
        self.overlay.blocks.len()
    }

    /// The vendor of `mac`: the longest block that holds it, the operator's at
    /// equal length. Allocates nothing.
    pub fn lookup(&self, mac: Mac) -> Lookup<'_> {
        if mac.is_local() {
            return Lookup::Local;
        }
        let hex = mac.hex();
        // Twelve upper-case hex digits: `oui_data::lookup` takes them as they are
        // (it allocates only to normalise other spellings).
        let embedded = std::str::from_utf8(&hex).ok().and_then(oui_data::lookup);
        let embedded_digits = embedded.map_or(0, |e| e.oui().len() as u32);
        for digits in LENGTHS.into_iter().filter(|d| *d >= embedded_digits) {
            if let Some(name) = self.overlay.get(digits, mac) {
                return Lookup::Vendor(name);
            }
        }
        match embedded {
            Some(e) => Lookup::Vendor(
                self.repaired
                    .get(e.oui())
                    .map_or(e.organization(), |name| name),
            ),
            None => Lookup::Unknown,
        }
    }
}

/// Operator-written text quoted in an error stays short.
fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests;
