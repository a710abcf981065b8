//! Whether fw4 offloads flows: from UCI (`firewall.@defaults[0]`'s
//! `flow_offloading` / `flow_offloading_hw`) and from the live ruleset (nft's JSON:
//! a `flowtable` object in `table inet fw4`, a `{"flow": {"op": "add", "flowtable":
//! "@ft"}}` statement in its forward chain). Pure: text in, values out.

use serde_json::Value;

use crate::system::flowtable::LiveJson;
use crate::uci_format;

/// The two UCI options, as the owner wrote them (`None`: absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UciOffload {
    pub flow_offloading: Option<String>,
    pub flow_offloading_hw: Option<String>,
}

pub const OPTIONS: [&str; 2] = ["flow_offloading", "flow_offloading_hw"];

/// UCI's booleans, as fw4 reads them.
fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "on" | "true" | "yes" | "enabled"))
}

impl UciOffload {
    pub fn software(&self) -> bool {
        truthy(self.flow_offloading.as_deref())
    }

    /// fw4 offloads in hardware only when software offloading is on too.
    pub fn hardware(&self) -> bool {
        self.software() && truthy(self.flow_offloading_hw.as_deref())
    }

    pub fn get(&self, option: &str) -> Option<&str> {
        match option {
            "flow_offloading" => self.flow_offloading.as_deref(),
            "flow_offloading_hw" => self.flow_offloading_hw.as_deref(),
            _ => None,
        }
    }
}

/// The options of the first `defaults` section of `uci export firewall` (what
/// `@defaults[0]` names).
pub fn uci(export: &str) -> Result<UciOffload, uci_format::ParseError> {
    let sections = uci_format::parse(export)?;
    let Some(d) = sections.iter().find(|s| s.kind == "defaults") else {
        return Ok(UciOffload::default());
    };
    Ok(UciOffload {
        flow_offloading: d.get("flow_offloading").map(str::to_owned),
        flow_offloading_hw: d.get("flow_offloading_hw").map(str::to_owned),
    })
}

/// A flowtable of fw4's table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Flowtable {
    pub name: String,
    pub devices: Vec<String>,
    /// `flags offload`: the flows go to the hardware (fw4's `flow_offloading_hw`).
    pub hardware: bool,
}

/// What is live in `table inet fw4`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub flowtables: Vec<Flowtable>,
    /// The flowtables the forward chain's `flow add @…` statements name.
    pub offload_rules: Vec<String>,
}

impl Live {
    /// Established flows skip the forward hook: a forward rule adds them to a
    /// flowtable that exists.
    pub fn offloading(&self) -> bool {
        self.offload_rules
            .iter()
            .any(|r| self.flowtables.iter().any(|f| &f.name == r))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("nft's JSON: {0}")]
pub struct BadJson(String);

/// The objects of one `nft -j list …` document.
fn objects(text: &str) -> Result<Vec<Value>, BadJson> {
    let v: Value = serde_json::from_str(text).map_err(|e| BadJson(e.to_string()))?;
    match v.get("nftables") {
        Some(Value::Array(a)) => Ok(a.clone()),
        _ => Err(BadJson("no \"nftables\" array".into())),
    }
}

fn in_fw4(o: &Value) -> bool {
    o.get("family").and_then(Value::as_str) == Some("inet")
        && o.get("table").and_then(Value::as_str) == Some("fw4")
}

/// One string or an array of them (nft prints a single device as a string).
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads any nft JSON document (`list flowtables`, `list chain`, `list ruleset`):
/// fw4's flowtables, and the flowtables its forward chain adds flows to.
pub fn parse(text: &str, live: &mut Live) -> Result<(), BadJson> {
    for o in objects(text)? {
        if let Some(ft) = o.get("flowtable").filter(|f| in_fw4(f)) {
            let name = ft.get("name").and_then(Value::as_str).unwrap_or_default();
            if !live.flowtables.iter().any(|f| f.name == name) {
                live.flowtables.push(Flowtable {
                    name: name.to_owned(),
                    devices: strings(ft.get("dev")),
                    hardware: strings(ft.get("flags")).iter().any(|f| f == "offload"),
                });
            }
        }
        let Some(rule) = o
            .get("rule")
            .filter(|r| in_fw4(r) && r.get("chain").and_then(Value::as_str) == Some("forward"))
        else {
            continue;
        };
        for stmt in rule
            .get("expr")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(flow) = stmt.get("flow") else {
                continue;
            };
            if flow.get("op").and_then(Value::as_str) != Some("add") {
                continue;
            }
            if let Some(t) = flow.get("flowtable").and_then(Value::as_str) {
                let t = t.trim_start_matches('@').to_owned();
                if !live.offload_rules.contains(&t) {
                    live.offload_rules.push(t);
                }
            }
        }
    }
    Ok(())
}

/// What the seam read, parsed.
pub fn live(json: &LiveJson) -> Result<Live, BadJson> {
    let mut live = Live::default();
    parse(&json.flowtables, &mut live)?;
    if let Some(f) = &json.forward {
        parse(f, &mut live)?;
    }
    Ok(live)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const FIREWALL: &str = include_str!("../../fixtures/fw4/etc-config-firewall");
    const DEFAULT_JSON: &str = include_str!("../../fixtures/fw4/fw4-default.json");
    const OFFLOAD_JSON: &str = include_str!("../../fixtures/fw4/fw4-offload.json");
    const FLOWTABLES_JSON: &str = include_str!("../../fixtures/fw4/fw4-flowtables.json");

    /// The stock file with offloading switched on the way LuCI writes it.
    pub(crate) fn firewall_with(options: &str) -> String {
        FIREWALL.replacen(
            "config defaults\n",
            &format!("config defaults\n{options}"),
            1,
        )
    }

    #[test]
    fn uci_reads_the_defaults_section() {
        let stock = uci(FIREWALL).unwrap();
        assert_eq!(stock, UciOffload::default());
        assert!(!stock.software() && !stock.hardware());

        let sw = uci(&firewall_with("\toption flow_offloading\t'1'\n")).unwrap();
        assert!(sw.software() && !sw.hardware());
        assert_eq!(sw.flow_offloading.as_deref(), Some("1"));

        let hw = uci(&firewall_with(
            "\toption flow_offloading '1'\n\toption flow_offloading_hw '1'\n",
        ))
        .unwrap();
        assert!(hw.software() && hw.hardware());
        // Hardware alone does nothing in fw4 (its template needs both).
        let hw_only = uci(&firewall_with("\toption flow_offloading_hw 'yes'\n")).unwrap();
        assert!(!hw_only.software() && !hw_only.hardware());
        let off = uci(&firewall_with("\toption flow_offloading '0'\n")).unwrap();
        assert!(!off.software());
    }

    #[test]
    fn the_live_ruleset_shows_the_flowtable_and_the_offload_rule() {
        // Stock fw4, as `nft -j list ruleset` printed it here.
        let mut stock = Live::default();
        parse(DEFAULT_JSON, &mut stock).unwrap();
        assert_eq!(stock, Live::default());
        assert!(!stock.offloading());

        // With flow_offloading: the flowtable ft on the zone devices and the first
        // forward rule `meta l4proto { tcp, udp } flow add @ft`.
        let mut on = Live::default();
        parse(OFFLOAD_JSON, &mut on).unwrap();
        assert_eq!(
            on.flowtables,
            [Flowtable {
                name: "ft".into(),
                devices: vec!["br-lan".into(), "r-wan".into()],
                hardware: false
            }]
        );
        assert_eq!(on.offload_rules, ["ft"]);
        assert!(on.offloading());

        // The seam's two reads give the same answer.
        let forward_only = format!(
            "{{\"nftables\": [{}]}}",
            serde_json::from_str::<Value>(OFFLOAD_JSON).unwrap()["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| o.get("rule").is_some_and(|r| r["chain"] == "forward"))
                .map(|o| o.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let split = live(&LiveJson {
            flowtables: FLOWTABLES_JSON.into(),
            forward: Some(forward_only),
        })
        .unwrap();
        assert_eq!(split, on);

        // A flowtable without a rule adding to it offloads nothing; a rule naming
        // a flowtable that is not there neither.
        let table_only = live(&LiveJson {
            flowtables: FLOWTABLES_JSON.into(),
            forward: None,
        })
        .unwrap();
        assert!(!table_only.offloading());
        let hw = FLOWTABLES_JSON.replace("\"prio\": 0,", "\"prio\": 0, \"flags\": [\"offload\"],");
        let mut hw_live = Live::default();
        parse(&hw, &mut hw_live).unwrap();
        assert!(hw_live.flowtables[0].hardware);
        // Another table's flowtable is not fw4's.
        let other = FLOWTABLES_JSON.replace("\"table\": \"fw4\"", "\"table\": \"mine\"");
        let mut none = Live::default();
        parse(&other, &mut none).unwrap();
        assert!(none.flowtables.is_empty());
        assert!(parse("{\"nftables\": 3}", &mut none).is_err());
        assert!(parse("not json", &mut none).is_err());
    }
}
