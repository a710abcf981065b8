//! A reader and writer for UCI configuration text (`/etc/config/*`, `uci export`):
//! sections, options and lists with OpenWrt's quoting. Pure: the agent reads
//! `/etc/config/netpilot` with it instead of starting `uci` for every value, and the
//! in-memory UCI (`system::uci::FakeUci`) keeps its packages in this form. Only the
//! text format: `system::uci` is the seam that drives the `uci` program.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub kind: String,
    pub name: Option<String>,
    /// Options and list entries in file order; a list repeats its key.
    pub values: Vec<(String, String)>,
    /// Keys given as `list` rather than `option`.
    pub lists: Vec<String>,
}

impl Section {
    /// The last value of an option (UCI semantics: a later option overrides).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a list (or the one value of an option), in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn is_list(&self, key: &str) -> bool {
        self.lists.iter().any(|k| k == key)
    }
}

/// A value in UCI's single quotes: `'` becomes `'\''`, the form `uci export` writes
/// and `uci batch` reads.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// `uci export <package>` text: a `package` line, then each section with its
/// options and lists, a blank line after each, exactly as uci prints it.
pub fn export(package: &str, sections: &[Section]) -> String {
    let mut out = format!("package {package}\n\n");
    for s in sections {
        out.push_str("config ");
        out.push_str(&s.kind);
        if let Some(name) = &s.name {
            out.push(' ');
            out.push_str(&quote(name));
        }
        out.push('\n');
        for (k, v) in &s.values {
            let keyword = if s.is_list(k) { "list" } else { "option" };
            out.push_str(&format!("\t{keyword} {k} {}\n", quote(v)));
        }
        out.push('\n');
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Vec<Section>, ParseError> {
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| ParseError { line, message };
        let words = split_words(raw).map_err(err)?;
        let Some((keyword, args)) = words.split_first() else {
            continue;
        };
        match (keyword.as_str(), args) {
            ("config", [kind]) => sections.push(Section {
                kind: kind.clone(),
                name: None,
                values: Vec::new(),
                lists: Vec::new(),
            }),
            ("config", [kind, name]) => sections.push(Section {
                kind: kind.clone(),
                name: Some(name.clone()),
                values: Vec::new(),
                lists: Vec::new(),
            }),
            ("option" | "list", [key, value]) => {
                let section = sections
                    .last_mut()
                    .ok_or_else(|| err(format!("{keyword} before any config section")))?;
                if !valid_name(key) {
                    return Err(err(format!("invalid option name {key:?}")));
                }
                if *keyword == "list" && !section.is_list(key) {
                    section.lists.push(key.clone());
                }
                section.values.push((key.clone(), value.clone()));
            }
            ("package", [_]) => {}
            _ => return Err(err(format!("cannot parse {:?}", raw.trim()))),
        }
    }
    Ok(sections)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits a line into words: 'single' and "double" quotes, backslash escapes outside
/// single quotes, `#` starts a comment outside quotes.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' => break,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => cur.push(chars.next().ok_or("dangling backslash")?),
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next().ok_or("dangling backslash")?);
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_real_wireless_fixture() {
        let text = include_str!("../fixtures/uci/etc-config-wireless");
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].kind, "wifi-device");
        assert_eq!(s[0].name.as_deref(), Some("radio0"));
        assert_eq!(s[0].get("band"), Some("2g"));
        assert_eq!(s[2].get("key"), Some("changeme123"));
        let guest = &s[4];
        assert_eq!(guest.get("maclist"), Some("02:00:00:00:01:01"));
    }

    #[test]
    fn export_writes_what_uci_export_prints() {
        let fixture = include_str!("../fixtures/uci/uci-export-wireless.txt");
        let sections = parse(fixture).unwrap();
        assert!(sections[4].is_list("maclist") && !sections[4].is_list("ssid"));
        assert_eq!(export("wireless", &sections), fixture);
        let odd = parse("config x 'y'\n\toption v 'it'\\''s \"q\"'\n").unwrap();
        let text = export("p", &odd);
        assert!(text.contains("option v 'it'\\''s \"q\"'"), "{text}");
        assert_eq!(parse(&text).unwrap(), odd);
    }

    #[test]
    fn quoting_escapes_comments_and_lists() {
        let text = "# top\nconfig agent 'main' # trailing\n\toption relay_url \"https://r.example\"\n\toption name 'it'\\''s'\n\toption bare value\n\tlist tag 'a'\n\tlist tag 'b c'\n";
        let s = parse(text).unwrap();
        assert_eq!(s[0].get("relay_url"), Some("https://r.example"));
        assert_eq!(s[0].get("name"), Some("it's"));
        assert_eq!(s[0].get("bare"), Some("value"));
        let tags: Vec<&str> = s[0]
            .values
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(tags, ["a", "b c"]);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("option x 'y'\n").unwrap_err().line, 1);
        assert_eq!(parse("config a\n\toption x 'y\n").unwrap_err().line, 2);
        assert!(parse("config a\n\toption bad-name 'y'\n")
            .unwrap_err()
            .message
            .contains("bad-name"));
        assert!(parse("config a\n\tfrobnicate x\n").is_err());
    }
}
