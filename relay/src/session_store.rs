//! Where sessions live: in this process (`sessions::Sessions`, a single node) or in
//! Redis (cluster mode), behind one async interface so the handlers do not care.
//!
//! In Redis a session is a hash with its user and times, expiring `session_idle`
//! after its last call; each attached router is its own key expiring `router_idle`
//! after the router's last call, listed in a set beside the session. Redis expiry is
//! the timer: no node sweeps. Every operation is one Lua script, so a session seen
//! by two nodes at once changes atomically, and times are Redis's own clock (the
//! nodes' clocks never meet).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use uuid::Uuid;

use crate::sessions::{AttachmentView, SessionError, SessionView, Sessions, Swept};
use crate::sync::Locked;

/// Monotonic time for in-memory sessions.
pub type Now = Arc<dyn Fn() -> tokio::time::Instant + Send + Sync>;

/// Key prefix of everything sessions keep in Redis.
const PREFIX: &str = "np:s:";
/// Every session with the time it expires (a sorted set), for the count `/metrics`
/// shows; entries past their time are dropped when counted.
const INDEX: &str = "np:sessions";

pub enum SessionStore {
    Memory {
        sessions: Mutex<Sessions>,
        /// The relay's monotonic clock (injected, so tests drive it).
        clock: Now,
    },
    // Boxed: the Redis store (connection, scripts) is much larger than the rest.
    Redis(Box<RedisSessions>),
}

impl SessionStore {
    pub fn memory(session_idle: Duration, router_idle: Duration, clock: Now) -> Self {
        SessionStore::Memory {
            sessions: Mutex::new(Sessions::new(session_idle, router_idle)),
            clock,
        }
    }

    /// Starts (or resumes) a session, attaching `router` when given.
    pub async fn start(
        &self,
        id: Uuid,
        user: &str,
        restart: bool,
        router: Option<Uuid>,
    ) -> Result<(), SessionError> {
        match self {
            SessionStore::Memory { sessions, clock } => {
                let now = clock();
                let mut s = sessions.locked();
                s.start(id, user, restart, now)?;
                if let Some(r) = router {
                    s.attach(id, r, now)?;
                }
                Ok(())
            }
            SessionStore::Redis(r) => r.start(id, user, restart, router).await,
        }
    }

    /// The session's user for a call, counting the call as activity.
    pub async fn touch(&self, id: Uuid) -> Result<String, SessionError> {
        match self {
            SessionStore::Memory { sessions, clock } => sessions.locked().touch(id, clock()),
            SessionStore::Redis(r) => r.touch(id).await,
        }
    }

    /// Attaches a router for a call to it (after its ownership was checked).
    pub async fn attach(&self, id: Uuid, router: Uuid) -> Result<(), SessionError> {
        match self {
            SessionStore::Memory { sessions, clock } => {
                sessions.locked().attach(id, router, clock())
            }
            SessionStore::Redis(r) => r.attach(id, router).await,
        }
    }

    pub async fn end(&self, id: Uuid, router: Option<Uuid>) -> Result<(), SessionError> {
        match self {
            SessionStore::Memory { sessions, clock } => sessions.locked().end(id, router, clock()),
            SessionStore::Redis(r) => r.end(id, router).await,
        }
    }

    pub async fn status(&self, id: Uuid) -> Result<SessionView, SessionError> {
        match self {
            SessionStore::Memory { sessions, clock } => sessions.locked().status(id, clock()),
            SessionStore::Redis(r) => r.status(id).await,
        }
    }

    /// Live sessions: this process's, or the whole cluster's in Redis.
    pub async fn count(&self) -> Result<usize, SessionError> {
        match self {
            SessionStore::Memory { sessions, .. } => Ok(sessions.locked().len()),
            SessionStore::Redis(r) => r.count().await,
        }
    }

    /// Frees expired sessions' memory on time; Redis expires its own keys.
    pub fn sweep(&self) -> Swept {
        match self {
            SessionStore::Memory { sessions, clock } => sessions.locked().sweep(clock()),
            SessionStore::Redis(_) => Swept::default(),
        }
    }
}

/// Sessions in Redis, shared by every node.
pub struct RedisSessions {
    conn: ConnectionManager,
    session_idle_ms: u64,
    router_idle_ms: u64,
    /// Past this a command fails with `Unavailable` (never a hung call).
    timeout: Duration,
    scripts: Scripts,
}

struct Scripts {
    start: Script,
    touch: Script,
    attach: Script,
    end: Script,
    status: Script,
    count: Script,
}

// Shared by the scripts: Redis's clock in milliseconds.
const NOW_MS: &str =
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n";

// KEYS: session hash, its router set, the index. ARGV: user, restart (0/1),
// session idle ms, router idle ms, attachment key prefix, router id or "", session id.
// Returns "ok", or "other" when another user holds the id.
const START: &str = r#"
local user = redis.call('HGET', KEYS[1], 'user')
if user and user ~= ARGV[1] then return 'other' end
if (not user) or ARGV[2] == '1' then
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('DEL', ARGV[5] .. r) end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'user', ARGV[1], 'created', now)
end
redis.call('HSET', KEYS[1], 'last', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], now + ARGV[3], ARGV[7])
if ARGV[6] ~= '' then
  local key = ARGV[5] .. ARGV[6]
  local v = redis.call('GET', key)
  local attached = now
  if v then attached = tonumber(string.match(v, '^(%d+)')) end
  redis.call('SET', key, attached .. ':' .. now, 'PX', ARGV[4])
  redis.call('SADD', KEYS[2], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 'ok'
"#;

// KEYS: session hash, router set, the index. ARGV: session idle ms, session id.
// Returns the user or false.
const TOUCH: &str = r#"
local user = redis.call('HGET', KEYS[1], 'user')
if not user then return false end
redis.call('HSET', KEYS[1], 'last', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now + ARGV[1], ARGV[2])
return user
"#;

// KEYS: session hash, router set, attachment key. ARGV: router id, session idle
// ms, router idle ms. Returns 1, or false for an unknown session.
const ATTACH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local v = redis.call('GET', KEYS[3])
local attached = now
if v then attached = tonumber(string.match(v, '^(%d+)')) end
redis.call('SET', KEYS[3], attached .. ':' .. now, 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"#;

// KEYS: session hash, router set, the index. ARGV: attachment key prefix, router
// id or "", session idle ms, session id. Returns 1, or false for an unknown session.
const END: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] == '' then
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('DEL', ARGV[1] .. r) end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[4])
else
  redis.call('DEL', ARGV[1] .. ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], 'last', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[3], now + ARGV[3], ARGV[4])
end
return 1
"#;

// KEYS: the index. Returns the sessions not yet expired, dropping the others.
const COUNT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"#;

// KEYS: session hash, router set. ARGV: attachment key prefix.
// Returns {user, created, last, now, pttl, router, value, router, value, ...} or
// false; attachments that expired are dropped from the set on the way.
const STATUS: &str = r#"
local s = redis.call('HMGET', KEYS[1], 'user', 'created', 'last')
if not s[1] then return false end
local out = {s[1], s[2], s[3], tostring(now), tostring(redis.call('PTTL', KEYS[1]))}
for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('GET', ARGV[1] .. r)
  if v then
    table.insert(out, r)
    table.insert(out, v .. ':' .. redis.call('PTTL', ARGV[1] .. r))
  else
    redis.call('SREM', KEYS[2], r)
  end
end
return out
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW_MS}{body}"))
}

fn session_key(id: Uuid) -> String {
    format!("{PREFIX}{id}")
}

fn routers_key(id: Uuid) -> String {
    format!("{PREFIX}{id}:r")
}

fn attachment_prefix(id: Uuid) -> String {
    format!("{PREFIX}{id}:a:")
}

impl RedisSessions {
    pub fn new(
        conn: ConnectionManager,
        session_idle: Duration,
        router_idle: Duration,
        timeout: Duration,
    ) -> Self {
        RedisSessions {
            conn,
            session_idle_ms: session_idle.as_millis() as u64,
            router_idle_ms: router_idle.as_millis() as u64,
            timeout,
            scripts: Scripts {
                start: script(START),
                touch: script(TOUCH),
                attach: script(ATTACH),
                end: script(END),
                status: script(STATUS),
                count: script(COUNT),
            },
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, SessionError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SessionError::Unavailable(e.to_string())),
            Err(_) => Err(SessionError::Unavailable(format!(
                "no answer from Redis within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn start(
        &self,
        id: Uuid,
        user: &str,
        restart: bool,
        router: Option<Uuid>,
    ) -> Result<(), SessionError> {
        let mut inv = self.scripts.start.prepare_invoke();
        inv.key(session_key(id))
            .key(routers_key(id))
            .key(INDEX)
            .arg(user)
            .arg(if restart { "1" } else { "0" })
            .arg(self.session_idle_ms)
            .arg(self.router_idle_ms)
            .arg(attachment_prefix(id))
            .arg(router.map(|r| r.to_string()).unwrap_or_default())
            .arg(id.to_string());
        let out: String = self.run(inv).await?;
        match out.as_str() {
            "ok" => Ok(()),
            _ => Err(SessionError::OtherUser),
        }
    }

    async fn touch(&self, id: Uuid) -> Result<String, SessionError> {
        let mut inv = self.scripts.touch.prepare_invoke();
        inv.key(session_key(id))
            .key(routers_key(id))
            .key(INDEX)
            .arg(self.session_idle_ms)
            .arg(id.to_string());
        let user: Option<String> = self.run(inv).await?;
        user.ok_or(SessionError::Invalid)
    }

    async fn attach(&self, id: Uuid, router: Uuid) -> Result<(), SessionError> {
        let mut inv = self.scripts.attach.prepare_invoke();
        inv.key(session_key(id))
            .key(routers_key(id))
            .key(format!("{}{router}", attachment_prefix(id)))
            .arg(router.to_string())
            .arg(self.session_idle_ms)
            .arg(self.router_idle_ms);
        let done: Option<i64> = self.run(inv).await?;
        done.map(|_| ()).ok_or(SessionError::Invalid)
    }

    async fn end(&self, id: Uuid, router: Option<Uuid>) -> Result<(), SessionError> {
        let mut inv = self.scripts.end.prepare_invoke();
        inv.key(session_key(id))
            .key(routers_key(id))
            .key(INDEX)
            .arg(attachment_prefix(id))
            .arg(router.map(|r| r.to_string()).unwrap_or_default())
            .arg(self.session_idle_ms)
            .arg(id.to_string());
        let done: Option<i64> = self.run(inv).await?;
        done.map(|_| ()).ok_or(SessionError::Invalid)
    }

    async fn count(&self) -> Result<usize, SessionError> {
        let mut inv = self.scripts.count.prepare_invoke();
        inv.key(INDEX);
        self.run(inv).await
    }

    async fn status(&self, id: Uuid) -> Result<SessionView, SessionError> {
        let mut inv = self.scripts.status.prepare_invoke();
        inv.key(session_key(id))
            .key(routers_key(id))
            .arg(attachment_prefix(id));
        let out: Option<Vec<String>> = self.run(inv).await?;
        let out = out.ok_or(SessionError::Invalid)?;
        parse_status(&out).ok_or_else(|| {
            SessionError::Unavailable(format!("unexpected session record in Redis: {out:?}"))
        })
    }
}

/// Reads the STATUS script's answer into the view the API shows.
fn parse_status(out: &[String]) -> Option<SessionView> {
    let num = |s: &str| s.parse::<i64>().ok();
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    let (user, created, last, now, pttl) = (
        out.first()?.clone(),
        num(out.get(1)?)?,
        num(out.get(2)?)?,
        num(out.get(3)?)?,
        num(out.get(4)?)?,
    );
    let mut routers = Vec::new();
    for pair in out[5..].chunks(2) {
        let [id, value] = pair else { return None };
        // attached:last_call:pttl
        let mut parts = value.splitn(3, ':');
        let attached = num(parts.next()?)?;
        let last_call = num(parts.next()?)?;
        let left = num(parts.next()?)?;
        routers.push(AttachmentView {
            router_id: Uuid::parse_str(id).ok()?,
            attached_for: ms(now - attached),
            idle: ms(now - last_call),
            detaches_in: ms(left),
        });
    }
    routers.sort_by_key(|a| a.router_id);
    Some(SessionView {
        user_id: user,
        age: ms(now - created),
        idle: ms(now - last),
        expires_in: ms(pttl),
        routers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_record_reads_back() {
        let r = Uuid::new_v4();
        let out: Vec<String> = [
            "alice",
            "1000",
            "4000",
            "5000",
            "1799000",
            &r.to_string(),
            "2000:4500:299500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let v = parse_status(&out).unwrap();
        assert_eq!(v.user_id, "alice");
        assert_eq!(v.age, Duration::from_secs(4));
        assert_eq!(v.idle, Duration::from_secs(1));
        assert_eq!(v.expires_in, Duration::from_millis(1_799_000));
        assert_eq!(v.routers.len(), 1);
        assert_eq!(v.routers[0].attached_for, Duration::from_secs(3));
        assert_eq!(v.routers[0].idle, Duration::from_millis(500));
        assert!(
            parse_status(&out[..6]).is_none(),
            "a router without its value"
        );
        assert!(parse_status(&["alice".to_string()]).is_none());
    }
}
