//! Every way a relay call can fail, and the one place that maps a failure to an HTTP
//! status and an envelope error code.

use hyper::StatusCode;
use netpilot_proto::envelope::code;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: bad JSON, missing or malformed ids, bad parameters.
    #[error("{0}")]
    InvalidParameter(String),
    /// No API key, or the wrong one.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// The session is unknown or expired.
    #[error("session {0} is unknown or has expired")]
    SessionInvalid(String),
    /// The session's user does not own the router, or another user's session id.
    #[error("{0}")]
    Forbidden(String),
    /// No such router (or it was revoked).
    #[error("router {0} not found")]
    RouterNotFound(String),
    /// The router did not answer within the command timeout.
    #[error("router did not answer within {0} ms")]
    CommandTimeout(u128),
    /// The router is not connected, or its link dropped mid-call.
    #[error("router {0} is not connected")]
    RouterOffline(String),
    /// Unknown path.
    #[error("no route for {0}")]
    NotFound(String),
    /// Known path, other method.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(String),
    /// Body over the configured cap.
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    /// A body that is not JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// Too many attempts from one address.
    #[error("too many requests; try again later")]
    RateLimited,
    /// Enrollment token problems, told apart so the router owner knows what to do.
    #[error("enrollment token is not valid")]
    TokenInvalid,
    #[error("enrollment token was already used; create a new one")]
    TokenUsed,
    #[error("enrollment token has expired; create a new one")]
    TokenExpired,
    /// A revoked router tried to connect.
    #[error("router was revoked")]
    RouterRevoked,
    /// The agent answered something that is not HTTP we understand.
    #[error("router sent an invalid answer: {0}")]
    BadGateway(String),
    /// This router already has a speed-test transfer running.
    #[error("a speed test is already running for this router")]
    SpeedtestRunning,
    /// The relay serves its configured maximum of speed-test transfers.
    #[error("the relay is serving its maximum of {0} speed tests; try again later")]
    SpeedtestBusy(usize),
    /// An upload went on past the relay's limit.
    #[error("speed-test transfer exceeded {0} ms")]
    SpeedtestTooLong(u128),
    /// Anything else; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The only mapping from an error to HTTP status and code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            InvalidParameter(_) => (StatusCode::BAD_REQUEST, code::INVALID_PARAMETER),
            Unauthorized => (StatusCode::UNAUTHORIZED, code::UNAUTHORIZED),
            SessionInvalid(_) => (StatusCode::UNAUTHORIZED, code::SESSION_INVALID),
            Forbidden(_) => (StatusCode::FORBIDDEN, code::FORBIDDEN),
            RouterNotFound(_) => (StatusCode::NOT_FOUND, code::ROUTER_NOT_FOUND),
            CommandTimeout(_) => (StatusCode::REQUEST_TIMEOUT, code::COMMAND_TIMEOUT),
            RouterOffline(_) => (StatusCode::SERVICE_UNAVAILABLE, code::ROUTER_OFFLINE),
            NotFound(_) => (StatusCode::NOT_FOUND, code::NOT_FOUND),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, code::METHOD_NOT_ALLOWED),
            PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, code::PAYLOAD_TOO_LARGE),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::UNSUPPORTED_MEDIA_TYPE,
            ),
            RateLimited => (StatusCode::TOO_MANY_REQUESTS, code::RATE_LIMITED),
            TokenInvalid => (StatusCode::UNAUTHORIZED, code::TOKEN_INVALID),
            TokenUsed => (StatusCode::UNAUTHORIZED, code::TOKEN_USED),
            TokenExpired => (StatusCode::UNAUTHORIZED, code::TOKEN_EXPIRED),
            RouterRevoked => (StatusCode::FORBIDDEN, code::ROUTER_REVOKED),
            BadGateway(_) => (StatusCode::BAD_GATEWAY, code::BAD_GATEWAY),
            SpeedtestRunning => (StatusCode::CONFLICT, code::SPEEDTEST_RUNNING),
            SpeedtestBusy(_) => (StatusCode::TOO_MANY_REQUESTS, code::SPEEDTEST_BUSY),
            SpeedtestTooLong(_) => (StatusCode::REQUEST_TIMEOUT, code::SPEEDTEST_TIMEOUT),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as S;
        match e {
            S::TokenInvalid => ApiError::TokenInvalid,
            S::TokenUsed => ApiError::TokenUsed,
            S::TokenExpired => ApiError::TokenExpired,
            S::Revoked => ApiError::RouterRevoked,
            S::NotFound => ApiError::RouterNotFound(String::new()),
            S::Sqlite(e) => ApiError::Internal(e.to_string()),
        }
    }
}
