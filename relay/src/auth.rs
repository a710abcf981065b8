//! Who is calling: the web-app backend by its API key, a router by its id header and
//! secret; and the secret material itself (making enrollment tokens and router
//! secrets, hashing them for the registry, comparing in constant time). The checks
//! take what the caller looked up about the router, so this module sits below the
//! shared state and every handler can reach it.

use hyper::body::Incoming;
use hyper::Request;
use netpilot_proto::link::HEADER_ROUTER_ID;
use uuid::Uuid;

use crate::config::Secret;
use crate::error::ApiError;
use crate::peer_limits::ConnAuth;

/// What checking a router's secret and its owner needs, kept in memory for every call.
#[derive(Debug, Clone)]
pub struct RouterMeta {
    pub owner_user_id: String,
    pub secret_hash: Option<[u8; 32]>,
    pub revoked: bool,
}

/// A call on `/api/`: `Authorization: Bearer` with the relay's API key. The two
/// are compared by their SHA-256 digests, whose length is fixed: comparing the keys
/// themselves would return early on a length mismatch and tell the key's length.
pub fn check_api_key(req: &Request<Incoming>, key: &Secret) -> Result<(), ApiError> {
    let ok = bearer(req).is_some_and(|k| api_key_matches(k, key));
    if ok {
        connection_authenticated(req);
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Who is calling an agent endpoint (the link, reports, speed tests): the router id
/// header and the router secret as a bearer token, checked against what `lookup`
/// knows of that router. Records the router id on the request span. A malformed id
/// is 400, an unknown router or wrong secret 401, a revoked router 403 — but only
/// to the holder of its secret: whether a router was revoked is told to no one
/// else, so a wrong secret gets the same 401 for a revoked router as for a live one.
/// The router id an agent request claims, unchecked: only for warming the router
/// cache before [`authenticate_router`] checks the claim.
pub fn claimed_router_id(req: &Request<Incoming>) -> Option<Uuid> {
    req.headers()
        .get(HEADER_ROUTER_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
}

pub fn authenticate_router(
    req: &Request<Incoming>,
    lookup: impl FnOnce(Uuid) -> Option<RouterMeta>,
) -> Result<Uuid, ApiError> {
    let router_id = req
        .headers()
        .get(HEADER_ROUTER_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .ok_or_else(|| ApiError::InvalidParameter(format!("{HEADER_ROUTER_ID} must be a UUID")))?;
    tracing::Span::current().record("router_id", tracing::field::display(router_id));
    let secret = bearer(req).ok_or(ApiError::Unauthorized)?;
    let meta = lookup(router_id).ok_or(ApiError::Unauthorized)?;
    let stored = meta.secret_hash.ok_or(ApiError::Unauthorized)?;
    if !ct_eq(&sha256(secret.as_bytes()), &stored) {
        return Err(ApiError::Unauthorized);
    }
    if meta.revoked {
        return Err(ApiError::RouterRevoked);
    }
    connection_authenticated(req);
    Ok(router_id)
}

/// A valid credential takes the request's connection out of its address's count of
/// unauthenticated connections (see `peer_limits`). Requests built outside the
/// server (none today) carry no handle and have nothing to release.
fn connection_authenticated(req: &Request<Incoming>) {
    if let Some(conn) = req.extensions().get::<ConnAuth>() {
        conn.authenticated();
    }
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether `given` is the API key, in time independent of where they differ and of
/// either length.
pub fn api_key_matches(given: &str, key: &Secret) -> bool {
    ct_eq(&sha256(given.as_bytes()), &sha256(key.expose().as_bytes()))
}

/// Constant-time equality for secrets of equal length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// 32 random bytes as 64 hex characters: enrollment tokens and router secrets.
pub fn random_hex32() -> Result<String, ApiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::Internal("system random number generator failed".into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn api_keys_match_whole_only() {
        let key = crate::config::Secret::new("test-api-key-0123456789abcdef");
        assert!(api_key_matches("test-api-key-0123456789abcdef", &key));
        for other in [
            "",
            "test-api-key-0123456789abcde",
            "test-api-key-0123456789abcdef0",
            "test-api-key-0123456789abcdeF",
        ] {
            assert!(!api_key_matches(other, &key), "{other:?}");
        }
    }
}
