//! The categories a group's DNS policy can block: the lists the agent ships,
//! parsed once, and those added or replaced through the API, as values of the
//! desired state. Their text format is `dns::list`'s; the shipped texts are
//! `dns::categories`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::model::Category;
use crate::dns::categories;
use crate::dns::domain::Domain;

pub fn digest_domains(domains: &[Domain]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for d in domains {
        ctx.update(d.as_str().as_bytes());
        ctx.update(b"\n");
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A category named `name`; it is `builtin` when the agent ships one of that name.
pub fn category(
    name: &str,
    description: &str,
    domains: Vec<Domain>,
    updated_unix: Option<i64>,
) -> Category {
    Category {
        name: name.to_owned(),
        description: description.to_owned(),
        digest: digest_domains(&domains),
        domains: Arc::new(domains),
        builtin: categories::builtin(name).is_some(),
        updated_unix,
    }
}

/// The lists the agent ships, parsed once.
pub fn builtin_categories() -> BTreeMap<String, Arc<Category>> {
    static PARSED: std::sync::OnceLock<BTreeMap<String, Arc<Category>>> =
        std::sync::OnceLock::new();
    PARSED.get_or_init(parse_builtin).clone()
}

fn parse_builtin() -> BTreeMap<String, Arc<Category>> {
    categories::BUILTIN
        .iter()
        .map(|b| {
            let parsed = crate::dns::list::parse_text(b.text);
            debug_assert_eq!(parsed.error_count, 0, "shipped list {} parses", b.name);
            (
                b.name.to_owned(),
                Arc::new(category(b.name, b.description, parsed.domains, None)),
            )
        })
        .collect()
}
