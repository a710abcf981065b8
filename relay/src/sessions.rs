//! Web-app sessions: which user a session belongs to, which routers it has attached,
//! and when each expires. Pure state with `now` passed in; the sweeper and the
//! handlers supply the clock. Sessions live in memory only (DESIGN §4).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(Debug)]
struct Session {
    user_id: String,
    created_at: Instant,
    last_activity: Instant,
    routers: HashMap<Uuid, Attachment>,
}

#[derive(Debug, Clone, Copy)]
struct Attachment {
    attached_at: Instant,
    last_call: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SessionError {
    /// Unknown or expired.
    Invalid,
    /// The session id is held by another user.
    OtherUser,
    /// Cluster mode: the session store (Redis) did not answer; the call is refused
    /// (never let through unchecked).
    Unavailable(String),
}

impl SessionError {
    /// The answer to a call on session `id` that failed this way.
    pub fn into_api_error(self, id: Uuid) -> ApiError {
        match self {
            SessionError::Invalid => ApiError::SessionInvalid(id.to_string()),
            SessionError::OtherUser => {
                ApiError::Forbidden(format!("session {id} belongs to another user"))
            }
            SessionError::Unavailable(why) => ApiError::ClusterUnavailable(why),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionView {
    pub user_id: String,
    pub age: Duration,
    pub idle: Duration,
    pub expires_in: Duration,
    pub routers: Vec<AttachmentView>,
}

#[derive(Debug, Clone)]
pub struct AttachmentView {
    pub router_id: Uuid,
    pub attached_for: Duration,
    pub idle: Duration,
    pub detaches_in: Duration,
}

#[derive(Debug)]
pub struct Sessions {
    map: HashMap<Uuid, Session>,
    session_idle: Duration,
    router_idle: Duration,
}

/// What a sweep removed, for logs and metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub sessions: usize,
    pub attachments: usize,
}

impl Sessions {
    pub fn new(session_idle: Duration, router_idle: Duration) -> Self {
        Sessions {
            map: HashMap::new(),
            session_idle,
            router_idle,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Starts (or resumes) a session. `restart` drops its attachments first. A
    /// session id already held by another live user is refused.
    pub fn start(
        &mut self,
        id: Uuid,
        user_id: &str,
        restart: bool,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.expire_one(id, now);
        match self.map.get_mut(&id) {
            Some(s) if s.user_id != user_id => Err(SessionError::OtherUser),
            Some(s) => {
                if restart {
                    s.routers.clear();
                    s.created_at = now;
                }
                s.last_activity = now;
                Ok(())
            }
            None => {
                self.map.insert(
                    id,
                    Session {
                        user_id: user_id.to_owned(),
                        created_at: now,
                        last_activity: now,
                        routers: HashMap::new(),
                    },
                );
                Ok(())
            }
        }
    }

    /// The session's user for a call, counting the call as activity.
    pub fn touch(&mut self, id: Uuid, now: Instant) -> Result<String, SessionError> {
        self.expire_one(id, now);
        let s = self.map.get_mut(&id).ok_or(SessionError::Invalid)?;
        s.last_activity = now;
        Ok(s.user_id.clone())
    }

    /// Attaches a router to a session (or keeps it attached) for a call to it.
    pub fn attach(&mut self, id: Uuid, router: Uuid, now: Instant) -> Result<(), SessionError> {
        let router_idle = self.router_idle;
        let s = self.map.get_mut(&id).ok_or(SessionError::Invalid)?;
        let a = s.routers.entry(router).or_insert(Attachment {
            attached_at: now,
            last_call: now,
        });
        if now.saturating_duration_since(a.last_call) >= router_idle {
            a.attached_at = now;
        }
        a.last_call = now;
        Ok(())
    }

    /// Ends a whole session, or detaches one router from it.
    pub fn end(
        &mut self,
        id: Uuid,
        router: Option<Uuid>,
        now: Instant,
    ) -> Result<(), SessionError> {
        self.expire_one(id, now);
        match router {
            None => self
                .map
                .remove(&id)
                .map(|_| ())
                .ok_or(SessionError::Invalid),
            Some(r) => {
                let s = self.map.get_mut(&id).ok_or(SessionError::Invalid)?;
                s.routers.remove(&r);
                s.last_activity = now;
                Ok(())
            }
        }
    }

    pub fn status(&self, id: Uuid, now: Instant) -> Result<SessionView, SessionError> {
        let s = self.map.get(&id).ok_or(SessionError::Invalid)?;
        let idle = now.saturating_duration_since(s.last_activity);
        if idle >= self.session_idle {
            return Err(SessionError::Invalid);
        }
        let mut routers: Vec<AttachmentView> = s
            .routers
            .iter()
            .filter_map(|(rid, a)| {
                let idle = now.saturating_duration_since(a.last_call);
                (idle < self.router_idle).then(|| AttachmentView {
                    router_id: *rid,
                    attached_for: now.saturating_duration_since(a.attached_at),
                    idle,
                    detaches_in: self.router_idle - idle,
                })
            })
            .collect();
        routers.sort_by_key(|a| a.router_id);
        Ok(SessionView {
            user_id: s.user_id.clone(),
            age: now.saturating_duration_since(s.created_at),
            idle,
            expires_in: self.session_idle - idle,
            routers,
        })
    }

    /// Removes expired sessions and detaches idle routers.
    pub fn sweep(&mut self, now: Instant) -> Swept {
        let mut swept = Swept::default();
        let (session_idle, router_idle) = (self.session_idle, self.router_idle);
        self.map.retain(|_, s| {
            if now.saturating_duration_since(s.last_activity) >= session_idle {
                swept.sessions += 1;
                return false;
            }
            let before = s.routers.len();
            s.routers
                .retain(|_, a| now.saturating_duration_since(a.last_call) < router_idle);
            swept.attachments += before - s.routers.len();
            true
        });
        swept
    }

    /// Expiry does not wait for the sweeper: an expired session is gone the moment it
    /// is next looked at.
    fn expire_one(&mut self, id: Uuid, now: Instant) {
        if let Some(s) = self.map.get(&id) {
            if now.saturating_duration_since(s.last_activity) >= self.session_idle {
                self.map.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn sessions() -> Sessions {
        Sessions::new(30 * MIN, 5 * MIN)
    }

    #[test]
    fn session_expires_after_idle_time_and_touch_extends_it() {
        let t0 = Instant::now();
        let mut s = sessions();
        let id = Uuid::new_v4();
        s.start(id, "alice", false, t0).unwrap();
        assert_eq!(s.touch(id, t0 + 29 * MIN).unwrap(), "alice");
        assert!(s.touch(id, t0 + 58 * MIN).is_ok());
        assert_eq!(s.touch(id, t0 + 88 * MIN), Err(SessionError::Invalid));
        assert!(s.is_empty());
    }

    #[test]
    fn router_detaches_after_five_idle_minutes_and_reattaches_on_call() {
        let t0 = Instant::now();
        let mut s = sessions();
        let (id, r) = (Uuid::new_v4(), Uuid::new_v4());
        s.start(id, "alice", false, t0).unwrap();
        s.attach(id, r, t0).unwrap();
        s.touch(id, t0 + 4 * MIN).unwrap();
        assert_eq!(s.status(id, t0 + 4 * MIN).unwrap().routers.len(), 1);
        assert_eq!(s.status(id, t0 + 5 * MIN).unwrap().routers.len(), 0);
        assert_eq!(
            s.sweep(t0 + 6 * MIN),
            Swept {
                sessions: 0,
                attachments: 1
            }
        );
        s.attach(id, r, t0 + 7 * MIN).unwrap();
        let v = s.status(id, t0 + 7 * MIN).unwrap();
        assert_eq!(v.routers[0].router_id, r);
        assert_eq!(v.routers[0].attached_for, Duration::ZERO);
    }

    #[test]
    fn another_user_cannot_take_a_session_id() {
        let t0 = Instant::now();
        let mut s = sessions();
        let id = Uuid::new_v4();
        s.start(id, "alice", false, t0).unwrap();
        assert_eq!(
            s.start(id, "mallory", true, t0),
            Err(SessionError::OtherUser)
        );
        // Once expired, the id is free again.
        s.start(id, "bob", false, t0 + 31 * MIN).unwrap();
        assert_eq!(s.touch(id, t0 + 31 * MIN).unwrap(), "bob");
    }

    #[test]
    fn end_is_immediate_and_can_detach_one_router() {
        let t0 = Instant::now();
        let mut s = sessions();
        let (id, r1, r2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        s.start(id, "alice", false, t0).unwrap();
        s.attach(id, r1, t0).unwrap();
        s.attach(id, r2, t0).unwrap();
        s.end(id, Some(r1), t0).unwrap();
        let v = s.status(id, t0).unwrap();
        assert_eq!(v.routers.len(), 1);
        assert_eq!(v.routers[0].router_id, r2);
        s.end(id, None, t0).unwrap();
        assert_eq!(s.touch(id, t0), Err(SessionError::Invalid));
        assert_eq!(s.end(id, None, t0), Err(SessionError::Invalid));
    }

    #[test]
    fn restart_clears_attachments() {
        let t0 = Instant::now();
        let mut s = sessions();
        let (id, r) = (Uuid::new_v4(), Uuid::new_v4());
        s.start(id, "alice", false, t0).unwrap();
        s.attach(id, r, t0).unwrap();
        s.start(id, "alice", true, t0 + MIN).unwrap();
        assert!(s.status(id, t0 + MIN).unwrap().routers.is_empty());
    }

    #[test]
    fn sweep_removes_expired_sessions() {
        let t0 = Instant::now();
        let mut s = sessions();
        s.start(Uuid::new_v4(), "a", false, t0).unwrap();
        s.start(Uuid::new_v4(), "b", false, t0 + 10 * MIN).unwrap();
        assert_eq!(s.sweep(t0 + 35 * MIN).sessions, 1);
        assert_eq!(s.len(), 1);
    }
}
