//! The error vocabulary both sides speak: every code an answer's `error.code` can
//! carry, its wire string and the one HTTP status it comes with.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One table, so a code's name, wire string and status cannot drift apart: each
/// line is `Variant = "WIRE_STRING" => status`.
macro_rules! error_codes {
    (
        $(#[$enum_meta:meta])*
        pub enum $name:ident {
            $( $(#[doc = $doc:literal])+ $variant:ident = $wire:literal => $status:literal, )+
        }
    ) => {
        $(#[$enum_meta])*
        pub enum $name {
            $( $(#[doc = $doc])+ $variant, )+
        }

        impl $name {
            /// Every code, in the order of the table.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The string sent in `error.code`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }

            /// The HTTP status every answer with this code carries.
            pub const fn status(self) -> u16 {
                match self {
                    $($name::$variant => $status,)+
                }
            }

            /// The code for a wire string; `None` for one this build does not know
            /// (an older or newer peer may send it).
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($wire => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// Why a call failed, as both the relay and the agent send it.
    ///
    /// Later work adds codes here: one line per code, with the status it always
    /// comes with (a code never answers with two statuses; a new status needs a new
    /// code). The same code must then be added to `ErrorBody`'s `code` enum in
    /// `docs/openapi.json`, and the responses that may carry it listed under that
    /// status; `tests/tests/openapi.rs` checks both.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum ErrorCode {
        /// Malformed input: bad JSON, missing or malformed ids, bad arguments.
        InvalidParameter = "INVALID_PARAMETER" => 400,
        /// No API key or the wrong one; a router's missing or wrong secret.
        Unauthorized = "UNAUTHORIZED" => 401,
        /// The session is unknown or has expired.
        SessionInvalid = "SESSION_INVALID" => 401,
        /// The session's user does not own the router, or the session is another user's.
        Forbidden = "FORBIDDEN" => 403,
        /// No such router, or it was revoked (relay).
        RouterNotFound = "ROUTER_NOT_FOUND" => 404,
        /// The router did not answer within the relay's command timeout.
        CommandTimeout = "COMMAND_TIMEOUT" => 408,
        /// The router is not connected, or its link dropped during the call.
        RouterOffline = "ROUTER_OFFLINE" => 503,
        /// The route exists but its feature has not landed in this agent.
        NotImplemented = "NOT_IMPLEMENTED" => 501,
        /// No such path.
        NotFound = "NOT_FOUND" => 404,
        /// A known path called with another method.
        MethodNotAllowed = "METHOD_NOT_ALLOWED" => 405,
        /// A body over the receiver's size cap.
        PayloadTooLarge = "PAYLOAD_TOO_LARGE" => 413,
        /// A non-empty body that is not `application/json` (relay).
        UnsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE" => 415,
        /// Too many enrollment attempts from one address (relay).
        RateLimited = "RATE_LIMITED" => 429,
        /// The enrollment token is unknown or malformed.
        TokenInvalid = "TOKEN_INVALID" => 401,
        /// The enrollment token has expired.
        TokenExpired = "TOKEN_EXPIRED" => 401,
        /// The enrollment token was already used.
        TokenUsed = "TOKEN_USED" => 401,
        /// A revoked router tried to connect or call the relay.
        RouterRevoked = "ROUTER_REVOKED" => 403,
        /// The router's answer could not be passed on (relay).
        BadGateway = "BAD_GATEWAY" => 502,
        /// Anything else; the details are logged, not sent.
        Internal = "INTERNAL" => 500,
        /// A speed test is already running for this router (agent and relay).
        SpeedtestRunning = "SPEEDTEST_RUNNING" => 409,
        /// The relay serves its maximum of speed-test transfers; try again later.
        SpeedtestBusy = "SPEEDTEST_BUSY" => 429,
        /// A speed-test transfer went past the relay's time limit.
        SpeedtestTimeout = "SPEEDTEST_TIMEOUT" => 408,
        /// The agent could not measure against the relay (unreachable, refused).
        SpeedtestFailed = "SPEEDTEST_FAILED" => 502,
        /// The kernel refused a policy change, or uci or `wifi` a Wi-Fi change; the
        /// previous state is in force.
        ApplyFailed = "APPLY_FAILED" => 500,
        /// A Wi-Fi change while another still waits for its confirmation.
        ChangePending = "CHANGE_PENDING" => 409,
        /// The router's wireless configuration cannot be read (no uci, no radios).
        WifiUnavailable = "WIFI_UNAVAILABLE" => 503,
        /// nlbwmon cannot be asked (not installed, not running, not answering).
        NlbwmonUnavailable = "NLBWMON_UNAVAILABLE" => 503,
        /// nlbwmon's UCI configuration is wrong (its `protocol_database` cannot be
        /// read), so every `nlbw` command fails until the owner fixes it.
        NlbwmonMisconfigured = "NLBWMON_MISCONFIGURED" => 503,
        /// nlbw answered something unusable.
        NlbwmonBadOutput = "NLBWMON_BAD_OUTPUT" => 502,
        /// The device has no usage in nlbwmon's current period.
        DeviceNotFound = "DEVICE_NOT_FOUND" => 404,
        /// A step of the usage reset failed; the message lists every one.
        UsageResetFailed = "USAGE_RESET_FAILED" => 500,
        /// Not a unicast MAC address in any common notation.
        InvalidMac = "INVALID_MAC" => 400,
        /// Not a device IP address.
        InvalidIp = "INVALID_IP" => 400,
        /// A device listed twice, in one group or in two.
        DuplicateDevice = "DUPLICATE_DEVICE" => 400,
        /// A policy change names a group that does not exist.
        UnknownGroup = "UNKNOWN_GROUP" => 400,
        /// The guest group (0) cannot be deleted.
        GuestGroup = "GUEST_GROUP" => 400,
        /// A group id that is missing, out of range or listed twice.
        InvalidGroup = "INVALID_GROUP" => 400,
        /// A group name that is missing, too long or has control characters.
        InvalidName = "INVALID_NAME" => 400,
        /// A policy the agent refuses (internet mode, rate, DNS part).
        InvalidPolicy = "INVALID_POLICY" => 400,
        /// A schedule the agent refuses (days, times, action).
        InvalidSchedule = "INVALID_SCHEDULE" => 400,
        /// A list, group count or category count over its maximum.
        LimitExceeded = "LIMIT_EXCEEDED" => 400,
        /// A device given by neither or both of `ip` and `mac`.
        InvalidTarget = "INVALID_TARGET" => 400,
        /// The group a call addresses by id does not exist.
        GroupNotFound = "GROUP_NOT_FOUND" => 404,
        /// Not a domain name.
        InvalidDomain = "INVALID_DOMAIN" => 400,
        /// No DNS category has this name.
        UnknownCategory = "UNKNOWN_CATEGORY" => 400,
        /// A malformed DNS category name.
        InvalidCategory = "INVALID_CATEGORY" => 400,
        /// A DNS category some group's policy still blocks cannot be deleted.
        CategoryInUse = "CATEGORY_IN_USE" => 409,
        /// An SSID that is empty, over 32 bytes or has control characters.
        InvalidSsid = "INVALID_SSID" => 400,
        /// A Wi-Fi passphrase the interface's encryption cannot take.
        InvalidPassword = "INVALID_PASSWORD" => 400,
        /// The interface's encryption takes no passphrase (open, OWE, enterprise, WEP).
        PasswordNotApplicable = "PASSWORD_NOT_APPLICABLE" => 400,
        /// Not a radio (`wifi-device`) of this router.
        UnknownRadio = "UNKNOWN_RADIO" => 400,
        /// No such Wi-Fi interface, or not on the given radio.
        UnknownInterface = "UNKNOWN_INTERFACE" => 400,
        /// The selection holds no AP interface to change.
        NoApInterface = "NO_AP_INTERFACE" => 400,
        /// The agent's memory budget for request bodies is full and stayed full
        /// for its wait (many large calls at once); try again shortly.
        AgentBusy = "AGENT_BUSY" => 503,
        /// A request body did not arrive whole within the relay's body deadline.
        BodyTimeout = "BODY_TIMEOUT" => 408,
        /// Request headers over the relay's size cap.
        HeadersTooLarge = "HEADERS_TOO_LARGE" => 431,
        /// A request target (path and query) over the relay's length cap.
        UriTooLong = "URI_TOO_LONG" => 414,
        /// The router has the relay's maximum of calls in flight; try again (relay).
        RouterBusy = "ROUTER_BUSY" => 429,
        /// The relay holds its maximum of router answer bytes in flight, all routers
        /// together; try again (relay).
        RelayBusy = "RELAY_BUSY" => 503,
        /// The router answered something the relay does not pass on: not an envelope,
        /// too large, a code only the relay may send, or a status that is not its
        /// code's (relay).
        BadAgentResponse = "BAD_AGENT_RESPONSE" => 502,
        /// The relay takes no new agent link now: its link cap, its reserve for API
        /// connections or its rate of link upgrades; the agent backs off and dials
        /// again later (`Retry-After` says when) (relay).
        LinksBusy = "LINKS_BUSY" => 503,
        /// Cluster mode: the node that holds the router's link cannot be reached
        /// from the node the call entered (a partition, a node just killed); the
        /// call was not delivered (relay).
        RouterUnreachable = "ROUTER_UNREACHABLE" => 503,
        /// Cluster mode: the shared session and link store (Redis) cannot be
        /// reached, so the relay cannot check the session and refuses the call
        /// (fails closed) (relay).
        ClusterUnavailable = "CLUSTER_UNAVAILABLE" => 503,
        /// The relay is draining (shutting down or restarting): it takes no new agent
        /// link; the agent dials the next relay in its list at once (relay).
        RelayDraining = "RELAY_DRAINING" => 503,
        /// The router registry (PostgreSQL, in a cluster) cannot be reached or did
        /// not answer in time; nothing changed, try again shortly (relay).
        RegistryUnavailable = "REGISTRY_UNAVAILABLE" => 503,
    }
}

impl ErrorCode {
    /// Whether an agent may answer a forwarded call with this code. The others speak
    /// for the relay (authentication, sessions, the link, its own limits): a router
    /// that sends one is pretending to be the relay, and the relay does not pass it on.
    /// A new code is the agent's unless listed here.
    pub const fn agent_may_send(self) -> bool {
        !matches!(
            self,
            ErrorCode::Unauthorized
                | ErrorCode::SessionInvalid
                | ErrorCode::Forbidden
                | ErrorCode::RouterNotFound
                | ErrorCode::CommandTimeout
                | ErrorCode::RouterOffline
                | ErrorCode::UnsupportedMediaType
                | ErrorCode::RateLimited
                | ErrorCode::TokenInvalid
                | ErrorCode::TokenExpired
                | ErrorCode::TokenUsed
                | ErrorCode::RouterRevoked
                | ErrorCode::BadGateway
                | ErrorCode::SpeedtestTimeout
                | ErrorCode::RouterBusy
                | ErrorCode::RelayBusy
                | ErrorCode::LinksBusy
                | ErrorCode::RelayDraining
                | ErrorCode::RegistryUnavailable
                | ErrorCode::BadAgentResponse
                | ErrorCode::BodyTimeout
                | ErrorCode::HeadersTooLarge
                | ErrorCode::UriTooLong
                | ErrorCode::RouterUnreachable
                | ErrorCode::ClusterUnavailable
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ErrorCode::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_code_reads_back_from_its_wire_string() {
        let mut seen = BTreeSet::new();
        for &c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} listed twice");
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert_eq!(c.to_string(), c.as_str());
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), c);
            assert!((400..600).contains(&c.status()), "{c}: {}", c.status());
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{c}"
            );
        }
    }

    #[test]
    fn unknown_codes_are_not_guessed() {
        assert_eq!(ErrorCode::parse("NO_SUCH_CODE"), None);
        assert_eq!(ErrorCode::parse("invalid_parameter"), None);
        assert!(serde_json::from_str::<ErrorCode>("\"NO_SUCH_CODE\"").is_err());
    }

    #[test]
    fn the_relay_speaks_for_itself() {
        for c in [
            ErrorCode::Unauthorized,
            ErrorCode::SessionInvalid,
            ErrorCode::Forbidden,
            ErrorCode::RouterRevoked,
            ErrorCode::RouterOffline,
            ErrorCode::BadAgentResponse,
        ] {
            assert!(!c.agent_may_send(), "{c}");
        }
        // Codes the agent does send (SPEEDTEST_BUSY: the relay refused its test).
        for c in [
            ErrorCode::InvalidParameter,
            ErrorCode::NotFound,
            ErrorCode::Internal,
            ErrorCode::SpeedtestBusy,
            ErrorCode::InvalidMac,
            ErrorCode::NotImplemented,
        ] {
            assert!(c.agent_may_send(), "{c}");
        }
    }

    #[test]
    fn statuses_once_decided_by_special_cases() {
        assert_eq!(ErrorCode::CategoryInUse.status(), 409);
        assert_eq!(ErrorCode::GroupNotFound.status(), 404);
        assert_eq!(ErrorCode::InvalidMac.status(), 400);
        assert_eq!(ErrorCode::RouterOffline.status(), 503);
        assert_eq!(ErrorCode::NotImplemented.status(), 501);
    }
}
