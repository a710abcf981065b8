//! A reader for UCI configuration files (`/etc/config/*`): sections, options and
//! lists with OpenWrt's quoting. Pure: the agent reads `/etc/config/netpilot` with it
//! instead of starting `uci` for every value.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub kind: String,
    pub name: Option<String>,
    /// Options and list entries in file order; a list repeats its key.
    pub values: Vec<(String, String)>,
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
            }),
            ("config", [kind, name]) => sections.push(Section {
                kind: kind.clone(),
                name: Some(name.clone()),
                values: Vec::new(),
            }),
            ("option" | "list", [key, value]) => {
                let section = sections
                    .last_mut()
                    .ok_or_else(|| err(format!("{keyword} before any config section")))?;
                if !valid_name(key) {
                    return Err(err(format!("invalid option name {key:?}")));
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
        let text = include_str!("../../../shared/fixtures/uci/etc-config-wireless");
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
