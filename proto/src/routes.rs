//! The router operations the relay forwards (DESIGN §4), as one table both sides use:
//! the relay to validate and label calls before forwarding, the agent to dispatch.
//! A path segment written `{name}` is a parameter; `{id}` must be a group id.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// Whether the web app sends this call's ids (and arguments) in a JSON body rather
    /// than in the query string.
    pub fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    /// Path pattern, also the metrics label: `/api/groups/{id}`.
    pub pattern: &'static str,
}

macro_rules! routes {
    ($($m:ident $p:literal),* $(,)?) => { &[ $( Route { method: Method::$m, pattern: $p } ),* ] };
}

/// Every router operation the relay accepts and the agent serves.
pub const ROUTES: &[Route] = routes![
    Get "/api/agent/health",
    Get "/api/scan/router",
    Get "/api/scan",
    Get "/api/speedtest",
    Get "/api/blocked",
    Post "/api/block",
    Post "/api/unblock",
    Post "/api/reset",
    Get "/api/wifi/status",
    Post "/api/wifi/enable",
    Post "/api/wifi/disable",
    Post "/api/wifi/password",
    Post "/api/wifi/ssid",
    Get "/api/whitelist",
    Post "/api/whitelist/add",
    Post "/api/whitelist/remove",
    Get "/api/blacklist",
    Post "/api/blacklist/add",
    Post "/api/blacklist/remove",
    Get "/api/groups",
    Get "/api/groups/{id}",
    Post "/api/groups/sync",
    Post "/api/groups/sync-all",
    Put "/api/groups/{id}/policy",
    Delete "/api/groups/{id}",
    Get "/api/infrastructure/status",
    Get "/api/device-usage/current",
    Get "/api/device-usage/device/{mac}",
    Get "/api/device-usage/history",
    Get "/api/device-usage/summary",
    Get "/api/device-usage/status",
    Post "/api/device-usage/reset",
    Get "/api/dns/categories",
    Get "/api/dns/categories/{name}",
    Put "/api/dns/categories/{name}",
    Delete "/api/dns/categories/{name}",
];

#[derive(Debug, PartialEq, Eq)]
pub struct RouteMatch {
    pub route: &'static Route,
    /// Path parameters in pattern order, percent-decoding left to the handler.
    pub params: Vec<(&'static str, String)>,
}

impl RouteMatch {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No pattern has this path.
    NotFound,
    /// The path exists with other methods.
    MethodNotAllowed(Vec<Method>),
    /// The path matched but a parameter is malformed.
    InvalidParam { name: &'static str, reason: String },
}

/// Finds the route for a method and a path (without query string). A literal
/// segment beats a parameter: `/api/groups/sync` is never group id `sync`.
pub fn match_route(method: &str, path: &str) -> Result<RouteMatch, RouteError> {
    let method = Method::parse(method);
    let candidates: Vec<(&'static Route, Vec<(&'static str, String)>)> = ROUTES
        .iter()
        .filter_map(|r| match_pattern(r.pattern, path).map(|p| (r, p)))
        .collect();
    let Some(fewest_params) = candidates.iter().map(|(_, p)| p.len()).min() else {
        return Err(RouteError::NotFound);
    };
    let mut allowed = Vec::new();
    for (route, params) in candidates
        .into_iter()
        .filter(|(_, p)| p.len() == fewest_params)
    {
        if Some(route.method) != method {
            allowed.push(route.method);
            continue;
        }
        for (name, value) in &params {
            if *name == "id" {
                validate_group_id(value)
                    .map_err(|reason| RouteError::InvalidParam { name, reason })?;
            }
        }
        return Ok(RouteMatch { route, params });
    }
    Err(RouteError::MethodNotAllowed(allowed))
}

fn match_pattern(pattern: &'static str, path: &str) -> Option<Vec<(&'static str, String)>> {
    let mut params = Vec::new();
    let mut pat = pattern.split('/');
    let mut segs = path.split('/');
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(s)) => {
                if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    if s.is_empty() {
                        return None;
                    }
                    params.push((name, s.to_owned()));
                } else if p != s {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// Group ids are small non-negative integers; group 0 is the guest group.
fn validate_group_id(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 9 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "group id must be a non-negative integer, got {value:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_static_and_parameterised_routes() {
        let m = match_route("GET", "/api/scan/router").unwrap();
        assert_eq!(m.route.pattern, "/api/scan/router");
        let m = match_route("PUT", "/api/groups/12/policy").unwrap();
        assert_eq!(m.route.pattern, "/api/groups/{id}/policy");
        assert_eq!(m.param("id"), Some("12"));
        let m = match_route("GET", "/api/device-usage/device/AA-BB-CC-DD-EE-FF").unwrap();
        assert_eq!(m.param("mac"), Some("AA-BB-CC-DD-EE-FF"));
    }

    #[test]
    fn wrong_method_lists_allowed_methods() {
        assert_eq!(
            match_route("POST", "/api/scan"),
            Err(RouteError::MethodNotAllowed(vec![Method::Get]))
        );
        let err = match_route("PATCH", "/api/groups/3").unwrap_err();
        assert_eq!(
            err,
            RouteError::MethodNotAllowed(vec![Method::Get, Method::Delete])
        );
    }

    #[test]
    fn literal_segments_beat_parameters() {
        assert_eq!(
            match_route("POST", "/api/groups/sync")
                .unwrap()
                .route
                .pattern,
            "/api/groups/sync"
        );
        assert_eq!(
            match_route("GET", "/api/groups/sync"),
            Err(RouteError::MethodNotAllowed(vec![Method::Post]))
        );
        assert_eq!(
            match_route("DELETE", "/api/groups/sync-all"),
            Err(RouteError::MethodNotAllowed(vec![Method::Post]))
        );
        assert_eq!(
            match_route("DELETE", "/api/groups/7").unwrap().param("id"),
            Some("7")
        );
    }

    #[test]
    fn unknown_paths_and_bad_ids() {
        assert_eq!(match_route("GET", "/api/nope"), Err(RouteError::NotFound));
        assert_eq!(match_route("GET", "/api/scan/"), Err(RouteError::NotFound));
        assert_eq!(
            match_route("GET", "/api/groups/"),
            Err(RouteError::NotFound)
        );
        assert!(matches!(
            match_route("GET", "/api/groups/abc"),
            Err(RouteError::InvalidParam { name: "id", .. })
        ));
        assert!(matches!(
            match_route("DELETE", "/api/groups/-1"),
            Err(RouteError::InvalidParam { .. })
        ));
    }

    #[test]
    fn every_pattern_is_unique_per_method() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(a != b, "duplicate route {a:?}");
            }
        }
    }
}
