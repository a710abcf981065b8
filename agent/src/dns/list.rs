//! Block and allow lists as users upload them and as the agent ships them: one
//! entry per line (plain names, hosts-file lines, adblock `||name^` rules) or a JSON
//! array of names. Parsing never stops at the first bad entry: callers refuse an
//! upload with any error, so every error names its line, the input and the reason,
//! and the first [`MAX_REPORTED_ERRORS`] are kept for the answer.

use std::net::IpAddr;

use super::domain::{self, Domain};

/// Larger bodies are refused before parsing.
pub const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;
/// Entries (before de-duplication) one list may hold.
pub const MAX_LIST_DOMAINS: usize = 200_000;
/// Errors kept in [`ParsedList::errors`]; [`ParsedList::error_count`] counts all.
pub const MAX_REPORTED_ERRORS: usize = 20;
/// Characters of the offending input kept in a [`LineError`].
pub const MAX_ERROR_INPUT_CHARS: usize = 80;

/// One refused entry. `line` is 1-based; 0 means the list as a whole (too large).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineError {
    pub line: usize,
    /// The line as written (trimmed), at most 80 characters, `…` when cut.
    pub input: String,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {:?}: {}", self.line, self.input, self.reason)
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ParsedList {
    /// Sorted, deduplicated.
    pub domains: Vec<Domain>,
    /// The first [`MAX_REPORTED_ERRORS`] errors, in line order.
    pub errors: Vec<LineError>,
    /// All errors, reported or not.
    pub error_count: usize,
    /// Entries that normalised to a name seen before.
    pub duplicates: usize,
    /// Refused as a whole for its size (bytes or names), not for an entry.
    pub over_limit: bool,
}

impl ParsedList {
    pub fn is_ok(&self) -> bool {
        self.error_count == 0
    }
}

/// Parses a text list, one entry per line:
///
/// - blank lines, `#` comments (whole-line or after a space: `name # why`) and
///   adblock `!` comment lines are ignored, as is an adblock `[Adblock …]` header;
/// - `name`, `*.name` or `.name` (all mean the name and its subdomains);
/// - hosts-file lines `0.0.0.0 name [name…]` with a sink address (`0.0.0.0`,
///   `127.0.0.1`, `::`, `::1`); the usual preamble (`127.0.0.1 localhost`,
///   `::1 ip6-localhost`, `255.255.255.255 broadcasthost`, …) is skipped;
/// - adblock rules `||name^`; options (`$…`) and exceptions (`@@`) are refused,
///   since they mean something this list cannot express.
pub fn parse_text(body: &str) -> ParsedList {
    let mut parser = Parser::default();
    if body.len() > MAX_LIST_BYTES {
        parser.whole_list(format!(
            "the list is {} bytes; at most {MAX_LIST_BYTES}",
            body.len()
        ));
        return parser.finish();
    }
    for (index, raw) in body.lines().enumerate() {
        if !parser.text_line(index + 1, raw) {
            break;
        }
    }
    parser.finish()
}

/// Parses the JSON-array form: each item is one name (no comments or hosts
/// lines); an error's `line` is the item's index + 1.
pub fn parse_items(items: &[String]) -> ParsedList {
    let mut parser = Parser::default();
    let bytes: usize = items.iter().map(|s| s.len() + 1).sum();
    if bytes > MAX_LIST_BYTES {
        parser.whole_list(format!(
            "the list is {bytes} bytes; at most {MAX_LIST_BYTES}"
        ));
        return parser.finish();
    }
    for (index, item) in items.iter().enumerate() {
        if !parser.entry(index + 1, item, item) {
            break;
        }
    }
    parser.finish()
}

/// Names in a hosts file's usual preamble, which maps them to real addresses; they
/// are not what a block list means to block.
const HOSTS_PREAMBLE: &[&str] = &[
    "localhost",
    "localhost.localdomain",
    "local",
    "broadcasthost",
    "ip6-localhost",
    "ip6-loopback",
    "ip6-localnet",
    "ip6-mcastprefix",
    "ip6-allnodes",
    "ip6-allrouters",
    "ip6-allhosts",
    "0.0.0.0",
];

#[derive(Default)]
struct Parser {
    domains: Vec<Domain>,
    errors: Vec<LineError>,
    error_count: usize,
    over_limit: bool,
}

impl Parser {
    /// One line of a text list; `false` once no more lines should be read.
    fn text_line(&mut self, line: usize, raw: &str) -> bool {
        let entry = strip_comment(raw).trim_matches([' ', '\t', '\r']);
        if entry.is_empty() || entry.starts_with('!') || is_adblock_header(line, entry) {
            return true;
        }
        let input = raw.trim_matches([' ', '\t', '\r']);
        if let Some(rule) = entry.strip_prefix("||") {
            return self.adblock(line, input, rule);
        }
        if entry.starts_with("@@") {
            self.error(
                line,
                input,
                "adblock exception rules (@@) are not supported; put the name in the allow list"
                    .into(),
            );
            return true;
        }
        let mut tokens = entry.split([' ', '\t']).filter(|t| !t.is_empty());
        let first = tokens.next().unwrap_or_default();
        let names: Vec<&str> = tokens.collect();
        if names.is_empty() {
            return self.entry(line, input, first);
        }
        self.hosts_line(line, input, first, &names)
    }

    /// `address name [name…]`.
    fn hosts_line(&mut self, line: usize, input: &str, address: &str, names: &[&str]) -> bool {
        if names.iter().all(|n| HOSTS_PREAMBLE.contains(n)) {
            return true;
        }
        let sink = match address.parse::<IpAddr>() {
            Ok(ip) => ip.is_unspecified() || ip.is_loopback(),
            Err(_) => {
                self.error(
                    line,
                    input,
                    format!(
                        "more than one name on a line ({address:?} is not an address, so this is not a hosts-file line); one name per line"
                    ),
                );
                return true;
            }
        };
        if !sink {
            self.error(
                line,
                input,
                format!("a hosts-file line blocks only with 0.0.0.0, 127.0.0.1, :: or ::1, not {address}"),
            );
            return true;
        }
        for name in names {
            if HOSTS_PREAMBLE.contains(name) {
                continue;
            }
            // Several names: say which one failed.
            let prefix = if names.len() > 1 { Some(*name) } else { None };
            if !self.entry_named(line, input, name, prefix) {
                return false;
            }
        }
        true
    }

    /// `||name^` (after the `||`).
    fn adblock(&mut self, line: usize, input: &str, rule: &str) -> bool {
        if let Some((_, options)) = rule.split_once('$') {
            self.error(
                line,
                input,
                format!("adblock options (${options}) are not supported; only \"||name^\""),
            );
            return true;
        }
        match rule.strip_suffix('^') {
            Some(name) => self.entry(line, input, name),
            None => {
                self.error(
                    line,
                    input,
                    "an adblock rule must be \"||name^\" (it ends with '^')".into(),
                );
                true
            }
        }
    }

    fn entry(&mut self, line: usize, input: &str, name: &str) -> bool {
        self.entry_named(line, input, name, None)
    }

    /// Adds one name; `false` once the list is full.
    fn entry_named(&mut self, line: usize, input: &str, name: &str, which: Option<&str>) -> bool {
        if self.domains.len() == MAX_LIST_DOMAINS {
            let reason = format!("more than {MAX_LIST_DOMAINS} names; at most {MAX_LIST_DOMAINS}");
            // The reason the upload is refused must be among those reported.
            if self.errors.len() == MAX_REPORTED_ERRORS {
                self.errors.pop();
            }
            self.over_limit = true;
            self.error(line, input, reason);
            return false;
        }
        match domain::check(name) {
            Ok(d) => self.domains.push(d),
            Err(reason) => {
                let reason = match which {
                    Some(n) => format!("{:?}: {reason}", domain::shorten(n, MAX_ERROR_INPUT_CHARS)),
                    None => reason,
                };
                self.error(line, input, reason);
            }
        }
        true
    }

    fn whole_list(&mut self, reason: String) {
        self.over_limit = true;
        self.error(0, "", reason);
    }

    fn error(&mut self, line: usize, input: &str, reason: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(LineError {
                line,
                input: domain::shorten(input, MAX_ERROR_INPUT_CHARS).into_owned(),
                reason,
            });
        }
    }

    fn finish(self) -> ParsedList {
        let Parser {
            mut domains,
            errors,
            error_count,
            over_limit,
        } = self;
        let entries = domains.len();
        // Unstable sort: equal names are identical, so order among them is moot.
        domains.sort_unstable();
        domains.dedup();
        ParsedList {
            duplicates: entries - domains.len(),
            domains,
            errors,
            error_count,
            over_limit,
        }
    }
}

/// The line without a `#` comment: one at the start, or after a space or tab. A `#`
/// inside a token is left for the name check to refuse.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || matches!(bytes[i - 1], b' ' | b'\t')) {
            return &line[..i];
        }
    }
    line
}

fn is_adblock_header(line: usize, entry: &str) -> bool {
    line == 1 && entry.starts_with("[Adblock") && entry.ends_with(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &ParsedList) -> Vec<&str> {
        list.domains.iter().map(Domain::as_str).collect()
    }

    #[test]
    fn text_forms_comments_and_duplicates() {
        let body = "\
[Adblock Plus 2.0]
! Title: mine
# a comment

Ads.Example.com
tracker.example.net.  # trailing comment
*.wild.example.org
\t.dot.example.org\r
0.0.0.0 hosts1.example.com hosts2.example.com
127.0.0.1\thosts3.example.com # why
:: hosts4.example.com
||adblock.example.com^
ads.example.com
# 0.0.0.0 commented.example.com
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
255.255.255.255 broadcasthost
0.0.0.0 0.0.0.0
";
        let list = parse_text(body);
        assert_eq!(list.errors, []);
        assert_eq!(list.error_count, 0);
        assert!(list.is_ok());
        assert_eq!(
            names(&list),
            [
                "adblock.example.com",
                "ads.example.com",
                "dot.example.org",
                "hosts1.example.com",
                "hosts2.example.com",
                "hosts3.example.com",
                "hosts4.example.com",
                "tracker.example.net",
                "wild.example.org",
            ]
        );
        assert_eq!(list.duplicates, 1);
    }

    #[test]
    fn errors_are_precise() {
        let body = "\
good.example.com
bad name.example.com
a/b.example.com
1.2.3.4
192.168.1.1 router.example.com
0.0.0.0 ok.example.com b@d.example.com
||ads.example.com^$third-party
@@||ok.example.com^
||noend.example.com
";
        let list = parse_text(body);
        assert_eq!(names(&list), ["good.example.com", "ok.example.com"]);
        assert_eq!(list.error_count, 8);
        let got: Vec<String> = list.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                r#"line 2: "bad name.example.com": more than one name on a line ("bad" is not an address, so this is not a hosts-file line); one name per line"#,
                r#"line 3: "a/b.example.com": the character '/' is not allowed in a domain name"#,
                r#"line 4: "1.2.3.4": an IP address, not a domain name: a domain list blocks names, not addresses"#,
                r#"line 5: "192.168.1.1 router.example.com": a hosts-file line blocks only with 0.0.0.0, 127.0.0.1, :: or ::1, not 192.168.1.1"#,
                r#"line 6: "0.0.0.0 ok.example.com b@d.example.com": "b@d.example.com": the character '@' is not allowed in a domain name"#,
                r#"line 7: "||ads.example.com^$third-party": adblock options ($third-party) are not supported; only "||name^""#,
                r#"line 8: "@@||ok.example.com^": adblock exception rules (@@) are not supported; put the name in the allow list"#,
                r#"line 9: "||noend.example.com": an adblock rule must be "||name^" (it ends with '^')"#,
            ]
        );
        // A '#' glued to a name is not a comment: it is refused, not silently cut.
        let list = parse_text("ads.example.com#x\n");
        assert_eq!(list.error_count, 1);
        assert_eq!(list.errors[0].line, 1);
    }

    #[test]
    fn error_input_is_truncated_and_errors_are_capped() {
        let long = format!("{}/x", "a".repeat(200));
        let list = parse_text(&long);
        let input = &list.errors[0].input;
        assert_eq!(input.chars().count(), MAX_ERROR_INPUT_CHARS);
        assert!(input.ends_with('…'));

        let body: String = (0..50).map(|i| format!("bad{i}/\n")).collect();
        let list = parse_text(&body);
        assert_eq!(list.error_count, 50);
        assert_eq!(list.errors.len(), MAX_REPORTED_ERRORS);
        assert_eq!(list.errors.last().unwrap().line, MAX_REPORTED_ERRORS);
    }

    #[test]
    fn limits_refuse_with_one_reported_error() {
        let body = "a".repeat(MAX_LIST_BYTES + 1);
        let list = parse_text(&body);
        assert_eq!(list.error_count, 1);
        assert_eq!(list.errors[0].line, 0);
        assert_eq!(
            list.errors[0].reason,
            format!(
                "the list is {} bytes; at most {MAX_LIST_BYTES}",
                MAX_LIST_BYTES + 1
            )
        );
        assert!(list.domains.is_empty());
        assert!(list.over_limit);

        let body: String = (0..=MAX_LIST_DOMAINS)
            .map(|i| format!("d{i}.example\n"))
            .collect();
        let list = parse_text(&body);
        assert_eq!(list.error_count, 1);
        assert_eq!(list.errors[0].line, MAX_LIST_DOMAINS + 1);
        assert!(list.errors[0].reason.starts_with("more than 200000 names"));
        assert_eq!(list.domains.len(), MAX_LIST_DOMAINS);
        assert!(list.over_limit);
        assert!(
            !parse_text("bad/\n").over_limit,
            "a bad entry is not a limit"
        );

        // Even behind a full page of other errors, the limit is what gets reported last.
        let mut body: String = (0..30).map(|i| format!("bad{i}/\n")).collect();
        body.extend((0..=MAX_LIST_DOMAINS).map(|i| format!("d{i}.example\n")));
        let list = parse_text(&body);
        assert_eq!(list.error_count, 31);
        assert_eq!(list.errors.len(), MAX_REPORTED_ERRORS);
        assert!(list.errors.last().unwrap().reason.starts_with("more than"));
    }

    #[test]
    fn items_are_names_numbered_from_one() {
        let items: Vec<String> = [
            "B.example.com",
            "a.example.com",
            "# not a comment",
            "b.example.com.",
        ]
        .map(String::from)
        .into();
        let list = parse_items(&items);
        assert_eq!(names(&list), ["a.example.com", "b.example.com"]);
        assert_eq!(list.duplicates, 1);
        assert_eq!(list.error_count, 1);
        assert_eq!(list.errors[0].line, 3);
        assert_eq!(list.errors[0].input, "# not a comment");
        let reason = "the character '#' is not allowed in a domain name";
        assert_eq!(list.errors[0].reason, reason);
        assert_eq!(
            serde_json::to_value(&list.errors[0]).unwrap(),
            serde_json::json!({"line": 3, "input": "# not a comment", "reason": reason})
        );
    }
}
