//! `docs/openapi.json` against the server.
//!
//! 1. The document's (method, path) operations are exactly the ones the server serves:
//!    the router operations of `netpilot_proto::routes::ROUTES` plus the relay's own
//!    endpoints ([`RELAY_ONLY`]). Route-table parameter names are mapped to the
//!    document's by one fixed table, [`PARAM_NAMES`] (`{id}` is `{groupId}`, `{name}`
//!    is `{category}`, `{mac}` stays), the convention the document's description states.
//! 2. The document is well formed for what this test understands: every `$ref`
//!    resolves, schemas use only the keywords [`Checker`] implements, path templates
//!    and path parameters agree, examples validate against their own schemas.
//! 3. Against a real relay and a real agent (`--simulate`), every documented operation
//!    is called at least once, in ways whose status is deterministic. Each answer's
//!    status must be the expected one and listed for the operation, its content type
//!    documented, and its JSON body valid against the documented schema; a property the
//!    schema does not document counts as an error, so the document cannot fall behind.
//!
//! The schema checker is hand-written (about a hundred lines) for the subset of JSON
//! Schema the document uses: `type`, `const`, `enum`, `required`, `properties`, `items`,
//! `allOf`, `anyOf`, `oneOf`, `not`, `$ref` to local components, `minLength`/`maxLength`,
//! `minimum`/`maximum`, `minItems`/`maxItems`, `pattern` (a search, as JSON Schema
//! reads it, with the `regex` crate: the document's patterns keep to the syntax
//! ECMA-262, Python and Rust agree on — no look-around, no back-references — and
//! each must compile). Any other validation keyword in the document fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use netpilot_proto::link::{
    CONNECT_PATH, ENROLL_PATH, HEADER_AGENT_VERSION, HEADER_ROUTER_ID, REPORT_PATH,
    SPEEDTEST_DOWNLOAD_PATH, SPEEDTEST_PING_PATH, SPEEDTEST_UPLOAD_PATH, UPGRADE_PROTOCOL,
};
use netpilot_proto::routes::ROUTES;
use netpilot_proto::ErrorCode;
use netpilot_tests::{eventually, session_id, Agent, Client, Relay, RelayOptions, Reply};
use serde_json::{json, Map, Value};

/// The document, compiled in so that editing it rebuilds this test.
const DOC: &str = include_str!("../../docs/openapi.json");

/// Route-table parameter name → the document's name for it.
const PARAM_NAMES: &[(&str, &str)] = &[("id", "groupId"), ("mac", "mac"), ("name", "category")];

/// What the relay serves itself (`relay/src/api.rs`, `admin.rs`, `session_api.rs`,
/// `enroll.rs`, `agent_link.rs`), as the document names it.
const RELAY_ONLY: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/api/admin/routers"),
    ("GET", "/api/admin/routers"),
    ("GET", "/api/admin/routers/{routerId}"),
    ("DELETE", "/api/admin/routers/{routerId}"),
    ("POST", "/api/admin/routers/{routerId}/token"),
    ("POST", "/api/session/start"),
    ("POST", "/api/session/end"),
    ("POST", "/api/session/refresh"),
    ("GET", "/api/session/status"),
    ("POST", ENROLL_PATH),
    ("GET", CONNECT_PATH),
    ("POST", REPORT_PATH),
    ("GET", SPEEDTEST_PING_PATH),
    ("GET", SPEEDTEST_DOWNLOAD_PATH),
    ("POST", SPEEDTEST_UPLOAD_PATH),
];

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Extension on router operations whose agent feature has not landed (agent answers 501).
const NOT_IMPLEMENTED_EXT: &str = "x-netpilot-implemented";

// Relay settings the live test relies on.
const COMMAND_TIMEOUT: &str = "5s";
/// Longer than the command timeout: the 408 case below stops the agent, which is also
/// a silent link; probed, it would answer 503 (that case is `tests/link.rs`'s).
const PROBE_AFTER: &str = "1h";
const ENROLL_PER_MINUTE: usize = 12;
const MAX_BODY_BYTES: usize = 4096;
/// The relay's fixed cap for enrollment bodies (`relay/src/enroll.rs`).
const ENROLL_MAX_BODY_BYTES: usize = 16 * 1024;

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is not valid JSON")
}

/// A route-table pattern in the document's naming: `/api/groups/{id}` → `/api/groups/{groupId}`.
fn to_doc_path(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                let (_, doc_name) = PARAM_NAMES.iter().find(|(r, _)| *r == name).unwrap_or_else(|| {
                    panic!("route parameter {{{name}}} of {pattern} has no document name: add it to PARAM_NAMES and to the document")
                });
                format!("{{{doc_name}}}")
            }
            None => seg.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every (METHOD, path) the document describes.
fn doc_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if HTTP_METHODS.contains(&method.as_str()) {
                ops.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    ops
}

fn template_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

// ------------------------------------------------------------------ schema checker

const VALIDATION_KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "const",
    "enum",
    "required",
    "properties",
    "items",
    "allOf",
    "anyOf",
    "oneOf",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "pattern",
    "minItems",
    "maxItems",
    "not",
];
const ANNOTATION_KEYWORDS: &[&str] = &[
    "description",
    "title",
    "format",
    "default",
    "example",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];
const TYPES: &[&str] = &[
    "null", "boolean", "string", "number", "integer", "array", "object",
];

/// Validates JSON values against the document's schemas (the subset listed above).
struct Checker<'a> {
    doc: &'a Value,
}

impl<'a> Checker<'a> {
    fn pointer(&self, r: &str) -> &'a Value {
        r.strip_prefix('#')
            .and_then(|p| self.doc.pointer(p))
            .unwrap_or_else(|| panic!("unresolvable $ref {r}"))
    }

    /// Follows `$ref` (parameters, responses, schemas).
    fn resolve<'v>(&self, mut v: &'v Value) -> &'v Value
    where
        'a: 'v,
    {
        for _ in 0..16 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => v = self.pointer(r),
                None => return v,
            }
        }
        panic!("$ref chain too long at {v}")
    }

    /// Every way `value` fails `schema`, each with its JSON location.
    fn validate(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        self.check(schema, value, "$", true, &mut errs);
        errs
    }

    /// `strict`: properties of `v` that no `properties` of this schema (through `$ref`
    /// and `allOf`) documents are errors. Branches of `allOf` are checked without it
    /// (each branch documents only part of the object); nested values always with it.
    fn check(&self, schema: &Value, v: &Value, at: &str, strict: bool, errs: &mut Vec<String>) {
        let Some(s) = schema.as_object() else {
            errs.push(format!("{at}: schema is not an object: {schema}"));
            return;
        };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            self.check(self.pointer(r), v, at, strict, errs);
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !types.iter().any(|t| type_matches(t, v)) {
                errs.push(format!("{at}: expected type {t}, got {}", short(v)));
                return;
            }
        }
        if let Some(c) = s.get("const") {
            if c != v {
                errs.push(format!("{at}: expected {c}, got {}", short(v)));
            }
        }
        if let Some(Value::Array(e)) = s.get("enum") {
            if !e.contains(v) {
                errs.push(format!(
                    "{at}: {} is not one of {}",
                    short(v),
                    Value::Array(e.clone())
                ));
            }
        }
        if let Value::String(text) = v {
            let n = text.chars().count() as u64;
            if s.get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|min| n < min)
            {
                errs.push(format!("{at}: string shorter than minLength"));
            }
            if s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|max| n > max)
            {
                errs.push(format!("{at}: string longer than maxLength"));
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                match matches(p, text) {
                    Ok(true) => {}
                    Ok(false) => errs.push(format!("{at}: {} does not match {p:?}", short(v))),
                    Err(e) => errs.push(format!("{at}: pattern {p:?} does not compile: {e}")),
                }
            }
        }
        if let Some(x) = v.as_f64() {
            if s.get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|min| x < min)
            {
                errs.push(format!("{at}: {x} is below the minimum"));
            }
            if s.get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|max| x > max)
            {
                errs.push(format!("{at}: {x} is above the maximum"));
            }
        }
        if let Value::Object(map) = v {
            if let Some(Value::Array(required)) = s.get("required") {
                for k in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(k) {
                        errs.push(format!("{at}: required property {k:?} is missing"));
                    }
                }
            }
            if let Some(Value::Object(props)) = s.get("properties") {
                for (k, sub) in props {
                    if let Some(val) = map.get(k) {
                        self.check(sub, val, &format!("{at}.{k}"), true, errs);
                    }
                }
            }
        }
        if let Value::Array(items) = v {
            let n = items.len() as u64;
            if s.get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|min| n < min)
            {
                errs.push(format!("{at}: fewer than minItems items"));
            }
            if s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|max| n > max)
            {
                errs.push(format!("{at}: more than maxItems items"));
            }
        }
        if let Some(not) = s.get("not") {
            let mut e = Vec::new();
            self.check(not, v, at, false, &mut e);
            if e.is_empty() {
                errs.push(format!("{at}: matches the schema under `not` ({not})"));
            }
        }
        if let (Value::Array(items), Some(sub)) = (v, s.get("items")) {
            for (i, item) in items.iter().enumerate() {
                self.check(sub, item, &format!("{at}[{i}]"), true, errs);
            }
        }
        if let Some(Value::Array(all)) = s.get("allOf") {
            for b in all {
                self.check(b, v, at, false, errs);
            }
        }
        for (kw, exactly_one) in [("anyOf", false), ("oneOf", true)] {
            if let Some(Value::Array(branches)) = s.get(kw) {
                let mut passing = 0;
                let mut why = Vec::new();
                for b in branches {
                    let mut e = Vec::new();
                    self.check(b, v, at, strict, &mut e);
                    if e.is_empty() {
                        passing += 1;
                    } else {
                        why.extend(e);
                    }
                }
                if passing == 0 {
                    errs.push(format!(
                        "{at}: matches no branch of {kw} ({})",
                        why.join("; ")
                    ));
                } else if exactly_one && passing > 1 {
                    errs.push(format!("{at}: matches {passing} branches of oneOf"));
                }
            }
        }
        if let (true, Value::Object(map)) = (strict, v) {
            let mut known = BTreeSet::new();
            self.known_properties(schema, &mut known);
            if !known.is_empty() {
                for k in map.keys().filter(|k| !known.contains(k.as_str())) {
                    errs.push(format!("{at}: property {k:?} is not documented"));
                }
            }
        }
    }

    fn known_properties<'v>(&self, schema: &'v Value, known: &mut BTreeSet<&'v str>)
    where
        'a: 'v,
    {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            self.known_properties(self.pointer(r), known);
        }
        if let Some(Value::Object(p)) = schema.get("properties") {
            known.extend(p.keys().map(String::as_str));
        }
        if let Some(Value::Array(all)) = schema.get("allOf") {
            for b in all {
                self.known_properties(b, known);
            }
        }
    }

    /// Keywords this checker does not implement would be silently ignored: refuse them.
    fn lint_schema(&self, schema: &Value, at: &str, errs: &mut Vec<String>) {
        let Some(s) = schema.as_object() else {
            errs.push(format!("{at}: schema is not an object"));
            return;
        };
        for (k, v) in s {
            let here = format!("{at}/{k}");
            match k.as_str() {
                "properties" => match v.as_object() {
                    Some(props) => props.iter().for_each(|(name, sub)| {
                        self.lint_schema(sub, &format!("{here}/{name}"), errs)
                    }),
                    None => errs.push(format!("{here}: not an object")),
                },
                "items" | "not" => self.lint_schema(v, &here, errs),
                "pattern" => match v.as_str().map(regex::Regex::new) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => errs.push(format!("{here}: does not compile: {e}")),
                    None => errs.push(format!("{here}: not a string")),
                },
                "minItems" | "maxItems" | "minLength" | "maxLength" if !v.is_u64() => {
                    errs.push(format!("{here}: not a non-negative integer"))
                }
                "allOf" | "anyOf" | "oneOf" => match v.as_array() {
                    Some(bs) if !bs.is_empty() => bs
                        .iter()
                        .enumerate()
                        .for_each(|(i, b)| self.lint_schema(b, &format!("{here}/{i}"), errs)),
                    _ => errs.push(format!("{here}: not a non-empty array")),
                },
                "$ref" => {
                    if v.as_str()
                        .and_then(|r| r.strip_prefix('#'))
                        .and_then(|p| self.doc.pointer(p))
                        .is_none()
                    {
                        errs.push(format!("{here}: {v} does not resolve"));
                    }
                }
                "type" => {
                    let ok = match v {
                        Value::String(t) => TYPES.contains(&t.as_str()),
                        Value::Array(ts) => {
                            !ts.is_empty()
                                && ts
                                    .iter()
                                    .all(|t| t.as_str().is_some_and(|t| TYPES.contains(&t)))
                        }
                        _ => false,
                    };
                    if !ok {
                        errs.push(format!("{here}: bad type {v}"));
                    }
                }
                "required" | "enum" if !v.is_array() => errs.push(format!("{here}: not an array")),
                k if VALIDATION_KEYWORDS.contains(&k) || ANNOTATION_KEYWORDS.contains(&k) => {}
                other => errs.push(format!(
                    "{at}: keyword {other:?} is not implemented by this test's checker"
                )),
            }
        }
    }
}

/// `pattern` as JSON Schema reads it (a search), each pattern compiled once per thread.
fn matches(pattern: &str, text: &str) -> Result<bool, regex::Error> {
    thread_local! {
        static COMPILED: std::cell::RefCell<BTreeMap<String, regex::Regex>> =
            std::cell::RefCell::default();
    }
    COMPILED.with(|c| {
        let mut c = c.borrow_mut();
        if !c.contains_key(pattern) {
            c.insert(pattern.to_owned(), regex::Regex::new(pattern)?);
        }
        Ok(c[pattern].is_match(text))
    })
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(77).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Every `$ref` anywhere in `v`.
fn collect_refs<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => collect_refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// Every value of an `enum` under a `code` property anywhere in `v`, with where.
fn collect_code_enums<'v>(v: &'v Value, at: &str, out: &mut Vec<(String, &'v Value)>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(e)) = m.get("properties").and_then(|p| p["code"].get("enum")) {
                out.extend(e.iter().map(|c| (at.to_owned(), c)));
            }
            for (k, x) in m {
                collect_code_enums(x, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| collect_code_enums(x, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// Lints every schema outside `components/schemas`: values of a `schema` key.
fn lint_embedded_schemas(chk: &Checker<'_>, v: &Value, at: &str, errs: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let here = format!("{at}/{k}");
                if k == "schema" {
                    chk.lint_schema(x, &here, errs);
                } else if here != "#/components/schemas" {
                    lint_embedded_schemas(chk, x, &here, errs);
                }
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| lint_embedded_schemas(chk, x, &format!("{at}/{i}"), errs)),
        _ => {}
    }
}

// ------------------------------------------------------------------ static checks

#[test]
fn documented_operations_are_exactly_the_served_ones() {
    let doc = doc();
    let documented = doc_operations(&doc);
    let mut served = BTreeSet::new();
    for r in ROUTES {
        let op = (r.method.as_str().to_owned(), to_doc_path(r.pattern));
        assert!(served.insert(op.clone()), "route table lists {op:?} twice");
    }
    for (m, p) in RELAY_ONLY {
        let op = (m.to_string(), p.to_string());
        assert!(
            served.insert(op.clone()),
            "{op:?} is both relay-only and in the route table"
        );
    }
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/openapi.json does not match the server\n  served but not documented: {missing:?}\n  documented but not served: {extra:?}"
    );
    println!(
        "{} operations: {} router operations + {} relay endpoints",
        documented.len(),
        ROUTES.len(),
        RELAY_ONLY.len()
    );
}

#[test]
fn document_is_well_formed() {
    let doc = doc();
    let chk = Checker { doc: &doc };
    let mut errs = Vec::new();
    let version = doc["openapi"].as_str().unwrap_or("");
    if !version.starts_with("3.1.") {
        errs.push(format!("openapi is {version:?}, expected 3.1.x"));
    }
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in refs {
        if r.strip_prefix('#').and_then(|p| doc.pointer(p)).is_none() {
            errs.push(format!("$ref {r} does not resolve"));
        }
    }
    for (name, s) in doc["components"]["schemas"]
        .as_object()
        .expect("components/schemas")
    {
        chk.lint_schema(s, &format!("#/components/schemas/{name}"), &mut errs);
    }
    lint_embedded_schemas(&chk, &doc, "#", &mut errs);
    // A code an error response narrows `ErrorBody` to must be one `ErrorBody` lists,
    // else an answer with it could never validate.
    let codes = &doc["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"];
    let mut narrowed = Vec::new();
    collect_code_enums(
        &doc["components"]["responses"],
        "#/components/responses",
        &mut narrowed,
    );
    for (at, code) in narrowed {
        if !codes.as_array().is_some_and(|c| c.contains(code)) {
            errs.push(format!("{at}: code {code} is not in ErrorBody's enum"));
        }
    }
    // ErrorBody's enum is exactly the codes the servers send: `ErrorCode::ALL`.
    let documented: BTreeSet<&str> = codes
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let sent: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let missing: Vec<_> = sent.difference(&documented).collect();
    if !missing.is_empty() {
        errs.push(format!(
            "ErrorBody's code enum lacks {missing:?}, which ErrorCode (proto/src/error_code.rs) has"
        ));
    }
    let extra: Vec<_> = documented.difference(&sent).collect();
    if !extra.is_empty() {
        errs.push(format!(
            "ErrorBody's code enum lists {extra:?}, which ErrorCode (proto/src/error_code.rs) lacks: no server sends them"
        ));
    }

    let mut op_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if !HTTP_METHODS.contains(&method.as_str()) {
                continue;
            }
            let at = format!("{} {path}", method.to_ascii_uppercase());
            match op["operationId"].as_str() {
                Some(id) if op_ids.insert(id.to_owned()) => {}
                other => errs.push(format!("{at}: operationId {other:?} missing or not unique")),
            }
            // Path template and path parameters agree; every parameter is complete.
            let params: Vec<&Value> = op["parameters"]
                .as_array()
                .map(|a| a.iter().map(|p| chk.resolve(p)).collect())
                .unwrap_or_default();
            let path_params: BTreeSet<&str> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            let in_template: BTreeSet<&str> = template_params(path).into_iter().collect();
            if path_params != in_template {
                errs.push(format!(
                    "{at}: path parameters {path_params:?} but template has {in_template:?}"
                ));
            }
            for p in &params {
                let name = p["name"].as_str().unwrap_or("?");
                if !matches!(p["in"].as_str(), Some("path" | "query" | "header"))
                    || p.get("schema").is_none()
                {
                    errs.push(format!("{at}: parameter {name} needs `in` and `schema`"));
                }
                if p["in"] == "path" && p["required"] != true {
                    errs.push(format!("{at}: path parameter {name} must be required"));
                }
                if let Some(ex) = p.get("example") {
                    for e in chk.validate(&p["schema"], ex) {
                        errs.push(format!("{at}: example of parameter {name}: {e}"));
                    }
                } else if p["in"] == "path" {
                    errs.push(format!(
                        "{at}: path parameter {name} needs an example (the live test uses it)"
                    ));
                }
            }
            // Request examples validate against the request schemas.
            if let Some(content) = op["requestBody"]["content"].as_object() {
                for (ct, media) in content {
                    match media.get("example") {
                        Some(ex) => {
                            for e in chk.validate(&media["schema"], ex) {
                                errs.push(format!("{at}: request example ({ct}): {e}"));
                            }
                        }
                        None => errs.push(format!(
                            "{at}: request body {ct} needs an example (the live test sends it)"
                        )),
                    }
                }
            }
            // Responses: statuses are codes; error statuses use the error envelope.
            let no_responses = Map::new();
            let responses = op["responses"].as_object().unwrap_or(&no_responses);
            if responses.is_empty() {
                errs.push(format!("{at}: no responses"));
            }
            for (status, resp) in responses {
                let Ok(code) = status.parse::<u16>() else {
                    errs.push(format!(
                        "{at}: response key {status:?} is not a status code"
                    ));
                    continue;
                };
                let resp = chk.resolve(resp);
                if resp["description"].as_str().is_none() {
                    errs.push(format!("{at} {status}: no description"));
                }
                if code >= 400 {
                    let schema = resp["content"]["application/json"]["schema"].to_string();
                    if !schema.contains("#/components/schemas/ErrorEnvelope") {
                        errs.push(format!(
                            "{at} {status}: error answer without the ErrorEnvelope schema"
                        ));
                    }
                }
                // Each error code comes with one status, the one `ErrorCode` gives it.
                let mut listed = Vec::new();
                collect_code_enums(resp, "", &mut listed);
                for (_, c) in listed {
                    let Some(c) = c.as_str().and_then(ErrorCode::parse) else {
                        continue;
                    };
                    if c.status() != code {
                        errs.push(format!(
                            "{at} {status}: lists {c}, which always comes with {}",
                            c.status()
                        ));
                    }
                }
            }
            // Routed but unlanded features answer 501, and only those.
            let unlanded = op.get(NOT_IMPLEMENTED_EXT) == Some(&Value::Bool(false));
            if unlanded != responses.contains_key("501") {
                errs.push(format!(
                    "{at}: {NOT_IMPLEMENTED_EXT}: false and a 501 response go together"
                ));
            }
            // /api/ operations inherit the API key; the others say what they need
            // (`/metrics` names the key itself, `/health` and the agent endpoints
            // other schemes or none).
            let overrides = op.get("security").is_some();
            if path.starts_with("/api/") == overrides {
                errs.push(format!(
                    "{at}: /api/ operations inherit the API-key security, the others override it"
                ));
            }
        }
    }
    assert!(
        errs.is_empty(),
        "docs/openapi.json:\n  {}",
        errs.join("\n  ")
    );
}

/// Strings near and far from each field's rules: separators, case, lengths, control,
/// multi-byte and invisible characters, from a fixed-seed generator over each field's
/// alphabet plus hand-picked edges.
fn samples(alphabet: &str, edges: &[&str], max_len: usize) -> Vec<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    let mut out: Vec<String> = edges.iter().map(|s| (*s).to_owned()).collect();
    let mut rng = netpilot_testkit::XorShift::new(15);
    for _ in 0..4000 {
        let len = rng.below(max_len as u64 + 1) as usize;
        out.push((0..len).map(|_| *rng.pick(&chars)).collect());
    }
    out
}

/// The document is never looser than the server: every string a request field's schema
/// accepts, the agent's or the relay's own validator for that field accepts too (the
/// schemathesis run checks the same through the live server; this pins each rule to
/// its validator, in-process, on thousands of strings). And the schema is not
/// vacuous: each refuses some of the samples and accepts the documented forms.
#[test]
fn request_rules_are_no_looser_than_the_validators() {
    use netpilot_agent::dns::{categories, domain};
    use netpilot_agent::policy::model;
    use netpilot_agent::wifi::model::{Password, Ssid};

    const A63: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const A64: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const G64: &str = "gggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggg";
    let doc = doc();
    let chk = Checker { doc: &doc };
    let schema = |p: &str| chk.pointer(p).clone();
    type Rule = Box<dyn Fn(&str) -> bool>;
    /// Field, its schema, its validator, the sample alphabet, edge cases, longest sample.
    type Case<'e> = (
        &'static str,
        Value,
        Rule,
        &'static str,
        &'e [&'e str],
        usize,
    );
    let label = |max: usize| -> Rule {
        Box::new(move |s: &str| {
            let body: Map<String, Value> = [("v".to_owned(), json!(s))].into_iter().collect();
            netpilot_relay::http::Args {
                body: Some(&body),
                query: &[],
            }
            .label("v", max)
            .is_ok()
        })
    };
    let cases: Vec<Case<'_>> = vec![
        (
            "DeviceTarget.mac",
            schema("#/components/schemas/DeviceTarget/properties/mac"),
            Box::new(|s| model::Mac::parse(s).is_ok()),
            "0123456789abcdefABCDEF:-.g ",
            &["aa:bb:cc:dd:ee:f0", "AA-BB-CC-DD-EE-F0", "aabb.ccdd.eef0", "aabbccddeef0", "00:00:00:00:00:00", "01:00:5e:00:00:01", "aa:bb-cc:dd:ee:f0"],
            17,
        ),
        (
            "Schedule.start",
            schema("#/components/schemas/Schedule/properties/start"),
            Box::new(|s| model::parse_time("start", s, false).is_ok()),
            "0123456789: +",
            &["00:00", "23:59", "24:00", "7:30", "07:3", "+1:00"],
            6,
        ),
        (
            "Schedule.end",
            schema("#/components/schemas/Schedule/properties/end"),
            Box::new(|s| model::parse_time("end", s, true).is_ok()),
            "0123456789: +",
            &["24:00", "24:01", "23:59"],
            6,
        ),
        (
            "Group.name",
            schema("#/components/schemas/Group/properties/name"),
            Box::new(|s| model::validate_name("name", s).is_ok()),
            "aZ 09-é中🚀\t\n\u{7f}\u{85}",
            &["Kids", "", "\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}\u{1F680}"],
            70,
        ),
        (
            "WifiSsid.ssid",
            schema("#/components/schemas/WifiSsid/properties/ssid"),
            Box::new(|s| Ssid::parse(s).is_ok()),
            "aZ 09'\"é中🚀\t\n\u{7f}\u{85}",
            &["Home", "", "Café 🚀"],
            36,
        ),
        (
            "WifiPassword.password",
            schema("#/components/schemas/WifiPassword/properties/password"),
            Box::new(|s| Password::parse(s).is_ok()),
            "aZ09 ~!'\"é\t\u{7f}abcdef",
            &["12345678", "1234567", A63, A64, G64],
            70,
        ),
        (
            "DnsPolicy.blockDomains[]",
            schema("#/components/schemas/DnsPolicy/properties/blockDomains/items"),
            Box::new(|s| domain::normalize(s).is_ok()),
            "abz09-_.*é中 \u{200b}:[]",
            &["example.com", "*.example.com", "example.com.", "1.2.3.4", "a..b", "-a.com", "a-.com", "com", "xn--caf-dma.fr", "_dmarc.example.com"],
            30,
        ),
        (
            "DnsPolicy.categories[]",
            schema("#/components/schemas/DnsPolicy/properties/categories/items"),
            // As `dns.categories` reads them: case-insensitive.
            Box::new(|s| categories::validate_name(&s.trim().to_ascii_lowercase()).is_ok()),
            "az09_-A. ",
            &["social", "ads-2", "_x", "Social", ""],
            34,
        ),
        (
            "CreateRouterRequest.name",
            schema("#/components/schemas/CreateRouterRequest/properties/name"),
            label(64),
            "aZ 09é中🚀\t\n\u{85}\u{3000}",
            &["Home router", " ", " x ", ""],
            70,
        ),
    ];
    let mut errs = Vec::new();
    for (field, sch, rule, alphabet, edges, max_len) in &cases {
        let (mut accepted, mut refused) = (0, 0);
        for s in samples(alphabet, edges, *max_len) {
            if chk.validate(sch, &json!(s)).is_empty() {
                accepted += 1;
                if !rule(&s) {
                    errs.push(format!(
                        "{field}: the schema accepts {s:?}, the server refuses it"
                    ));
                }
            } else {
                refused += 1;
            }
        }
        if accepted == 0 || refused == 0 {
            errs.push(format!(
                "{field}: accepted {accepted}, refused {refused}: a vacuous rule"
            ));
        }
    }
    errs.truncate(40);
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

#[test]
fn checker_rejects_drift() {
    let doc = doc();
    let chk = Checker { doc: &doc };
    let health = chk.pointer("#/components/schemas/AgentHealth");
    let good = json!({
        "agent_version": "0.1.0", "router_id": "r", "mode": "simulated", "agent_uptime_s": 1, "agent_starts": 1,
        "infrastructure_ready": false, "link_connected_since_unix": null, "link_connects": 1,
        "clock_unset": false,
    });
    assert_eq!(chk.validate(health, &good), Vec::<String>::new());
    let mut extra = good.clone();
    extra["surprise"] = json!(1);
    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("mode");
    let mut wrong_type = good.clone();
    wrong_type["link_connects"] = json!("1");
    let mut wrong_enum = good.clone();
    wrong_enum["mode"] = json!("fake");
    for bad in [&extra, &missing, &wrong_type, &wrong_enum] {
        assert!(!chk.validate(health, bad).is_empty(), "accepted {bad}");
    }

    // Through the operation: envelope (allOf over $ref) around `data`.
    let op = &doc["paths"]["/api/agent/health"]["get"]["responses"];
    let schema = |status: &str| &chk.resolve(&op[status])["content"]["application/json"]["schema"];
    let meta = json!({"duration_ms": 1, "request_id": "x"});
    let ok = json!({"success": true, "data": good, "meta": meta});
    assert_eq!(chk.validate(schema("200"), &ok), Vec::<String>::new());
    for bad in [
        json!({"success": true, "data": extra, "meta": meta}),
        json!({"success": false, "data": good, "meta": meta}),
        json!({"success": true, "data": good}),
        json!({"success": true, "data": good, "meta": meta, "more": 1}),
    ] {
        assert!(
            !chk.validate(schema("200"), &bad).is_empty(),
            "accepted {bad}"
        );
    }
    // Error answers: the code must be one of the status's codes.
    let offline = json!({"success": false, "error": {"code": "ROUTER_OFFLINE", "message": "m"}, "meta": meta});
    assert_eq!(chk.validate(schema("503"), &offline), Vec::<String>::new());
    for bad in [
        json!({"success": false, "error": {"code": "FORBIDDEN", "message": "m"}, "meta": meta}),
        json!({"success": false, "error": {"code": "ROUTER_OFFLINE"}, "meta": meta}),
        json!({"success": false, "error": {"code": "ROUTER_OFFLINE", "message": "m", "x": 1}, "meta": meta}),
        json!({"success": true, "error": {"code": "ROUTER_OFFLINE", "message": "m"}, "meta": meta}),
    ] {
        assert!(
            !chk.validate(schema("503"), &bad).is_empty(),
            "accepted {bad}"
        );
    }
    // oneOf with null: a present object is checked in full.
    let info = chk.pointer("#/components/schemas/RouterInfo");
    let mut router = json!({
        "hostname": "h", "model": null, "openwrt": null, "kernel": null, "uptime_s": 1,
        "load": {"1m": 0.1, "5m": 0.2, "15m": 0.3}, "memory": null,
    });
    assert_eq!(chk.validate(info, &router), Vec::<String>::new());
    router["memory"] = json!({"free_bytes": 1, "available_bytes": null, "buffers_bytes": null, "cached_bytes": null});
    assert!(
        !chk.validate(info, &router).is_empty(),
        "accepted memory without total_bytes"
    );
    router["memory"] = json!(null);
    router["load"] = json!({"1m": 0.1, "5m": 0.2, "15m": 0.3, "30m": 0.4});
    assert!(
        !chk.validate(info, &router).is_empty(),
        "accepted an undocumented load average"
    );

    // The request keywords: `not` (one field in two spellings), `minItems`, `pattern`.
    let bandwidth = chk.pointer("#/components/schemas/Bandwidth");
    assert_eq!(
        chk.validate(bandwidth, &json!({"download_kbps": 8})),
        Vec::<String>::new()
    );
    assert!(!chk
        .validate(bandwidth, &json!({"downloadKbps": 8, "download_kbps": 8}))
        .is_empty());
    assert!(!chk
        .validate(bandwidth, &json!({"downloadKbps": 7}))
        .is_empty());
    let schedule = chk.pointer("#/components/schemas/Schedule");
    let window = json!({"days": ["mon"], "start": "22:00", "end": "24:00", "action": "block"});
    assert_eq!(chk.validate(schedule, &window), Vec::<String>::new());
    let mut no_days = window.clone();
    no_days["days"] = json!([]);
    let mut bad_time = window.clone();
    bad_time["start"] = json!("24:00");
    for bad in [&no_days, &bad_time] {
        assert!(!chk.validate(schedule, bad).is_empty(), "accepted {bad}");
    }
}

// ------------------------------------------------------------------ live checks

fn json_body(v: Value) -> Option<Bytes> {
    Some(Bytes::from(v.to_string()))
}

/// A JSON object whose one field makes the body `n` bytes and more.
fn oversize(field: &str, n: usize) -> Option<Bytes> {
    json_body(json!({ field: "x".repeat(n) }))
}

/// A JSON body sent as text/plain gets 415; one over `cap` bytes gets 413.
async fn expect_body_refusals(
    run: &mut Run<'_>,
    c: &Client,
    method: &str,
    path: &str,
    valid: Value,
    pad_field: &str,
    cap: usize,
) -> anyhow::Result<()> {
    let r = c
        .call(method, path, json_body(valid), Some("text/plain"))
        .await?;
    run.expect(
        method,
        path,
        "text/plain",
        &r,
        415,
        Some("UNSUPPORTED_MEDIA_TYPE"),
    );
    let r = c
        .call(
            method,
            path,
            oversize(pad_field, cap),
            Some("application/json"),
        )
        .await?;
    run.expect(method, path, "oversize", &r, 413, Some("PAYLOAD_TOO_LARGE"));
    Ok(())
}

/// Records every checked answer and every mismatch.
struct Run<'a> {
    chk: Checker<'a>,
    failures: Vec<String>,
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl<'a> Run<'a> {
    fn op(&self, method: &str, path: &str) -> &'a Value {
        &self.chk.doc["paths"][path][method.to_ascii_lowercase()]
    }

    fn fail(&mut self, msg: String) {
        self.failures.push(msg);
    }

    /// Checks one answer of the documented operation `method path`: the status is
    /// `status` (and the error code `code`), the operation lists it, the content type
    /// is documented and the JSON body validates against the documented schema.
    fn expect(
        &mut self,
        method: &str,
        path: &str,
        what: &str,
        r: &Reply,
        status: u16,
        code: Option<&str>,
    ) {
        let ctx = format!("{method} {path} [{what}]");
        self.seen
            .entry((method.to_owned(), path.to_owned()))
            .or_default()
            .insert(r.status);
        let op = self.op(method, path);
        if op.is_null() {
            self.fail(format!("{ctx}: not a documented operation"));
            return;
        }
        if r.status != status {
            self.fail(format!(
                "{ctx}: status {}, expected {status}: {}",
                r.status,
                String::from_utf8_lossy(&r.raw)
            ));
        }
        if let Some(code) = code {
            if r.code() != code {
                self.fail(format!("{ctx}: error code {:?}, expected {code}", r.code()));
            }
        }
        let Some(resp) = op["responses"].get(r.status.to_string()) else {
            self.fail(format!(
                "{ctx}: status {} is not documented for this operation",
                r.status
            ));
            return;
        };
        let resp = self.chk.resolve(resp);
        self.check_content(&ctx, resp, r);
    }

    fn check_content(&mut self, ctx: &str, resp: &Value, r: &Reply) {
        let Some(content) = resp.get("content").and_then(Value::as_object) else {
            if !r.raw.is_empty() {
                self.fail(format!(
                    "{ctx}: documented without a body, got {} bytes",
                    r.raw.len()
                ));
            }
            return;
        };
        let ct = r
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = |s: &str| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        };
        let found = content
            .iter()
            .find(|(k, _)| k.as_str() == ct)
            .or_else(|| content.iter().find(|(k, _)| media(k) == media(ct)));
        let Some((key, media_obj)) = found else {
            let keys: Vec<&String> = content.keys().collect();
            self.fail(format!(
                "{ctx}: content type {ct:?} is not documented ({keys:?})"
            ));
            return;
        };
        if media(key) != "application/json" {
            return;
        }
        match serde_json::from_slice::<Value>(&r.raw) {
            Ok(body) => {
                for e in self.chk.validate(&media_obj["schema"], &body) {
                    self.fail(format!("{ctx}: {e}"));
                }
            }
            Err(e) => self.fail(format!("{ctx}: body is not JSON ({e})")),
        }
    }

    /// Checks a request body this test sends against the operation's documented
    /// request schema, so that what the agent accepts is what the document says.
    fn check_request(&mut self, method: &str, path: &str, what: &str, body: &Value) {
        let ctx = format!("{method} {path} [{what}] request");
        let op = self.op(method, path);
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        if schema.is_null() {
            self.fail(format!("{ctx}: no documented JSON request body"));
            return;
        }
        let mut body = body.clone();
        body["sessionId"] = json!(random_uuid());
        body["routerId"] = json!(random_uuid());
        for e in self.chk.validate(schema, &body) {
            self.fail(format!("{ctx}: {e}"));
        }
    }

    /// A documented path with its path parameters set to their documented examples,
    /// or to `overrides`.
    fn concrete_path(&self, path: &str, op: &Value, overrides: &[(&str, &str)]) -> String {
        let mut out = path.to_owned();
        for name in template_params(path) {
            let value = match overrides.iter().find(|(n, _)| *n == name) {
                Some((_, v)) => v.to_string(),
                None => {
                    let p = op["parameters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| self.chk.resolve(p))
                        .find(|p| p["in"] == "path" && p["name"] == name)
                        .unwrap_or_else(|| panic!("{path}: no parameter {name}"));
                    scalar(&p["example"])
                }
            };
            out = out.replace(&format!("{{{name}}}"), &value);
        }
        out
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn with_query(path: &str, query: &[(String, String)]) -> String {
    if query.is_empty() {
        return path.to_owned();
    }
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{path}?{}", q.join("&"))
}

/// One router operation, ready to call with any ids.
struct Target {
    method: String,
    path: String,
    /// Documented query parameters other than the ids, at their examples.
    query: Vec<(String, String)>,
    /// The documented request example, for POST/PUT.
    body: Option<Map<String, Value>>,
}

impl Target {
    fn new(run: &Run<'_>, method: &str, doc_path: &str, path_overrides: &[(&str, &str)]) -> Target {
        let op = run.op(method, doc_path);
        let query = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| run.chk.resolve(p))
            .filter(|p| p["in"] == "query" && p["name"] != "sessionId" && p["name"] != "routerId")
            .filter_map(|p| Some((p["name"].as_str()?.to_owned(), scalar(p.get("example")?))))
            .collect();
        let body = op["requestBody"]["content"]["application/json"]["example"]
            .as_object()
            .cloned();
        Target {
            method: method.to_owned(),
            path: run.concrete_path(doc_path, op, path_overrides),
            query,
            body,
        }
    }

    /// The body with these ids (or none), plus `extra` fields.
    fn body_bytes(&self, ids: Option<(&str, &str)>, extra: &[(&str, Value)]) -> Option<Bytes> {
        let mut b = self.body.clone()?;
        b.remove("sessionId");
        b.remove("routerId");
        if let Some((s, r)) = ids {
            b.insert("sessionId".into(), json!(s));
            b.insert("routerId".into(), json!(r));
        }
        for (k, v) in extra {
            b.insert((*k).into(), v.clone());
        }
        Some(Bytes::from(Value::Object(b).to_string()))
    }

    fn uri(&self, ids: Option<(&str, &str)>) -> String {
        let mut query = self.query.clone();
        if let (None, Some((s, r))) = (&self.body, ids) {
            query.push(("sessionId".into(), s.into()));
            query.push(("routerId".into(), r.into()));
        }
        with_query(&self.path, &query)
    }

    async fn call(&self, c: &Client, ids: Option<(&str, &str)>) -> anyhow::Result<Reply> {
        let body = self.body_bytes(ids, &[]);
        let ct = body.as_ref().map(|_| "application/json");
        c.call(&self.method, &self.uri(ids), body, ct).await
    }
}

/// `GET /agent/v1/connect` as an agent sends it: HTTP/1.1 (ALPN `http/1.1` only) with
/// the upgrade headers. The connection is dropped after the answer's head.
async fn connect_h1(relay: &Relay, router_id: &str, secret: Option<&str>) -> anyhow::Result<Reply> {
    let trust = netpilot_agent::link::tls::Trust::Fingerprint(relay.fingerprint.clone());
    let tls = netpilot_agent::link::tls::client_config(&trust)?;
    let tcp = tokio::net::TcpStream::connect(relay.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn.with_upgrades());
    let mut b = Request::get(CONNECT_PATH)
        .header("host", "localhost")
        .header("connection", "upgrade")
        .header("upgrade", UPGRADE_PROTOCOL)
        .header(HEADER_ROUTER_ID, router_id)
        .header(HEADER_AGENT_VERSION, "openapi-test");
    if let Some(s) = secret {
        b = b.header("authorization", format!("Bearer {s}"));
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::new()))?)
        .await?;
    let reply = Reply::read(resp).await;
    conn.abort();
    reply
}

fn signal(pid: Option<u32>, sig: &str) -> anyhow::Result<()> {
    let pid = pid.ok_or_else(|| anyhow::anyhow!("agent has exited"))?;
    let st = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(st.success(), "kill {sig} {pid} failed");
    Ok(())
}

fn random_uuid() -> String {
    session_id()
}

/// Waits until the agent's latest Wi-Fi change is no longer pending (the agent
/// refuses a second one meanwhile with 409 CHANGE_PENDING).
async fn wifi_settled(c: &Client, ids: Option<(&str, &str)>) -> anyhow::Result<()> {
    let (session, router) = ids.expect("ids of the online router");
    let path = format!("/api/wifi/status?sessionId={session}&routerId={router}");
    eventually(
        Duration::from_secs(20),
        "the Wi-Fi change to settle",
        || async {
            let r = c.get(&path).await.ok()?;
            (r.body["data"]["change"]["state"] != json!("pending")).then_some(())
        },
    )
    .await
}

/// Creates the group the documented `groupId` example names, with syncGroup's
/// documented example, so that an operation on `{groupId}` finds it: the calls before
/// (a delete, a reset, sync-all) may have removed it.
async fn sync_example_group(
    run: &mut Run<'_>,
    c: &Client,
    ids: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let (m, p) = ("POST", "/api/groups/sync");
    let r = Target::new(run, m, p, &[]).call(c, ids).await?;
    run.expect(m, p, "the example group", &r, 200, None);
    let want = &run.chk.pointer("#/components/parameters/GroupIdPath")["example"];
    if &r.body["data"]["group"]["id"] != want {
        run.fail(format!(
            "POST {p}: the documented example creates group {}, the documented groupId is {want}",
            r.body["data"]["group"]["id"]
        ));
    }
    Ok(())
}

/// A router operation called with these ids: in the query string for GET, merged
/// into the JSON body for PUT/POST.
async fn router_call(
    c: &Client,
    method: &str,
    path: &str,
    (session, router): (&str, &str),
    body: Option<Value>,
) -> anyhow::Result<Reply> {
    match body {
        None => {
            let uri = with_query(
                path,
                &[
                    ("sessionId".into(), session.into()),
                    ("routerId".into(), router.into()),
                ],
            );
            c.call(method, &uri, None, None).await
        }
        Some(mut b) => {
            b["sessionId"] = json!(session);
            b["routerId"] = json!(router);
            c.call(method, path, json_body(b), Some("application/json"))
                .await
        }
    }
}

/// The names of the categories in a `DnsCategoryList` answer.
fn category_names(r: &Reply) -> BTreeSet<String> {
    r.body["data"]["categories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

/// One category of a `DnsCategoryList` answer.
fn category_in<'r>(r: &'r Reply, name: &str) -> &'r Value {
    r.body["data"]["categories"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or(&Value::Null)
}

/// DNS filtering through the API: the categories (list, one, replaced by `domains`
/// and by `list`, refusals), and a group policy's `dns` as sent and read back.
async fn exercise_dns(run: &mut Run<'_>, c: &Client, ids: (&str, &str)) -> anyhow::Result<()> {
    let (get, put) = ("GET", "PUT");
    let (list_p, one_p) = ("/api/dns/categories", "/api/dns/categories/{category}");
    let one = |name: &str| format!("/api/dns/categories/{name}");

    let r = router_call(c, get, list_p, ids, None).await?;
    run.expect(get, list_p, "list", &r, 200, None);
    let names = category_names(&r);
    for want in ["social", "ads", "adult", "gaming", "gambling"] {
        if !names.contains(want) {
            run.fail(format!("GET {list_p}: no {want:?} category: {names:?}"));
        }
    }
    let gambling_description = category_in(&r, "gambling")["description"].clone();

    let r = router_call(c, get, &one("ads"), ids, None).await?;
    run.expect(get, one_p, "shipped category", &r, 200, None);
    let data = &r.body["data"];
    let listed = data["list"].as_array().map(Vec::len);
    if data["name"] != "ads"
        || listed.is_none()
        || data["domains"].as_u64() != listed.map(|n| n as u64)
    {
        run.fail(format!("GET {}: {}", one("ads"), r.body));
    }

    // Replaced by an array of names, normalised.
    let body = json!({"domains": ["Games.Example.", "roblox.com"], "description": "Games"});
    run.check_request(put, one_p, "domains", &body);
    let r = router_call(c, put, &one("gaming"), ids, Some(body)).await?;
    run.expect(put, one_p, "domains", &r, 200, None);
    let cat = &r.body["data"]["category"];
    if cat["domains"] != 2
        || cat["modified"] != true
        || cat["description"] != "Games"
        || !cat["updated_unix"].is_i64()
    {
        run.fail(format!("PUT {}: {}", one("gaming"), r.body));
    }
    let r = router_call(c, get, &one("gaming"), ids, None).await?;
    run.expect(get, one_p, "replaced category", &r, 200, None);
    if r.body["data"]["list"] != json!(["games.example", "roblox.com"]) {
        run.fail(format!("GET {}: {}", one("gaming"), r.body));
    }

    // Replaced by text; comments and blank lines skipped, the description kept.
    let body = json!({"list": "# a test list\n\nbet.example\nwww.casino.example\n"});
    run.check_request(put, one_p, "list", &body);
    let r = router_call(c, put, &one("gambling"), ids, Some(body)).await?;
    run.expect(put, one_p, "list", &r, 200, None);
    let cat = &r.body["data"]["category"];
    if cat["domains"] != 2 || cat["description"] != gambling_description {
        run.fail(format!("PUT {}: {}", one("gambling"), r.body));
    }

    // Refusals: nothing changes.
    let r = router_call(
        c,
        put,
        &one("gaming"),
        ids,
        Some(json!({"domains": ["ok.example", "bad domain.example"]})),
    )
    .await?;
    run.expect(put, one_p, "bad domain", &r, 400, Some("INVALID_DOMAIN"));
    let r = router_call(
        c,
        put,
        &one("gaming"),
        ids,
        Some(json!({"list": "ok.example\nbad domain.example\n"})),
    )
    .await?;
    run.expect(put, one_p, "bad line", &r, 400, Some("INVALID_DOMAIN"));
    if !r.body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("line 2")
    {
        run.fail(format!(
            "PUT {}: the bad line is not named: {}",
            one("gaming"),
            r.body
        ));
    }
    let r = router_call(
        c,
        put,
        &one("gaming"),
        ids,
        Some(json!({"domains": ["a.example"], "list": "b.example"})),
    )
    .await?;
    run.expect(
        put,
        one_p,
        "domains and list",
        &r,
        400,
        Some("INVALID_PARAMETER"),
    );
    let r = router_call(c, get, &one("gaming"), ids, None).await?;
    if r.body["data"]["list"] != json!(["games.example", "roblox.com"]) {
        run.fail(format!(
            "GET {}: changed by a refused upload: {}",
            one("gaming"),
            r.body
        ));
    }
    let r = router_call(c, get, &one("nosuch"), ids, None).await?;
    run.expect(
        get,
        one_p,
        "unknown category",
        &r,
        400,
        Some("UNKNOWN_CATEGORY"),
    );
    let r = router_call(c, get, &one("no%20such"), ids, None).await?;
    run.expect(
        get,
        one_p,
        "malformed name",
        &r,
        400,
        Some("INVALID_CATEGORY"),
    );

    // A group policy's dns: sent in camelCase, stored normalised, shown in snake_case.
    sync_example_group(run, c, Some(ids)).await?;
    let policy_p = "/api/groups/{groupId}/policy";
    let group = scalar(&run.chk.pointer("#/components/parameters/GroupIdPath")["example"]);
    let set_policy = format!("/api/groups/{group}/policy");
    let body = json!({"policy": {"dns": {"categories": ["Gaming", "social"],
        "blockDomains": ["Blocked.Example."], "allowDomains": ["ok.blocked.example"], "blockQuic": true}}});
    run.check_request(put, policy_p, "dns", &body);
    let r = router_call(c, put, &set_policy, ids, Some(body)).await?;
    run.expect(put, policy_p, "dns", &r, 200, None);
    let want = json!({"categories": ["gaming", "social"], "block_domains": ["blocked.example"],
        "allow_domains": ["ok.blocked.example"], "block_quic": true, "filtering": true});
    if r.body["data"]["group"]["policy"]["dns"] != want {
        run.fail(format!(
            "PUT {set_policy}: dns {}, want {want}",
            r.body["data"]["group"]["policy"]["dns"]
        ));
    }
    let r = router_call(c, get, &format!("/api/groups/{group}"), ids, None).await?;
    run.expect(get, "/api/groups/{groupId}", "dns", &r, 200, None);
    if r.body["data"]["policy"]["dns"] != want {
        run.fail(format!(
            "GET /api/groups/{group}: dns not as stored: {}",
            r.body
        ));
    }
    let r = router_call(c, get, list_p, ids, None).await?;
    run.expect(get, list_p, "used by a group", &r, 200, None);
    let used_by = &category_in(&r, "gaming")["used_by"];
    if !used_by
        .as_array()
        .is_some_and(|g| g.iter().any(|g| scalar(g) == group))
    {
        run.fail(format!(
            "GET {list_p}: gaming used_by {used_by}, want group {group}"
        ));
    }
    let r = router_call(c, get, "/api/infrastructure/status", ids, None).await?;
    run.expect(get, "/api/infrastructure/status", "dns", &r, 200, None);
    if r.body["data"]["status"]["dns_resolvers"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        run.fail(format!(
            "GET /api/infrastructure/status: no filtering resolver: {}",
            r.body
        ));
    }
    // Replacing a category a group uses re-applies it.
    let r = router_call(
        c,
        put,
        &one("gaming"),
        ids,
        Some(json!({"domains": ["roblox.com"]})),
    )
    .await?;
    run.expect(put, one_p, "used category", &r, 200, None);
    let data = &r.body["data"];
    if data["apply"]["changed"] != true
        || !data["category"]["used_by"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| scalar(g) == group))
    {
        run.fail(format!("PUT {}: {}", one("gaming"), r.body));
    }

    // Delete: an added category goes once no group blocks it; a shipped one is put
    // back to its shipped list.
    let del = "DELETE";
    let r = router_call(
        c,
        put,
        &one("school"),
        ids,
        Some(json!({"domains": ["homework-answers.example"], "description": "Cheating"})),
    )
    .await?;
    run.expect(put, one_p, "new category", &r, 200, None);
    let body = json!({"policy": {"dns": {"categories": ["school"]}}});
    let r = router_call(c, put, &set_policy, ids, Some(body)).await?;
    run.expect(put, policy_p, "dns new category", &r, 200, None);
    let r = router_call(c, del, &one("school"), ids, None).await?;
    run.expect(del, one_p, "in use", &r, 409, Some("CATEGORY_IN_USE"));
    let body = json!({"policy": {"dns": {"categories": ["gaming"]}}});
    let r = router_call(c, put, &set_policy, ids, Some(body)).await?;
    run.expect(put, policy_p, "dns without it", &r, 200, None);
    let r = router_call(c, del, &one("school"), ids, None).await?;
    run.expect(del, one_p, "added category", &r, 200, None);
    if r.body["data"]["restored"] != false || r.body["data"]["apply"]["changed"] != true {
        run.fail(format!("DELETE {}: {}", one("school"), r.body));
    }
    let r = router_call(c, get, &one("school"), ids, None).await?;
    run.expect(get, one_p, "deleted", &r, 400, Some("UNKNOWN_CATEGORY"));
    let r = router_call(c, del, &one("gaming"), ids, None).await?;
    run.expect(del, one_p, "shipped category", &r, 200, None);
    if r.body["data"]["restored"] != true {
        run.fail(format!("DELETE {}: {}", one("gaming"), r.body));
    }
    let r = router_call(c, get, &one("gaming"), ids, None).await?;
    if r.body["data"]["modified"] != false
        || r.body["data"]["list"].as_array().map_or(0, Vec::len) < 30
    {
        run.fail(format!(
            "GET {}: not the shipped list: {}",
            one("gaming"),
            r.body
        ));
    }
    let r = router_call(c, del, &one("nosuch"), ids, None).await?;
    run.expect(del, one_p, "unknown", &r, 400, Some("UNKNOWN_CATEGORY"));

    // snake_case accepted; both spellings, unknown categories and bad domains refused.
    let body = json!({"policy": {"dns": {"block_domains": ["a.example"], "block_quic": false}}});
    run.check_request(put, policy_p, "dns snake_case", &body);
    let r = router_call(c, put, &set_policy, ids, Some(body)).await?;
    run.expect(put, policy_p, "dns snake_case", &r, 200, None);
    let dns = &r.body["data"]["group"]["policy"]["dns"];
    if dns["block_domains"] != json!(["a.example"])
        || dns["categories"] != json!([])
        || dns["filtering"] != true
    {
        run.fail(format!("PUT {set_policy}: snake_case dns {dns}"));
    }
    for (what, dns, code) in [
        (
            "both spellings",
            json!({"blockDomains": ["a.example"], "block_domains": ["b.example"]}),
            "INVALID_POLICY",
        ),
        (
            "unknown category",
            json!({"categories": ["nosuch"]}),
            "UNKNOWN_CATEGORY",
        ),
        (
            "bad domain",
            json!({"allowDomains": ["bad domain.example"]}),
            "INVALID_DOMAIN",
        ),
    ] {
        let r = router_call(
            c,
            put,
            &set_policy,
            ids,
            Some(json!({"policy": {"dns": dns}})),
        )
        .await?;
        run.expect(put, policy_p, what, &r, 400, Some(code));
    }
    let r = router_call(
        c,
        put,
        &set_policy,
        ids,
        Some(json!({"policy": {"dns": null}})),
    )
    .await?;
    run.expect(put, policy_p, "no dns", &r, 200, None);
    if !r.body["data"]["group"]["policy"]["dns"].is_null() {
        run.fail(format!(
            "PUT {set_policy}: dns null is not shown as null: {}",
            r.body
        ));
    }
    Ok(())
}

/// The ids of a router call.
fn ids<'x>(session: &'x str, router: &'x str) -> Option<(&'x str, &'x str)> {
    Some((session, router))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_as_documented() -> anyhow::Result<()> {
    let doc = doc();
    let mut run = Run {
        chk: Checker { doc: &doc },
        failures: Vec::new(),
        seen: BTreeMap::new(),
    };
    let config = format!(
        "[timeouts]\ncommand = \"{COMMAND_TIMEOUT}\"\nprobe_after = \"{PROBE_AFTER}\"\n[enrollment]\nper_minute = {ENROLL_PER_MINUTE}\n[limits]\nmax_body_bytes = {MAX_BODY_BYTES}\n"
    );
    let relay = Relay::start(RelayOptions { config }).await?;
    let c = relay.client().await?;
    let anon = c.with_key(None);

    // ---- relay endpoints
    let r = anon.get("/health").await?;
    run.expect("GET", "/health", "no key", &r, 200, None);
    let r = anon.get("/metrics").await?;
    run.expect("GET", "/metrics", "no key", &r, 401, Some("UNAUTHORIZED"));
    let r = c.get("/metrics").await?;
    run.expect("GET", "/metrics", "key", &r, 200, None);
    if !String::from_utf8_lossy(&r.raw).contains("netpilot_connected_agents ") {
        run.fail("GET /metrics: no netpilot_connected_agents gauge".into());
    }

    // ---- admin
    let (p, post, get) = ("/api/admin/routers", "POST", "GET");
    let r = c
        .post(p, json!({"ownerUserId": "alice", "name": "offline router"}))
        .await?;
    run.expect(post, p, "create", &r, 201, None);
    let offline = r.body["data"]["router_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let r = c.post(p, json!({"ownerUserId": "alice"})).await?;
    run.expect(post, p, "no name", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon
        .post(p, json!({"ownerUserId": "alice", "name": "x"}))
        .await?;
    run.expect(post, p, "no key", &r, 401, Some("UNAUTHORIZED"));
    expect_body_refusals(
        &mut run,
        &c,
        post,
        p,
        json!({"ownerUserId": "a", "name": "x"}),
        "name",
        MAX_BODY_BYTES,
    )
    .await?;
    let r = c.get(p).await?;
    run.expect(get, p, "list", &r, 200, None);
    let r = c.get(&format!("{p}?ownerUserId=alice")).await?;
    run.expect(get, p, "list by owner", &r, 200, None);
    if r.body["data"]["total"] != json!(1) {
        run.fail(format!(
            "GET {p}?ownerUserId=alice: expected 1 router: {}",
            r.body
        ));
    }
    let r = c.get(&format!("{p}?ownerUserId=")).await?;
    run.expect(get, p, "empty owner", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon.get(p).await?;
    run.expect(get, p, "no key", &r, 401, Some("UNAUTHORIZED"));

    let p = "/api/admin/routers/{routerId}";
    let r = c.get(&format!("/api/admin/routers/{offline}")).await?;
    run.expect(get, p, "existing", &r, 200, None);
    let r = c
        .get(&format!("/api/admin/routers/{}", random_uuid()))
        .await?;
    run.expect(get, p, "unknown", &r, 404, Some("ROUTER_NOT_FOUND"));
    let r = c.get("/api/admin/routers/not-a-uuid").await?;
    run.expect(get, p, "bad id", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon.get(&format!("/api/admin/routers/{offline}")).await?;
    run.expect(get, p, "no key", &r, 401, Some("UNAUTHORIZED"));

    let p = "/api/admin/routers/{routerId}/token";
    let r = c
        .call(
            post,
            &format!("/api/admin/routers/{offline}/token"),
            None,
            None,
        )
        .await?;
    run.expect(post, p, "existing", &r, 201, None);
    let r = c
        .call(
            post,
            &format!("/api/admin/routers/{}/token", random_uuid()),
            None,
            None,
        )
        .await?;
    run.expect(post, p, "unknown", &r, 404, Some("ROUTER_NOT_FOUND"));
    let r = c
        .call(post, "/api/admin/routers/nope/token", None, None)
        .await?;
    run.expect(post, p, "bad id", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon
        .call(
            post,
            &format!("/api/admin/routers/{offline}/token"),
            None,
            None,
        )
        .await?;
    run.expect(post, p, "no key", &r, 401, Some("UNAUTHORIZED"));

    // ---- enrollment and the link, with a router enrolled by hand
    let (probe, token) = relay.create_router("carol", "link probe").await?;
    let e = ENROLL_PATH;
    let r = anon.post(e, json!({})).await?;
    run.expect(post, e, "no token", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon.post(e, json!({"token": "not-hex"})).await?;
    run.expect(post, e, "malformed token", &r, 401, Some("TOKEN_INVALID"));
    expect_body_refusals(
        &mut run,
        &anon,
        post,
        e,
        json!({"token": token}),
        "token",
        ENROLL_MAX_BODY_BYTES,
    )
    .await?;
    let r = anon
        .post(e, json!({"token": token, "hostname": "openapi-test"}))
        .await?;
    run.expect(post, e, "valid token", &r, 200, None);
    let secret = r.body["data"]["router_secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let r = anon.post(e, json!({"token": token})).await?;
    run.expect(post, e, "token again", &r, 401, Some("TOKEN_USED"));

    let k = CONNECT_PATH;
    let r = anon.get(k).await?;
    run.expect(get, k, "over HTTP/2", &r, 400, Some("INVALID_PARAMETER"));
    let r = connect_h1(&relay, &probe, None).await?;
    run.expect(get, k, "no secret", &r, 401, Some("UNAUTHORIZED"));
    let r = connect_h1(&relay, &probe, Some(&"0".repeat(64))).await?;
    run.expect(get, k, "wrong secret", &r, 401, Some("UNAUTHORIZED"));
    let r = connect_h1(&relay, &probe, Some(&secret)).await?;
    run.expect(get, k, "right secret", &r, 101, None);
    if r.headers.get("upgrade").and_then(|v| v.to_str().ok()) != Some(UPGRADE_PROTOCOL) {
        run.fail(format!(
            "GET {k}: 101 without `Upgrade: {UPGRADE_PROTOCOL}`"
        ));
    }

    // ---- the other agent-facing endpoints, with the router secret
    let as_router = anon.with_key(Some(&secret));
    let router_hdr = [(HEADER_ROUTER_ID, probe.as_str())];
    let wrong = anon.with_key(Some("0000"));
    let event =
        json!({"kind": "wifi_change", "id": "c1", "state": "confirmed", "at": 1_796_155_844u64});
    let r = as_router
        .call_with(
            post,
            REPORT_PATH,
            json_body(event.clone()),
            Some("application/json"),
            &router_hdr,
        )
        .await?;
    run.expect(post, REPORT_PATH, "report", &r, 200, None);
    let r = wrong
        .call_with(
            post,
            REPORT_PATH,
            json_body(event.clone()),
            Some("application/json"),
            &router_hdr,
        )
        .await?;
    run.expect(
        post,
        REPORT_PATH,
        "wrong secret",
        &r,
        401,
        Some("UNAUTHORIZED"),
    );
    let r = as_router
        .call_with(
            post,
            REPORT_PATH,
            json_body(json!({"kind": 1})),
            Some("application/json"),
            &router_hdr,
        )
        .await?;
    run.expect(
        post,
        REPORT_PATH,
        "not a report",
        &r,
        400,
        Some("INVALID_PARAMETER"),
    );
    let r = as_router
        .call_with(get, SPEEDTEST_PING_PATH, None, None, &router_hdr)
        .await?;
    run.expect(get, SPEEDTEST_PING_PATH, "ping", &r, 200, None);
    let r = wrong
        .call_with(get, SPEEDTEST_PING_PATH, None, None, &router_hdr)
        .await?;
    run.expect(
        get,
        SPEEDTEST_PING_PATH,
        "wrong secret",
        &r,
        401,
        Some("UNAUTHORIZED"),
    );
    let down = format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=65536");
    let r = as_router
        .call_with(get, &down, None, None, &router_hdr)
        .await?;
    run.expect(get, SPEEDTEST_DOWNLOAD_PATH, "download", &r, 200, None);
    if r.raw.len() != 65_536 {
        run.fail(format!("GET {down}: {} bytes, want 65536", r.raw.len()));
    }
    let r = as_router
        .call_with(get, SPEEDTEST_DOWNLOAD_PATH, None, None, &router_hdr)
        .await?;
    run.expect(
        get,
        SPEEDTEST_DOWNLOAD_PATH,
        "no bytes",
        &r,
        400,
        Some("INVALID_PARAMETER"),
    );
    let r = as_router
        .call_with(
            post,
            SPEEDTEST_UPLOAD_PATH,
            Some(Bytes::from(vec![7u8; 100_000])),
            Some("application/octet-stream"),
            &router_hdr,
        )
        .await?;
    run.expect(post, SPEEDTEST_UPLOAD_PATH, "upload", &r, 200, None);
    if r.body["data"]["bytes"] != json!(100_000) {
        run.fail(format!("POST {SPEEDTEST_UPLOAD_PATH}: {}", r.body));
    }

    let (d, p) = ("DELETE", "/api/admin/routers/{routerId}");
    let r = c.delete(&format!("/api/admin/routers/{probe}")).await?;
    run.expect(d, p, "revoke", &r, 200, None);
    let r = c.delete(&format!("/api/admin/routers/{probe}")).await?;
    run.expect(d, p, "revoke again", &r, 200, None);
    let r = c
        .delete(&format!("/api/admin/routers/{}", random_uuid()))
        .await?;
    run.expect(d, p, "unknown", &r, 404, Some("ROUTER_NOT_FOUND"));
    let r = c.delete("/api/admin/routers/nope").await?;
    run.expect(d, p, "bad id", &r, 400, Some("INVALID_PARAMETER"));
    let r = anon.delete(&format!("/api/admin/routers/{probe}")).await?;
    run.expect(d, p, "no key", &r, 401, Some("UNAUTHORIZED"));
    let r = connect_h1(&relay, &probe, Some(&secret)).await?;
    run.expect(get, k, "revoked", &r, 403, Some("ROUTER_REVOKED"));
    for (m, p) in [
        (post, REPORT_PATH),
        (get, SPEEDTEST_PING_PATH),
        (get, SPEEDTEST_DOWNLOAD_PATH),
        (post, SPEEDTEST_UPLOAD_PATH),
    ] {
        let r = as_router.call_with(m, p, None, None, &router_hdr).await?;
        run.expect(m, p, "revoked", &r, 403, Some("ROUTER_REVOKED"));
    }
    let r = c
        .call(
            post,
            &format!("/api/admin/routers/{probe}/token"),
            None,
            None,
        )
        .await?;
    run.expect(
        post,
        "/api/admin/routers/{routerId}/token",
        "revoked",
        &r,
        403,
        Some("ROUTER_REVOKED"),
    );

    // ---- a real agent on a simulated router
    let enrolled = relay.enrolled_router("alice").await?;
    // Wi-Fi changes confirm at once (no settle delay) so each documented call finds
    // the previous one settled rather than answering 409 CHANGE_PENDING.
    let mut agent = Agent::start(&enrolled, &["--simulate", "--wifi-settle", "0s"]).await?;
    let online = enrolled.router_id.clone();
    relay
        .wait_online(&online, true, Duration::from_secs(30))
        .await?;
    let r = c.get(&format!("/api/admin/routers/{online}")).await?;
    run.expect(
        get,
        "/api/admin/routers/{routerId}",
        "online",
        &r,
        200,
        None,
    );

    // ---- sessions
    let p = "/api/session/start";
    let alice = random_uuid();
    let bob = random_uuid();
    let r = c
        .post(
            p,
            json!({"sessionId": alice, "userId": "alice", "routerId": online}),
        )
        .await?;
    run.expect(post, p, "online router", &r, 200, None);
    if r.body["data"]["router_reachable"] != json!(true) {
        run.fail(format!("POST {p}: online router not reachable: {}", r.body));
    }
    let r = c
        .post(
            p,
            json!({"sessionId": alice, "userId": "alice", "routerId": offline}),
        )
        .await?;
    run.expect(post, p, "offline router", &r, 200, None);
    if r.body["data"]["router_reachable"] != json!(false) {
        run.fail(format!("POST {p}: offline router reachable: {}", r.body));
    }
    let r = c
        .post(p, json!({"sessionId": bob, "userId": "bob"}))
        .await?;
    run.expect(post, p, "no router", &r, 200, None);
    let r = c.post(p, json!({"userId": "alice"})).await?;
    run.expect(post, p, "no sessionId", &r, 400, Some("INVALID_PARAMETER"));
    let r = c
        .post(p, json!({"sessionId": bob, "userId": "alice"}))
        .await?;
    run.expect(
        post,
        p,
        "another user's session",
        &r,
        403,
        Some("FORBIDDEN"),
    );
    let r = c
        .post(
            p,
            json!({"sessionId": random_uuid(), "userId": "bob", "routerId": online}),
        )
        .await?;
    run.expect(post, p, "another user's router", &r, 403, Some("FORBIDDEN"));
    let r = c
        .post(
            p,
            json!({"sessionId": random_uuid(), "userId": "alice", "routerId": random_uuid()}),
        )
        .await?;
    run.expect(post, p, "unknown router", &r, 404, Some("ROUTER_NOT_FOUND"));
    let r = anon
        .post(p, json!({"sessionId": random_uuid(), "userId": "alice"}))
        .await?;
    run.expect(post, p, "no key", &r, 401, Some("UNAUTHORIZED"));
    expect_body_refusals(
        &mut run,
        &c,
        post,
        p,
        json!({"sessionId": random_uuid(), "userId": "a"}),
        "userId",
        MAX_BODY_BYTES,
    )
    .await?;

    let p = "/api/session/status";
    let r = c.get(&format!("{p}?sessionId={alice}")).await?;
    run.expect(get, p, "live session", &r, 200, None);
    let attached = r.body["data"]["routers"].as_array().map(Vec::len);
    if attached != Some(2) {
        run.fail(format!("GET {p}: expected 2 attached routers: {}", r.body));
    }
    let r = c.get(p).await?;
    run.expect(get, p, "no sessionId", &r, 400, Some("INVALID_PARAMETER"));
    let r = c.get(&format!("{p}?sessionId={}", random_uuid())).await?;
    run.expect(get, p, "unknown session", &r, 401, Some("SESSION_INVALID"));
    let r = anon.get(&format!("{p}?sessionId={alice}")).await?;
    run.expect(get, p, "no key", &r, 401, Some("UNAUTHORIZED"));

    for p in ["/api/session/refresh", "/api/session/end"] {
        let r = c.post(p, json!({})).await?;
        run.expect(post, p, "no sessionId", &r, 400, Some("INVALID_PARAMETER"));
        let r = c.post(p, json!({"sessionId": random_uuid()})).await?;
        run.expect(post, p, "unknown session", &r, 401, Some("SESSION_INVALID"));
        let r = anon.post(p, json!({"sessionId": alice})).await?;
        run.expect(post, p, "no key", &r, 401, Some("UNAUTHORIZED"));
        expect_body_refusals(
            &mut run,
            &c,
            post,
            p,
            json!({"sessionId": alice}),
            "sessionId",
            MAX_BODY_BYTES,
        )
        .await?;
    }
    let r = c
        .post("/api/session/refresh", json!({"sessionId": alice}))
        .await?;
    run.expect(post, "/api/session/refresh", "live session", &r, 200, None);
    let p = "/api/session/end";
    let short_lived = random_uuid();
    c.post(
        "/api/session/start",
        json!({"sessionId": short_lived, "userId": "alice", "routerId": offline}),
    )
    .await?;
    let r = c
        .post(p, json!({"sessionId": short_lived, "routerId": offline}))
        .await?;
    run.expect(post, p, "detach a router", &r, 200, None);
    let r = c.post(p, json!({"sessionId": short_lived})).await?;
    run.expect(post, p, "whole session", &r, 200, None);
    if r.body["data"]["message"] != json!("Session ended") {
        run.fail(format!("POST {p}: {}", r.body));
    }
    let r = c.post(p, json!({"sessionId": short_lived})).await?;
    run.expect(post, p, "ended session", &r, 401, Some("SESSION_INVALID"));

    // ---- every router operation: each relay check in turn, then the agent's answer
    let router_ops: Vec<(String, String)> = doc_operations(&doc)
        .into_iter()
        .filter(|(m, p)| !RELAY_ONLY.contains(&(m.as_str(), p.as_str())))
        .collect();
    for (m, p) in &router_ops {
        let t = Target::new(&run, m, p, &[]);
        let implemented = run.op(m, p).get(NOT_IMPLEMENTED_EXT) != Some(&Value::Bool(false));
        let r = t.call(&c, None).await?;
        run.expect(m, p, "no ids", &r, 400, Some("INVALID_PARAMETER"));
        let r = t.call(&anon, ids(&alice, &online)).await?;
        run.expect(m, p, "no key", &r, 401, Some("UNAUTHORIZED"));
        let r = t.call(&c, ids(&random_uuid(), &online)).await?;
        run.expect(m, p, "unknown session", &r, 401, Some("SESSION_INVALID"));
        let r = t.call(&c, ids(&bob, &online)).await?;
        run.expect(m, p, "another user's router", &r, 403, Some("FORBIDDEN"));
        let r = t.call(&c, ids(&alice, &random_uuid())).await?;
        run.expect(m, p, "unknown router", &r, 404, Some("ROUTER_NOT_FOUND"));
        let r = t.call(&c, ids(&alice, &offline)).await?;
        run.expect(m, p, "offline router", &r, 503, Some("ROUTER_OFFLINE"));
        if implemented && template_params(p).contains(&"groupId") {
            sync_example_group(&mut run, &c, ids(&alice, &online)).await?;
        }
        if m == "POST" && p.starts_with("/api/wifi/") {
            wifi_settled(&c, ids(&alice, &online)).await?;
        }
        let r = t.call(&c, ids(&alice, &online)).await?;
        if implemented {
            run.expect(m, p, "agent", &r, 200, None);
        } else {
            run.expect(m, p, "agent", &r, 501, Some("NOT_IMPLEMENTED"));
        }
        if t.body.is_some() {
            let good = ids(&alice, &online);
            let r = c
                .call(m, &t.uri(good), t.body_bytes(good, &[]), Some("text/plain"))
                .await?;
            run.expect(m, p, "text/plain", &r, 415, Some("UNSUPPORTED_MEDIA_TYPE"));
            let pad = [("padding", json!("x".repeat(MAX_BODY_BYTES)))];
            let r = c
                .call(
                    m,
                    &t.uri(good),
                    t.body_bytes(good, &pad),
                    Some("application/json"),
                )
                .await?;
            run.expect(m, p, "oversize", &r, 413, Some("PAYLOAD_TOO_LARGE"));
        }
        if template_params(p).contains(&"groupId") {
            let bad = Target::new(&run, m, p, &[("groupId", "abc")]);
            let r = bad.call(&c, ids(&alice, &online)).await?;
            run.expect(
                m,
                p,
                "group id not a number",
                &r,
                400,
                Some("INVALID_PARAMETER"),
            );
        }
    }

    // ---- DNS filtering: categories and a group's DNS policy, beyond the examples
    exercise_dns(&mut run, &c, (alice.as_str(), online.as_str())).await?;

    // ---- 408: a stopped agent keeps its link but cannot answer
    let health = Target::new(&run, "GET", "/api/agent/health", &[]);
    let uri = health.uri(ids(&alice, &online));
    signal(agent.pid(), "-STOP")?;
    let r = c.get(&uri).await;
    signal(agent.pid(), "-CONT")?;
    run.expect(
        "GET",
        "/api/agent/health",
        "stopped agent",
        &r?,
        408,
        Some("COMMAND_TIMEOUT"),
    );
    let (cr, ur) = (&c, &uri);
    eventually(
        Duration::from_secs(30),
        "the agent to answer again",
        move || async move { cr.get(ur).await.ok().filter(|r| r.status == 200) },
    )
    .await?;

    // ---- 405 on every documented path, with the documented methods in `Allow`
    let not_allowed = run
        .chk
        .resolve(&doc["components"]["responses"]["MethodNotAllowed"]);
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let methods: BTreeSet<String> = item
            .as_object()
            .expect("path item")
            .keys()
            .filter(|k| HTTP_METHODS.contains(&k.as_str()))
            .map(|k| k.to_ascii_uppercase())
            .collect();
        let any_op = &item[methods.first().expect("a method").to_ascii_lowercase()];
        let r = c
            .call("PATCH", &run.concrete_path(path, any_op, &[]), None, None)
            .await?;
        let ctx = format!("PATCH {path}");
        if r.status != 405 {
            run.fail(format!("{ctx}: status {}, expected 405", r.status));
            continue;
        }
        let allow: BTreeSet<String> = r
            .headers
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        if allow != methods {
            run.fail(format!("{ctx}: Allow {allow:?}, documented {methods:?}"));
        }
        run.check_content(&ctx, not_allowed, &r);
    }

    // ---- unknown paths: 404 NOT_FOUND (behind the API key under /api/)
    let generic_error = run.chk.pointer("#/components/schemas/ErrorEnvelope");
    for (client, path) in [(&c, "/api/no-such-route"), (&anon, "/no-such-page")] {
        let r = client.get(path).await?;
        if r.status != 404 || r.code() != "NOT_FOUND" {
            run.fail(format!("GET {path}: {} {}", r.status, r.body));
        }
        for e in run.chk.validate(generic_error, &r.body) {
            run.fail(format!("GET {path}: {e}"));
        }
    }
    let r = anon.get("/api/no-such-route").await?;
    if r.status != 401 {
        run.fail(format!(
            "GET /api/no-such-route without a key: {} {}",
            r.status, r.body
        ));
    }

    // ---- 429: last, it uses up this address's enrollment attempts
    let mut limited = false;
    for _ in 0..=ENROLL_PER_MINUTE {
        let r = anon
            .post(ENROLL_PATH, json!({"token": "0".repeat(64)}))
            .await?;
        if r.status == 429 {
            run.expect(
                post,
                ENROLL_PATH,
                "rate limit",
                &r,
                429,
                Some("RATE_LIMITED"),
            );
            limited = true;
            break;
        }
        run.expect(
            post,
            ENROLL_PATH,
            "unknown token",
            &r,
            401,
            Some("TOKEN_INVALID"),
        );
    }
    if !limited {
        run.fail(format!(
            "POST {ENROLL_PATH}: no 429 after {} attempts",
            ENROLL_PER_MINUTE + 1
        ));
    }
    agent.kill().await;

    // ---- report
    println!("operation -> statuses seen (documented)");
    for ((m, p), seen) in &run.seen {
        let documented: Vec<&String> = run.op(m, p)["responses"]
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        println!("  {m:6} {p:42} {seen:?} ({documented:?})");
    }
    let called: BTreeSet<(String, String)> = run.seen.keys().cloned().collect();
    let never: Vec<_> = doc_operations(&doc).difference(&called).cloned().collect();
    if !never.is_empty() {
        run.fail(format!("documented operations never called: {never:?}"));
    }
    assert!(
        run.failures.is_empty(),
        "{} mismatches between the server and docs/openapi.json:\n  {}",
        run.failures.len(),
        run.failures.join("\n  ")
    );
    Ok(())
}
