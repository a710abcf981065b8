//! Domain names as the filter stores them: one normal form ([`normalize`]) so that
//! equal names compare equal, and a guarantee that a [`Domain`] is safe to write
//! into a dnsmasq `server=/<domain>/` line (only `[a-z0-9_.-]`, no leading or
//! trailing dot). Also owns the RFC 3492 punycode encoder that IDNs need: a crate
//! for it would cost more of the router's flash than these few lines.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A normalised domain name: lower-case ASCII (IDN labels as punycode `xn--…`),
/// no trailing dot, every label 1–63 bytes of `[a-z0-9_-]` not starting or ending
/// with `-`, at most 253 bytes. Only [`normalize`] makes one.
#[derive(
    Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Domain(String);

impl Domain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name itself, then each parent up to the top-level label:
    /// `a.b.c`, `b.c`, `c`. These are the entries that would cover this name.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        ancestors(&self.0)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Domain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Domain {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        normalize(s)
    }
}

impl TryFrom<String> for Domain {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        normalize(&s)
    }
}

impl From<Domain> for String {
    fn from(d: Domain) -> String {
        d.0
    }
}

/// Why a name was refused. The message quotes the input (escaped, shortened to 80
/// characters) and says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    pub message: String,
}

pub const MAX_NAME_BYTES: usize = 253;
pub const MAX_LABEL_BYTES: usize = 63;

/// Normalises a name as a user or a list wrote it: trims spaces and tabs, drops one
/// trailing dot and a leading `*.` or `.` wildcard (a name always covers its
/// subdomains), lower-cases, converts non-ASCII labels to punycode, and refuses
/// anything that is not a plain host name (addresses, `..`, other `*`, spaces,
/// punctuation, over-long labels or names).
pub fn normalize(input: &str) -> Result<Domain, DomainError> {
    check(input).map_err(|reason| DomainError {
        message: format!("{:?}: {reason}", shorten(input, 80)),
    })
}

/// `name` is `parent` or one of its subdomains (label-wise: `xexample.com` is not
/// within `example.com`).
pub fn is_within(name: &str, parent: &str) -> bool {
    match name.strip_suffix(parent) {
        Some("") => true,
        Some(rest) => rest.ends_with('.'),
        None => false,
    }
}

/// `name`, then each suffix that starts after one of its dots.
pub fn ancestors(name: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(name);
    std::iter::from_fn(move || {
        let current = next?;
        next = current.split_once('.').map(|(_, rest)| rest);
        Some(current)
    })
}

/// At most `max` characters of `s`, with `…` as the last one when cut.
pub(crate) fn shorten(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some(_) => {
            let cut = s.char_indices().nth(max - 1).map_or(s.len(), |(i, _)| i);
            Cow::Owned(format!("{}…", &s[..cut]))
        }
    }
}

/// [`normalize`] without the input in the message: list parsing reports the input
/// in a field of its own.
pub(crate) fn check(input: &str) -> Result<Domain, String> {
    let s = input.trim_matches([' ', '\t']);
    if s.is_empty() {
        return Err("empty name".into());
    }
    // Parsing as an address is the slowest step for an ordinary name; only what
    // could be one is tried.
    let maybe_address = s.starts_with(|c: char| c.is_ascii_digit() || c == '[') || s.contains(':');
    if maybe_address && (s.parse::<IpAddr>().is_ok() || (s.starts_with('[') && s.ends_with(']'))) {
        return Err(
            "an IP address, not a domain name: a domain list blocks names, not addresses".into(),
        );
    }
    let s = s
        .strip_prefix("*.")
        .or_else(|| s.strip_prefix('.'))
        .unwrap_or(s);
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.contains('*') {
        return Err("'*' is only allowed as a leading \"*.\" (a name always covers its subdomains; other wildcards are not supported)".into());
    }
    if s.is_empty() {
        return Err("no name besides the wildcard or dots".into());
    }
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plain {
        if let Some(reason) = s.chars().find_map(refused_char) {
            return Err(reason);
        }
    }
    // UTS 46 maps the full stops of other scripts to '.'; users paste them.
    let s: Cow<str> = if !s.is_ascii() && s.contains(['\u{3002}', '\u{ff0e}', '\u{ff61}']) {
        Cow::Owned(s.replace(['\u{3002}', '\u{ff0e}', '\u{ff61}'], "."))
    } else {
        Cow::Borrowed(s)
    };
    let mut out = String::with_capacity(s.len());
    let mut last_label_digits = false;
    for label in s.split('.') {
        if label.is_empty() {
            return Err(if s.contains("..") || s.ends_with('.') {
                "two dots in a row (an empty label)".into()
            } else {
                "empty label (only one leading \"*.\" or \".\" wildcard is allowed)".into()
            });
        }
        if !out.is_empty() {
            out.push('.');
        }
        let start = out.len();
        push_label(&mut out, label)?;
        let ascii = &out[start..];
        if ascii.len() > MAX_LABEL_BYTES {
            return Err(if ascii == label {
                format!(
                    "label {:?} is {} bytes; at most {MAX_LABEL_BYTES}",
                    shorten(ascii, 80),
                    ascii.len()
                )
            } else {
                format!(
                    "label {:?} is {} bytes as punycode; at most {MAX_LABEL_BYTES}",
                    shorten(label, 80),
                    ascii.len()
                )
            });
        }
        if ascii.starts_with('-') || ascii.ends_with('-') {
            let end = if ascii.starts_with('-') {
                "starts"
            } else {
                "ends"
            };
            return Err(format!("label {label:?} {end} with '-'"));
        }
        last_label_digits = ascii.bytes().all(|b| b.is_ascii_digit());
    }
    if out.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the name is {} bytes; at most {MAX_NAME_BYTES}",
            out.len()
        ));
    }
    if last_label_digits {
        return Err("the last label is all digits: that is an address, not a domain name".into());
    }
    Ok(Domain(out))
}

/// Why `c` can never be part of a name, if it cannot. ASCII is limited to the
/// host-name characters (plus `_`, seen in real names such as `_dmarc`), which is
/// what keeps a dnsmasq line unbreakable; other characters become punycode, except
/// those no one can see or type on purpose.
fn refused_char(c: char) -> Option<String> {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => None,
            ' ' | '\t' => Some("contains a space (one name per entry)".into()),
            c if c.is_ascii_control() => Some(format!("contains the control character {c:?}")),
            c => Some(format!(
                "the character {c:?} is not allowed in a domain name"
            )),
        };
    }
    let invisible = c.is_whitespace()
        || c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffd}' | '\u{e000}'..='\u{f8ff}' | '\u{f0000}'..);
    invisible.then(|| {
        format!(
            "contains U+{:04X}, a space, control or invisible character",
            c as u32
        )
    })
}

/// Appends one label, lower-cased, as ASCII (punycode when it is not ASCII).
fn push_label(out: &mut String, label: &str) -> Result<(), String> {
    if label.is_ascii() {
        let start = out.len();
        out.push_str(label);
        out[start..].make_ascii_lowercase();
        return Ok(());
    }
    let chars: Vec<char> = label.chars().flat_map(char::to_lowercase).collect();
    if chars.iter().all(char::is_ascii) {
        // Lower-casing can make a label ASCII (KELVIN SIGN is 'k'); it is then an
        // ordinary label, not an IDN.
        out.extend(chars);
        return Ok(());
    }
    // Punycode is never shorter than its input: refuse a longer label without
    // encoding it.
    if chars.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "label {:?} has {} characters; at most {MAX_LABEL_BYTES} bytes as punycode",
            shorten(label, 80),
            chars.len()
        ));
    }
    out.push_str("xn--");
    punycode_into(&chars, out).ok_or_else(|| format!("label {label:?} cannot be encoded"))
}

// RFC 3492 §5 parameters for IDNA.
const BASE: u32 = 36;
const TMIN: u32 = 1;
const TMAX: u32 = 26;
const SKEW: u32 = 38;
const DAMP: u32 = 700;
const INITIAL_BIAS: u32 = 72;
const INITIAL_N: u32 = 0x80;

/// RFC 3492 §6.3 encoding of `input`, appended to `out` (without the `xn--`
/// prefix). `None` on arithmetic overflow, which labels of DNS length never reach.
pub fn punycode_into(input: &[char], out: &mut String) -> Option<()> {
    let basic = input.iter().filter(|c| c.is_ascii()).count() as u32;
    out.extend(input.iter().filter(|c| c.is_ascii()));
    if basic > 0 {
        out.push('-');
    }
    let (mut n, mut delta, mut bias, mut handled) = (INITIAL_N, 0u32, INITIAL_BIAS, basic);
    while (handled as usize) < input.len() {
        let m = input.iter().map(|&c| c as u32).filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
        n = m;
        for &c in input {
            let c = c as u32;
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = if k <= bias {
                        TMIN
                    } else if k >= bias + TMAX {
                        TMAX
                    } else {
                        k - bias
                    };
                    if q < t {
                        break;
                    }
                    out.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                out.push(digit(q));
                bias = adapt(delta, handled + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n = n.checked_add(1)?;
    }
    Some(())
}

/// RFC 3492 §6.1 bias adaptation.
fn adapt(delta: u32, points: u32, first: bool) -> u32 {
    let mut delta = if first { delta / DAMP } else { delta / 2 };
    delta += delta / points;
    let mut k = 0;
    while delta > ((BASE - TMIN) * TMAX) / 2 {
        delta /= BASE - TMIN;
        k += BASE;
    }
    k + (BASE - TMIN + 1) * delta / (delta + SKEW)
}

fn digit(d: u32) -> char {
    // Lower-case digits: the output is a normalised name.
    match d {
        0..=25 => (b'a' + d as u8) as char,
        _ => (b'0' + (d - 26) as u8) as char,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> String {
        match normalize(input) {
            Ok(d) => d.to_string(),
            Err(e) => panic!("{input:?} refused: {e}"),
        }
    }

    fn err(input: &str) -> String {
        match normalize(input) {
            Ok(d) => panic!("{input:?} accepted as {d}"),
            Err(e) => e.message,
        }
    }

    fn puny(s: &str) -> String {
        let chars: Vec<char> = s.chars().collect();
        let mut out = String::new();
        punycode_into(&chars, &mut out).unwrap();
        out
    }

    #[test]
    fn rfc3492_section_7_1_vectors() {
        // The encoder keeps basic code points as given, so the RFC's mixed case
        // comes back; normalize lower-cases before encoding.
        let cases = [
            ("ليهمابتكلموشعربي؟", "egbpdaj6bu4bxfgehfvwxn"),
            ("他们为什么不说中文", "ihqwcrb4cv8a8dqg056pqjye"),
            ("他們爲什麽不說中文", "ihqwctvzc91f659drss3x8bo0yb"),
            ("Pročprostěnemluvíčesky", "Proprostnemluvesky-uyb24dma41a"),
            ("למההםפשוטלאמדבריםעברית", "4dbcagdahymbxekheh6e0a7fei0b"),
            (
                "यहलोगहिन्दीक्योंनहींबोलसकतेहैं",
                "i1baa7eci9glrd9b2ae1bj0hfcgg6iyaf8o0a1dig0cd",
            ),
            (
                "なぜみんな日本語を話してくれないのか",
                "n8jok5ay5dzabd5bym9f0cm5685rrjetr6pdxa",
            ),
            (
                "세계의모든사람들이한국어를이해한다면얼마나좋을까",
                "989aomsvi5e83db1d2a355cv1e0vak1dwrv93d5xbh15a0dt30a5jpsd879ccm6fea98c",
            ),
            (
                "почемужеонинеговорятпорусски",
                "b1abfaaepdrnnbgefbadotcwatmq2g4l",
            ),
            (
                "PorquénopuedensimplementehablarenEspañol",
                "PorqunopuedensimplementehablarenEspaol-fmd56a",
            ),
            (
                "TạisaohọkhôngthểchỉnóitiếngViệt",
                "TisaohkhngthchnitingVit-kjcr8268qyxafd2f1b9g",
            ),
            ("3年B組金八先生", "3B-ww4c5e180e575a65lsy2b"),
            (
                "安室奈美恵-with-SUPER-MONKEYS",
                "-with-SUPER-MONKEYS-pc58ag80a8qai00g7n9n",
            ),
            (
                "Hello-Another-Way-それぞれの場所",
                "Hello-Another-Way--fc4qua05auwb3674vfr0b",
            ),
            ("ひとつ屋根の下2", "2-u9tlzr9756bt3uc0v"),
            ("MajiでKoiする5秒前", "MajiKoi5-783gue6qz075azm5e"),
            ("パフィーdeルンバ", "de-jg4avhby1noc0d"),
            ("そのスピードで", "d9juau41awczczp"),
            ("-> $1.00 <-", "-> $1.00 <--"),
        ];
        for (input, want) in cases {
            assert_eq!(puny(input), want, "{input}");
        }
    }

    #[test]
    fn idn_names_become_punycode() {
        assert_eq!(ok("bücher.de"), "xn--bcher-kva.de");
        assert_eq!(ok("münchen.de"), "xn--mnchen-3ya.de");
        assert_eq!(ok("例え.jp"), "xn--r8jz45g.jp");
        // Lower-cased with Unicode rules before encoding.
        assert_eq!(ok("BÜCHER.DE"), "xn--bcher-kva.de");
        // Already punycode: kept as written (lower-cased).
        assert_eq!(ok("XN--BCHER-KVA.de"), "xn--bcher-kva.de");
        // Ideographic full stop separates labels, as in IDNA.
        assert_eq!(ok("例え。jp"), "xn--r8jz45g.jp");
        // KELVIN SIGN lower-cases to ASCII 'k': an ordinary label.
        assert_eq!(ok("\u{212a}ids.com"), "kids.com");
    }

    #[test]
    fn plain_names_are_normalised() {
        assert_eq!(ok("Example.COM"), "example.com");
        assert_eq!(ok("  example.com.\t"), "example.com");
        assert_eq!(ok("*.example.com"), "example.com");
        assert_eq!(ok(".example.com"), "example.com");
        assert_eq!(ok("_dmarc.example.com"), "_dmarc.example.com");
        assert_eq!(ok("a-b.c0m"), "a-b.c0m");
        assert_eq!(ok("xxx"), "xxx");
        assert_eq!(ok("123.example.com"), "123.example.com");
        let longest_label = "a".repeat(63);
        assert_eq!(
            ok(&format!("{longest_label}.com")),
            format!("{longest_label}.com")
        );
        let name253 = [
            &"a".repeat(63)[..],
            &"b".repeat(63),
            &"c".repeat(63),
            &"d".repeat(61),
        ]
        .join(".");
        assert_eq!(name253.len(), 253);
        assert_eq!(ok(&name253), name253);
    }

    #[test]
    fn refusals_name_the_input_and_the_reason() {
        assert_eq!(err(""), r#""": empty name"#);
        assert_eq!(err("  "), r#""  ": empty name"#);
        assert_eq!(err("a..b"), r#""a..b": two dots in a row (an empty label)"#);
        assert_eq!(
            err("a.b.."),
            r#""a.b..": two dots in a row (an empty label)"#
        );
        assert_eq!(
            err("..a"),
            r#""..a": empty label (only one leading "*." or "." wildcard is allowed)"#
        );
        assert!(err("*.").ends_with("no name besides the wildcard or dots"));
        assert!(err(".").ends_with("no name besides the wildcard or dots"));
        assert!(err("ads*.example.com").contains("'*' is only allowed as a leading"));
        assert!(err("*.*.example.com").contains("'*' is only allowed"));
        assert!(err("1.2.3.4").contains("an IP address, not a domain name"));
        assert!(err("::1").contains("an IP address"));
        assert!(err("[2001:db8::1]").contains("an IP address"));
        assert!(err("10.0.0.1.").contains("all digits"));
        assert!(err("example.123").contains("all digits"));
        assert_eq!(
            err("a b.com"),
            r#""a b.com": contains a space (one name per entry)"#
        );
        assert_eq!(
            err("a/b"),
            r#""a/b": the character '/' is not allowed in a domain name"#
        );
        assert_eq!(
            err("a\nb"),
            r#""a\nb": contains the control character '\n'"#
        );
        // Debug escaping shows the invisible character.
        assert_eq!(
            err("a\u{200b}b.com"),
            "\"a\\u{200b}b.com\": contains U+200B, a space, control or invisible character"
        );
        assert_eq!(
            err("-ads.com"),
            r#""-ads.com": label "-ads" starts with '-'"#
        );
        assert_eq!(err("ads-.com"), r#""ads-.com": label "ads-" ends with '-'"#);
        let long = "a".repeat(64);
        assert_eq!(
            err(&format!("{long}.com")),
            format!(
                "{:?}: label \"{long}\" is 64 bytes; at most 63",
                format!("{long}.com")
            )
        );
        assert!(err(&format!("{}.com", "ü".repeat(70)))
            .contains("has 70 characters; at most 63 bytes as punycode"));
        let m = err("세계의모든사람들이한국어를이해한다면얼마나좋을까.kr");
        assert!(m.ends_with("is 73 bytes as punycode; at most 63"), "{m}");
        let name254 = [
            &"a".repeat(63)[..],
            &"b".repeat(63),
            &"c".repeat(63),
            &"d".repeat(62),
        ]
        .join(".");
        assert!(err(&name254).ends_with("the name is 254 bytes; at most 253"));
        // A long input is quoted shortened, never whole.
        let message = err(&format!("{}/", "a".repeat(500)));
        assert!(message.len() < 200, "{message}");
        assert!(message.contains('…'));
    }

    #[test]
    fn every_accepted_name_is_safe_in_a_dnsmasq_line() {
        let safe = |d: &Domain| {
            let s = d.as_str();
            !s.is_empty()
                && !s.starts_with('.')
                && !s.ends_with('.')
                && s.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
        };
        let mut accepted = 0;
        let mut refused = 0;
        let unicode = [
            "ü",
            "例",
            "\u{3002}",
            "\u{ff0f}",
            "\u{2215}",
            "\u{ff03}",
            "\u{0130}",
            "\u{212a}",
            "ß",
            "\u{1f600}",
            "\u{0301}",
            "\u{00a0}",
            "\u{2028}",
            "\u{ffff}",
        ];
        let mut probes: Vec<String> = Vec::new();
        for b in 0u8..=127 {
            let c = b as char;
            for shape in [
                "{}", "a{}", "{}a", "a{}b.com", "a.{}.com", "x{}.y", "*.{}.com", "{}.{}",
            ] {
                probes.push(shape.replace("{}", &c.to_string()));
            }
        }
        for u in unicode {
            for shape in ["{}", "a{}b.com", "{}.com", "x.{}", "{}{}.de"] {
                probes.push(shape.replace("{}", u));
            }
        }
        for p in &probes {
            match normalize(p) {
                Ok(d) => {
                    accepted += 1;
                    assert!(safe(&d), "{p:?} gave {d:?}");
                    // Normal form is a fixed point.
                    assert_eq!(normalize(d.as_str()).as_ref(), Ok(&d), "{p:?}");
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.message.is_empty());
                }
            }
        }
        // Both paths were exercised, so the assertion above was not vacuous.
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn within_is_label_wise() {
        assert!(is_within("example.com", "example.com"));
        assert!(is_within("ads.example.com", "example.com"));
        assert!(!is_within("badexample.com", "example.com"));
        assert!(!is_within("example.com", "ads.example.com"));
        assert!(!is_within("com", "example.com"));
        let d = normalize("a.b.c").unwrap();
        assert_eq!(d.ancestors().collect::<Vec<_>>(), ["a.b.c", "b.c", "c"]);
    }

    #[test]
    fn serde_goes_through_normalize() {
        let d: Domain = serde_json::from_str("\"Ads.Example.com.\"").unwrap();
        assert_eq!(d.as_str(), "ads.example.com");
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"ads.example.com\"");
        assert!(serde_json::from_str::<Domain>("\"a/b\"").is_err());
    }
}
