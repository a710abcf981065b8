//! The answer transforms of vendor enrichment: `vendor` added to every device
//! object of a JSON answer ([`json`]), and a `vendor` column appended to the usage
//! CSV export as it streams ([`Csv`]). Both change nothing else: no JSON is parsed
//! into values and written again, so key order, whitespace and the spelling of
//! numbers stay byte for byte as the agent sent them. Pure, linear in the input,
//! and bounded in what they allocate.

use std::borrow::Cow;

use super::{Lookup, Mac, Vendors};

/// What one answer's look-ups found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// A vendor named.
    pub hit: u64,
    /// A MAC no block holds, or a value that is not a MAC.
    pub miss: u64,
    /// A locally administered MAC (randomized): no vendor by rule.
    pub private: u64,
}

impl Counts {
    fn count(&mut self, found: Option<Lookup<'_>>) {
        match found {
            Some(Lookup::Vendor(_)) => self.hit += 1,
            Some(Lookup::Local) => self.private += 1,
            Some(Lookup::Unknown) | None => self.miss += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.hit + self.miss + self.private
    }
}

fn vendor_of(mac: Option<Mac>, vendors: &Vendors) -> Option<Lookup<'_>> {
    mac.map(|m| vendors.lookup(m))
}

fn name<'a>(found: Option<Lookup<'a>>) -> Option<&'a str> {
    match found {
        Some(Lookup::Vendor(name)) => Some(name),
        _ => None,
    }
}

// ---- JSON ----------------------------------------------------------------------

/// The member added: `,"vendor":` and a JSON string or `null`.
const MEMBER: &[u8] = b",\"vendor\":";

/// `body` with `"vendor"` added as the last member of every object (at any depth)
/// that has a `"mac"` member and no `"vendor"` one: the vendor's name, or `null`
/// for a MAC that does not parse, is locally administered or no block holds.
/// `body` is an envelope already checked as JSON; anything else comes back
/// unharmed but perhaps unenriched. Borrowed when there was nothing to add.
pub fn json<'a>(body: &'a [u8], vendors: &Vendors) -> (Cow<'a, [u8]>, Counts) {
    let mut counts = Counts::default();
    // Where each member goes (just after its object's last value) and its vendor.
    let mut inserts: Vec<(usize, Option<&str>)> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => i += 1,
            b',' => {
                if let Some(f) = stack.last_mut() {
                    f.expect_key = f.object;
                }
                i += 1;
            }
            b'{' | b'[' => {
                stack.push(Frame::open(body[i] == b'{', i + 1));
                i += 1;
            }
            b'}' | b']' => {
                if let Some(f) = stack.pop() {
                    if f.object && !f.has_vendor {
                        if let Some(mac) = f.mac {
                            let found = vendor_of(mac, vendors);
                            counts.count(found);
                            inserts.push((f.value_end, name(found)));
                        }
                    }
                }
                i += 1;
                value_ended(&mut stack, i);
            }
            b'"' => {
                let (end, escaped) = string_end(body, i);
                let text = &body[i..end];
                match stack.last_mut() {
                    Some(f) if f.expect_key => {
                        f.expect_key = false;
                        f.key = match text {
                            b"\"mac\"" => Key::Mac,
                            b"\"vendor\"" => Key::Vendor,
                            _ if !escaped => Key::Other,
                            _ => match decoded(text).as_deref() {
                                Some(b"mac") => Key::Mac,
                                Some(b"vendor") => Key::Vendor,
                                _ => Key::Other,
                            },
                        };
                        match f.key {
                            // Until its value says otherwise: not a MAC.
                            Key::Mac => f.mac = Some(None),
                            Key::Vendor => f.has_vendor = true,
                            Key::Other => {}
                        }
                    }
                    Some(f) if f.key == Key::Mac => {
                        f.mac = Some(decoded(text).and_then(|t| Mac::parse(&t)));
                        value_ended(&mut stack, end);
                    }
                    _ => value_ended(&mut stack, end),
                }
                i = end;
            }
            _ => {
                // A number, `true`, `false` or `null`: up to the next delimiter.
                let end = body[i..]
                    .iter()
                    .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .map_or(body.len(), |n| i + n);
                value_ended(&mut stack, end.max(i + 1));
                i = end.max(i + 1);
            }
        }
    }
    if inserts.is_empty() {
        return (Cow::Borrowed(body), counts);
    }
    let added: usize = inserts
        .iter()
        .map(|(_, v)| MEMBER.len() + v.map_or(4, |n| n.len() + 2))
        .sum();
    // Escapes (rare in names) may grow it past this once.
    let mut out = Vec::with_capacity(body.len() + added + 16);
    let mut copied = 0;
    for (at, vendor) in inserts {
        // In order by construction; `max` keeps malformed input from going back.
        let at = at.clamp(copied, body.len());
        out.extend_from_slice(&body[copied..at]);
        out.extend_from_slice(MEMBER);
        match vendor {
            Some(name) => json_string(name, &mut out),
            None => out.extend_from_slice(b"null"),
        }
        copied = at;
    }
    out.extend_from_slice(&body[copied..]);
    (Cow::Owned(out), counts)
}

/// An open object or array.
struct Frame {
    object: bool,
    /// The next string is a member's name.
    expect_key: bool,
    /// The name of the member whose value comes next (or came last).
    key: Key,
    /// `Some` once a `mac` member was seen: its value as a MAC, if it is one.
    mac: Option<Option<Mac>>,
    has_vendor: bool,
    /// Just after the last member's value: where a new member goes (before the
    /// whitespace of a pretty-printed object's closing line).
    value_end: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    Mac,
    Vendor,
}

impl Frame {
    fn open(object: bool, at: usize) -> Frame {
        Frame {
            object,
            expect_key: object,
            key: Key::Other,
            mac: None,
            has_vendor: false,
            value_end: at,
        }
    }
}

/// A value of the innermost container ended at `end`.
fn value_ended(stack: &mut [Frame], end: usize) {
    if let Some(f) = stack.last_mut() {
        if f.object {
            f.value_end = end;
            f.key = Key::Other;
        }
    }
}

/// Just after the string that opens at `start` (a `"`), escapes skipped over,
/// and whether it has any.
fn string_end(body: &[u8], start: usize) -> (usize, bool) {
    let mut i = start + 1;
    let mut escaped = false;
    loop {
        // Eight bytes at a time while none is `"` or `\`: most of an answer is
        // inside strings.
        while let Some(chunk) = body.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let x = u64::from_le_bytes(word);
            if has_byte(x, b'"') | has_byte(x, b'\\') != 0 {
                break;
            }
            i += 8;
        }
        match body.get(i) {
            None => return (body.len(), escaped),
            Some(b'"') => return (i + 1, escaped),
            Some(b'\\') => {
                escaped = true;
                i += 2;
            }
            Some(_) => i += 1,
        }
    }
}

/// Non-zero when a byte of `x` is `b` (the "has zero byte" test on `x ^ b…b`:
/// exact as to whether any is).
fn has_byte(x: u64, b: u8) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let y = x ^ (LO * u64::from(b));
    y.wrapping_sub(LO) & !y & HI
}

/// A JSON string's text (`quoted` with its quotes): as it is when it has no
/// escapes, else decoded by serde_json. `None` if it is not a whole string.
fn decoded(quoted: &[u8]) -> Option<Cow<'_, [u8]>> {
    let inner = quoted.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.contains(&b'\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_slice::<String>(quoted)
        .ok()
        .map(|s| Cow::Owned(s.into_bytes()))
}

/// `s` as a JSON string.
fn json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

// ---- CSV -----------------------------------------------------------------------

/// The longest field kept to be read (a header name, a record's MAC); a longer
/// one is no MAC, and `mac` is no longer name.
const KEPT: usize = 64;

/// The usage CSV export (RFC 4180: `,` between fields, `"` quoting with `""`
/// inside, records ending at a line break outside quotes, `\n` or `\r\n`), with a
/// `vendor` column appended to every record as it streams: `vendor` on the header,
/// the MAC's vendor (quoted when it must be, empty when there is none) on the
/// rest. The MAC column is found by its name, `mac`, in the header; without one
/// every vendor is empty. A header that already has a `vendor` column passes
/// unchanged, and so do blank lines. Chunks may end anywhere; it keeps the state
/// of one record and at most [`KEPT`] bytes of one field.
pub struct Csv {
    state: State,
    /// The header is the record being read.
    header: bool,
    /// The header named a `vendor` column: everything passes as it is.
    passthrough: bool,
    /// The index of the field being read in its record.
    field: usize,
    mac_col: Option<usize>,
    vendor_col: bool,
    /// The field being read, when it is kept.
    kept: [u8; KEPT],
    kept_len: usize,
    kept_over: bool,
    /// The record's MAC, once its field has ended.
    mac: Option<Mac>,
    /// A `\r` outside quotes, held until the next byte says whether it ends the
    /// record.
    cr: bool,
    /// The record has begun (a blank line has not).
    started: bool,
    counts: Counts,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a field's first byte.
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside quotes: a doubled one, or the end of the quotes.
    QuoteInQuoted,
}

impl Default for Csv {
    fn default() -> Self {
        Csv::new()
    }
}

impl Csv {
    pub fn new() -> Csv {
        Csv {
            state: State::FieldStart,
            header: true,
            passthrough: false,
            field: 0,
            mac_col: None,
            vendor_col: false,
            kept: [0; KEPT],
            kept_len: 0,
            kept_over: false,
            mac: None,
            cr: false,
            started: false,
            counts: Counts::default(),
        }
    }

    /// What the records so far looked up.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Transforms the next chunk of the export, appending to `out`.
    pub fn push(&mut self, chunk: &[u8], vendors: &Vendors, out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 2);
        if self.passthrough {
            out.extend_from_slice(chunk);
            return;
        }
        // `chunk[run..]` is not in `out` yet: bytes go out in runs, broken only
        // where something is added or held back.
        let mut run = 0;
        for (i, &c) in chunk.iter().enumerate() {
            if self.cr {
                self.cr = false;
                if c == b'\n' {
                    // `\r\n`: the column goes before the line break.
                    self.end_record(vendors, out);
                    out.push(b'\r');
                    run = i;
                    if self.passthrough {
                        break;
                    }
                    continue;
                }
                // A lone `\r` is data.
                out.push(b'\r');
                self.data(b'\r');
            }
            match (self.state, c) {
                (State::Quoted, b'"') => self.state = State::QuoteInQuoted,
                (State::Quoted, c) => self.keep(c),
                (_, b',') => {
                    self.started = true;
                    self.end_field();
                }
                (_, b'\n') => {
                    out.extend_from_slice(&chunk[run..i]);
                    run = i;
                    self.end_record(vendors, out);
                    if self.passthrough {
                        break;
                    }
                }
                (_, b'\r') => {
                    out.extend_from_slice(&chunk[run..i]);
                    run = i + 1;
                    self.cr = true;
                }
                (State::FieldStart, b'"') => {
                    self.started = true;
                    self.state = State::Quoted;
                }
                (State::QuoteInQuoted, b'"') => {
                    self.keep(b'"');
                    self.state = State::Quoted;
                }
                (_, c) => self.data(c),
            }
        }
        out.extend_from_slice(&chunk[run..]);
    }

    /// The end of the export: a last record without a line break gets its column.
    pub fn finish(&mut self, vendors: &Vendors, out: &mut Vec<u8>) {
        if self.passthrough {
            return;
        }
        let cr = std::mem::take(&mut self.cr);
        // An unterminated quote: anything added would land inside it.
        if self.state != State::Quoted {
            self.end_record(vendors, out);
        }
        if cr {
            out.push(b'\r');
        }
    }

    /// A byte of an unquoted field (or after a closing quote).
    fn data(&mut self, c: u8) {
        self.started = true;
        self.state = State::Unquoted;
        self.keep(c);
    }

    fn keep(&mut self, c: u8) {
        if self.header || self.mac_col == Some(self.field) {
            match self.kept.get_mut(self.kept_len) {
                Some(slot) => {
                    *slot = c;
                    self.kept_len += 1;
                }
                None => self.kept_over = true,
            }
        }
    }

    fn end_field(&mut self) {
        let text = (!self.kept_over).then(|| self.kept[..self.kept_len].trim_ascii());
        if self.header {
            match text {
                Some(b"mac") if self.mac_col.is_none() => self.mac_col = Some(self.field),
                Some(b"vendor") => self.vendor_col = true,
                _ => {}
            }
        } else if self.mac_col == Some(self.field) {
            self.mac = text.and_then(Mac::parse);
        }
        self.kept_len = 0;
        self.kept_over = false;
        self.field += 1;
        self.state = State::FieldStart;
    }

    /// The record ends here: its column goes into `out`.
    fn end_record(&mut self, vendors: &Vendors, out: &mut Vec<u8>) {
        if self.started {
            self.end_field();
            if self.header {
                self.header = false;
                if self.vendor_col {
                    self.passthrough = true;
                } else {
                    out.extend_from_slice(b",vendor");
                }
            } else {
                out.push(b',');
                if self.mac_col.is_some() {
                    let found = vendor_of(self.mac, vendors);
                    self.counts.count(found);
                    if let Some(name) = name(found) {
                        csv_field(name, out);
                    }
                }
            }
        }
        self.field = 0;
        self.mac = None;
        self.kept_len = 0;
        self.kept_over = false;
        self.started = false;
        self.state = State::FieldStart;
    }
}

/// RFC 4180: quoted (quotes doubled) when it holds a comma, a quote or a line
/// break, as the agent writes its own fields.
fn csv_field(s: &str, out: &mut Vec<u8>) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests;
