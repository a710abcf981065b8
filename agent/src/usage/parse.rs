//! Pure parsers for `nlbw`'s outputs (`-c json` in any grouping, `-c csv`, `-c list`)
//! and the per-device aggregation of their rows. The header (`columns` / the CSV's
//! first line) decides which field is which, so any `-g` grouping parses and unknown
//! extra columns are ignored. Output that cannot be nlbw's is an error, never an
//! empty list: "no rows" must mean "no traffic".

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::policy::model::Mac;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("nlbw output is not valid JSON: {0}")]
    Json(String),
    #[error("nlbw output is not in the expected form: {0}")]
    Shape(String),
}

/// One row of nlbw's database in whatever grouping was asked for; columns the
/// grouping left out are `None` / 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub family: Option<u8>,
    pub proto: Option<String>,
    pub port: Option<u16>,
    /// `None` when absent or not a device address (nlbwmon writes all-zero for
    /// hosts it found no neighbour entry for).
    pub mac: Option<Mac>,
    pub ip: Option<IpAddr>,
    pub conns: u64,
    /// What the LAN host downloaded.
    pub rx_bytes: u64,
    pub rx_pkts: u64,
    /// What the LAN host uploaded.
    pub tx_bytes: u64,
    pub tx_pkts: u64,
    pub layer7: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Family,
    Proto,
    Port,
    Mac,
    Ip,
    Conns,
    RxBytes,
    RxPkts,
    TxBytes,
    TxPkts,
    Layer7,
    Other,
}

fn col(name: &str) -> Col {
    match name {
        "family" => Col::Family,
        "proto" => Col::Proto,
        "port" => Col::Port,
        "mac" => Col::Mac,
        "ip" => Col::Ip,
        "conns" => Col::Conns,
        "rx_bytes" => Col::RxBytes,
        "rx_pkts" => Col::RxPkts,
        "tx_bytes" => Col::TxBytes,
        "tx_pkts" => Col::TxPkts,
        "layer7" => Col::Layer7,
        _ => Col::Other,
    }
}

/// A cell as either output format gives it.
enum Cell<'a> {
    Null,
    Num(u64),
    Str(&'a str),
}

fn set(row: &mut Row, c: Col, cell: Cell<'_>) -> Result<(), ParseError> {
    let num = |what: &str| match cell {
        Cell::Num(n) => Ok(n),
        _ => Err(ParseError::Shape(format!("{what} is not a counter"))),
    };
    let text = |cell: &Cell<'_>| match *cell {
        Cell::Str(s) if !s.is_empty() => Some(s.to_owned()),
        _ => None,
    };
    match c {
        Col::Family => {
            row.family = match cell {
                Cell::Num(n @ (4 | 6)) => Some(n as u8),
                Cell::Null => None,
                _ => return Err(ParseError::Shape("family is not 4 or 6".into())),
            }
        }
        Col::Proto => row.proto = text(&cell),
        Col::Port => {
            row.port = Some(
                u16::try_from(num("port")?)
                    .map_err(|_| ParseError::Shape("port out of range".into()))?,
            )
        }
        Col::Mac => row.mac = text(&cell).and_then(|m| Mac::parse(&m).ok()),
        Col::Ip => row.ip = text(&cell).and_then(|s| s.parse().ok()),
        Col::Conns => row.conns = num("conns")?,
        Col::RxBytes => row.rx_bytes = num("rx_bytes")?,
        Col::RxPkts => row.rx_pkts = num("rx_pkts")?,
        Col::TxBytes => row.tx_bytes = num("tx_bytes")?,
        Col::TxPkts => row.tx_pkts = num("tx_pkts")?,
        Col::Layer7 => row.layer7 = text(&cell),
        Col::Other => {}
    }
    Ok(())
}

fn check_columns(cols: &[Col]) -> Result<(), ParseError> {
    // Every grouping carries the counters; without them this is not nlbw's output.
    for need in [Col::RxBytes, Col::TxBytes] {
        if !cols.contains(&need) {
            return Err(ParseError::Shape(format!("no {need:?} column")));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawJson {
    columns: Vec<String>,
    data: Vec<Vec<Value>>,
}

/// `nlbw -c json [-g …]`: `{"columns":[…],"data":[[…],…]}`.
pub fn json(text: &str) -> Result<Vec<Row>, ParseError> {
    let raw: RawJson = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let cols: Vec<Col> = raw.columns.iter().map(|c| col(c)).collect();
    check_columns(&cols)?;
    let mut rows = Vec::with_capacity(raw.data.len());
    for (i, data) in raw.data.iter().enumerate() {
        if data.len() < cols.len() {
            return Err(ParseError::Shape(format!(
                "row {i} has {} cells for {} columns",
                data.len(),
                cols.len()
            )));
        }
        let mut row = Row::default();
        for (c, v) in cols.iter().zip(data) {
            if *c == Col::Other {
                continue; // a newer nlbw's column: whatever its type, not ours
            }
            let cell = match v {
                Value::Null => Cell::Null,
                Value::String(s) => Cell::Str(s),
                Value::Number(n) => match n.as_u64() {
                    Some(n) => Cell::Num(n),
                    None => {
                        return Err(ParseError::Shape(format!("row {i}: {n} is not a counter")))
                    }
                },
                other => return Err(ParseError::Shape(format!("row {i}: unexpected {other}"))),
            };
            set(&mut row, *c, cell).map_err(|e| ParseError::Shape(format!("row {i}: {e}")))?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Splits one CSV line (tab separated, `"` quoting with `""` inside) into fields,
/// each with whether it was quoted (a quoted field is text, never a number).
fn csv_fields(line: &str) -> Result<Vec<(String, bool)>, ParseError> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(ParseError::Shape("unterminated quote".into())),
                }
            }
        }
        loop {
            match chars.next() {
                None => {
                    out.push((field, quoted));
                    return Ok(out);
                }
                Some('\t') => break,
                Some(_) if quoted => {
                    return Err(ParseError::Shape("text after a closing quote".into()))
                }
                Some(c) => field.push(c),
            }
        }
        out.push((field, quoted));
    }
}

/// `nlbw -c csv`: a header line of quoted column names, then one line per row.
pub fn csv(text: &str) -> Result<Vec<Row>, ParseError> {
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let header = lines
        .next()
        .ok_or_else(|| ParseError::Shape("no header line".into()))?;
    let cols: Vec<Col> = csv_fields(header)?
        .iter()
        .map(|(name, _)| col(name))
        .collect();
    check_columns(&cols)?;
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let fields = csv_fields(line)?;
        if fields.len() < cols.len() {
            return Err(ParseError::Shape(format!(
                "line {} has {} fields for {} columns",
                i + 2,
                fields.len(),
                cols.len()
            )));
        }
        let mut row = Row::default();
        for (c, (f, quoted)) in cols.iter().zip(&fields) {
            let cell = if f.is_empty() && !quoted {
                Cell::Null
            } else if *quoted {
                Cell::Str(f)
            } else {
                match f.parse::<u64>() {
                    Ok(n) => Cell::Num(n),
                    Err(_) => Cell::Str(f),
                }
            };
            set(&mut row, *c, cell)
                .map_err(|e| ParseError::Shape(format!("line {}: {e}", i + 2)))?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `nlbw -c list`: one `YYYY-MM-DD` period start per line, newest first.
pub fn list(text: &str) -> Result<Vec<String>, ParseError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l.trim();
            let b = l.as_bytes();
            let ok = b.len() == 10
                && b[4] == b'-'
                && b[7] == b'-'
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
            if ok {
                Ok(l.to_owned())
            } else {
                Err(ParseError::Shape(format!("period {l:?} is not YYYY-MM-DD")))
            }
        })
        .collect()
}

/// One device's counters summed over its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    /// Addresses seen for it, IPv4 first, each once.
    pub ips: Vec<IpAddr>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub conns: u64,
    /// Bytes (both directions) per protocol label: layer7 name, else the IP protocol.
    pub protocols: Vec<(String, u64)>,
}

impl DeviceTotals {
    pub fn total(&self) -> u64 {
        self.rx_bytes.saturating_add(self.tx_bytes)
    }
}

/// Rows folded per MAC. Sums saturate: a counter near `u64::MAX` must not wrap into
/// a small number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aggregate {
    pub devices: BTreeMap<Mac, DeviceTotals>,
    /// Bytes on rows without a usable MAC (nlbwmon found no neighbour entry).
    pub unattributed_bytes: u64,
}

pub fn aggregate(rows: &[Row]) -> Aggregate {
    let mut out = Aggregate::default();
    for r in rows {
        let bytes = r.rx_bytes.saturating_add(r.tx_bytes);
        let Some(mac) = r.mac else {
            out.unattributed_bytes = out.unattributed_bytes.saturating_add(bytes);
            continue;
        };
        let d = out.devices.entry(mac).or_default();
        d.rx_bytes = d.rx_bytes.saturating_add(r.rx_bytes);
        d.tx_bytes = d.tx_bytes.saturating_add(r.tx_bytes);
        d.conns = d.conns.saturating_add(r.conns);
        if let Some(ip) = r.ip {
            if !d.ips.contains(&ip) {
                d.ips.push(ip);
            }
        }
        let label = r.layer7.as_deref().or(r.proto.as_deref());
        if let Some(label) = label {
            match d.protocols.iter_mut().find(|(l, _)| l == label) {
                Some((_, b)) => *b = b.saturating_add(bytes),
                None => d.protocols.push((label.to_owned(), bytes)),
            }
        }
    }
    for d in out.devices.values_mut() {
        // IpAddr orders every IPv4 address before every IPv6 one, then by
        // address; one `sort` instance serves scan and usage.
        d.ips.sort();
        d.protocols
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = include_str!("../../fixtures/nlbwmon/nlbw-json.json");
    const JSON_MAC: &str = include_str!("../../fixtures/nlbwmon/nlbw-json-group-mac.json");
    const CSV: &str = include_str!("../../fixtures/nlbwmon/nlbw-csv.csv");
    const LIST: &str = include_str!("../../fixtures/nlbwmon/nlbw-list.txt");

    fn mac(s: &str) -> Mac {
        Mac::parse(s).unwrap()
    }

    #[test]
    fn the_default_grouping_parses_with_null_layer7() {
        let rows = json(JSON).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!(
            rows[0],
            Row {
                family: Some(4),
                proto: Some("IP".into()),
                port: Some(0),
                mac: Some(mac("02:00:00:00:01:02")),
                ip: Some("192.168.1.102".parse().unwrap()),
                conns: 2,
                rx_bytes: 874179088,
                rx_pkts: 13475,
                tx_bytes: 505987,
                tx_pkts: 9720,
                layer7: None,
            }
        );
        assert_eq!(rows[5].layer7.as_deref(), Some("HTTPS"));
        assert_eq!(rows[5].port, Some(443));
    }

    #[test]
    fn csv_and_json_of_the_same_database_agree() {
        assert_eq!(csv(CSV).unwrap(), json(JSON).unwrap());
    }

    #[test]
    fn the_mac_grouping_sums_to_the_default_grouping() {
        let by_mac = aggregate(&json(JSON_MAC).unwrap());
        let full = aggregate(&json(JSON).unwrap());
        assert_eq!(by_mac.devices.len(), 2);
        for (m, d) in &by_mac.devices {
            let f = &full.devices[m];
            assert_eq!(
                (d.rx_bytes, d.tx_bytes, d.conns),
                (f.rx_bytes, f.tx_bytes, f.conns)
            );
            assert!(d.ips.is_empty() && d.protocols.is_empty());
        }
        let bob = &full.devices[&mac("02:00:00:00:01:02")];
        assert_eq!(bob.rx_bytes, 894198214);
        assert_eq!(bob.ips, ["192.168.1.102".parse::<IpAddr>().unwrap()]);
        assert_eq!(bob.protocols[0], ("IP".to_owned(), 874179088 + 505987));
        assert_eq!(bob.protocols[1].0, "HTTP");
    }

    #[test]
    fn ipv6_rows_unknown_columns_and_no_rows() {
        let text = r#"{"columns":["family","mac","ip","rx_bytes","tx_bytes","future","layer7"],
            "data":[[6,"02:00:00:00:01:01","fd00::101",10,20,{"x":1},null],
                    [4,"02:00:00:00:01:01","192.168.1.101",1,2,"?","DNS"],
                    [6,"00:00:00:00:00:00","fd00::9",5,5,0,null]]}"#;
        let rows = json(text).unwrap();
        assert_eq!(rows[0].family, Some(6));
        assert_eq!(rows[0].ip, Some("fd00::101".parse().unwrap()));
        let a = aggregate(&rows);
        let d = &a.devices[&mac("02:00:00:00:01:01")];
        assert_eq!(d.ips[0], "192.168.1.101".parse::<IpAddr>().unwrap());
        assert_eq!(d.ips[1], "fd00::101".parse::<IpAddr>().unwrap());
        assert_eq!(a.unattributed_bytes, 10);
        let empty = json(r#"{"columns":["mac","rx_bytes","tx_bytes"],"data":[]}"#).unwrap();
        assert!(empty.is_empty());
        assert!(csv("\"mac\"\t\"rx_bytes\"\t\"tx_bytes\"\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn counters_near_the_top_saturate() {
        let m = u64::MAX - 1;
        let text = format!(
            r#"{{"columns":["mac","conns","rx_bytes","tx_bytes"],"data":[["02:00:00:00:01:01",1,{m},{m}],["02:00:00:00:01:01",1,{m},5]]}}"#
        );
        let a = aggregate(&json(&text).unwrap());
        let d = &a.devices[&mac("02:00:00:00:01:01")];
        assert_eq!(d.rx_bytes, u64::MAX);
        assert_eq!(d.tx_bytes, u64::MAX);
        assert_eq!(d.total(), u64::MAX);
    }

    #[test]
    fn csv_quoting_and_empty_layer7() {
        let text = "\"mac\"\t\"rx_bytes\"\t\"tx_bytes\"\t\"layer7\"\n\
                    \"02:00:00:00:01:01\"\t1\t2\t\"say \"\"hi\"\"\ttab\"\n\
                    \"02:00:00:00:01:02\"\t3\t4\t\n";
        let rows = csv(text).unwrap();
        assert_eq!(rows[0].layer7.as_deref(), Some("say \"hi\"\ttab"));
        assert_eq!(rows[1].layer7, None);
        assert!(matches!(
            csv("\"mac\"\t\"rx_bytes\"\t\"tx_bytes\"\n\"02:00:00:00:01:01\t1\t2\n"),
            Err(ParseError::Shape(_))
        ));
    }

    #[test]
    fn truncated_or_foreign_output_is_an_error() {
        let cut = &JSON[..JSON.len() / 2];
        assert!(matches!(json(cut), Err(ParseError::Json(_))));
        assert!(matches!(json(""), Err(ParseError::Json(_))));
        assert!(matches!(json("[1,2]"), Err(ParseError::Json(_))));
        assert!(matches!(
            json(r#"{"columns":["mac"],"data":[]}"#),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(
            json(
                r#"{"columns":["mac","rx_bytes","tx_bytes"],"data":[["02:00:00:00:01:01",-1,2]]}"#
            ),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(
            json(r#"{"columns":["mac","rx_bytes","tx_bytes"],"data":[["02:00:00:00:01:01",1]]}"#),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(csv(""), Err(ParseError::Shape(_))));
    }

    #[test]
    fn the_period_list() {
        assert_eq!(list(LIST).unwrap(), ["2026-11-01"]);
        assert_eq!(
            list("2026-11-01\n2026-10-01\n").unwrap(),
            ["2026-11-01", "2026-10-01"]
        );
        assert!(list("").unwrap().is_empty());
        assert!(list("Error\n").is_err());
    }
}
