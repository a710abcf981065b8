//! Every way a relay call can fail, and the one place that maps a failure to its
//! envelope error code (which carries the HTTP status). The registry's and the
//! sessions' own errors turn into these beside their definitions, so this module
//! depends on nothing else in the crate and every module can use it.

use hyper::StatusCode;
use netpilot_proto::ErrorCode;

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
    /// The router has its maximum of calls in flight and of calls waiting.
    #[error("router {0} has its maximum of {1} calls in flight and its queue is full; try again")]
    RouterBusy(String, usize),
    /// Router answers in flight hold the relay's whole answer budget.
    #[error("the relay holds its maximum of router answers in flight; try again")]
    RelayBusy,
    /// The router answered something the relay does not pass on.
    #[error("router sent an answer the relay does not pass on: {0}")]
    BadAgentResponse(String),
    /// Anything else; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
    /// The request body did not arrive whole in time (a trickling client).
    #[error("request body did not arrive within {0} ms")]
    BodyTimeout(u128),
    /// Request headers over the cap.
    #[error("request headers exceed {0} bytes")]
    HeadersTooLarge(usize),
    /// A link upgrade refused to keep the node serving the web app: the link cap,
    /// the API reserve or the link-accept rate (`capacity`); retry after the secs.
    #[error("the relay takes no new agent link now ({reason}); retry in {retry_after_secs} s")]
    LinksBusy {
        reason: &'static str,
        retry_after_secs: u64,
    },
    /// The registry (PostgreSQL, in a cluster) cannot be reached or did not answer
    /// within `cluster.postgres_timeout`; the detail is logged, not sent.
    #[error("the router registry is unavailable; try again shortly")]
    RegistryUnavailable(String),
    /// Request target (path and query) over the cap.
    #[error("request target exceeds {0} bytes")]
    UriTooLong(usize),
    /// Nothing reached the router: its link was gone, or refused the call before
    /// the agent took it (its agent is moving to another node). Offline to the
    /// client; in a cluster the call may follow the router to its new node.
    #[error("router {0} is not connected")]
    LinkRefused(String),
    /// Cluster mode: the node holding the router's link cannot be reached.
    #[error("router {0} is linked to node {1}, which cannot be reached: {2}")]
    RouterUnreachable(String, String, String),
    /// Cluster mode: Redis (sessions, the link directory) cannot be reached.
    #[error("the cluster's shared state cannot be reached; try again shortly")]
    ClusterUnavailable(String),
    /// The node is draining (SIGTERM): no new agent link; `/health` says so too.
    #[error("the relay is draining; use another relay")]
    RelayDraining,
}

impl ApiError {
    /// The only mapping from an error to its code; the status follows from the code.
    pub fn code(&self) -> ErrorCode {
        use ApiError::*;
        match self {
            InvalidParameter(_) => ErrorCode::InvalidParameter,
            Unauthorized => ErrorCode::Unauthorized,
            SessionInvalid(_) => ErrorCode::SessionInvalid,
            Forbidden(_) => ErrorCode::Forbidden,
            RouterNotFound(_) => ErrorCode::RouterNotFound,
            CommandTimeout(_) => ErrorCode::CommandTimeout,
            RouterOffline(_) => ErrorCode::RouterOffline,
            NotFound(_) => ErrorCode::NotFound,
            MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            RateLimited => ErrorCode::RateLimited,
            TokenInvalid => ErrorCode::TokenInvalid,
            TokenUsed => ErrorCode::TokenUsed,
            TokenExpired => ErrorCode::TokenExpired,
            RouterRevoked => ErrorCode::RouterRevoked,
            BadGateway(_) => ErrorCode::BadGateway,
            SpeedtestRunning => ErrorCode::SpeedtestRunning,
            SpeedtestBusy(_) => ErrorCode::SpeedtestBusy,
            SpeedtestTooLong(_) => ErrorCode::SpeedtestTimeout,
            RouterBusy(..) => ErrorCode::RouterBusy,
            RelayBusy => ErrorCode::RelayBusy,
            BadAgentResponse(_) => ErrorCode::BadAgentResponse,
            Internal(_) => ErrorCode::Internal,
            BodyTimeout(_) => ErrorCode::BodyTimeout,
            HeadersTooLarge(_) => ErrorCode::HeadersTooLarge,
            UriTooLong(_) => ErrorCode::UriTooLong,
            LinksBusy { .. } => ErrorCode::LinksBusy,
            RouterUnreachable(..) => ErrorCode::RouterUnreachable,
            LinkRefused(_) => ErrorCode::RouterOffline,
            ClusterUnavailable(_) => ErrorCode::ClusterUnavailable,
            RelayDraining => ErrorCode::RelayDraining,
            RegistryUnavailable(_) => ErrorCode::RegistryUnavailable,
        }
    }

    pub fn status(&self) -> StatusCode {
        // Every code's status is a valid one; a test in proto keeps them in 400..600.
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}
