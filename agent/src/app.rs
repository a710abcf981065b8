//! What every agent handler shares: the system backends, the router's identity and
//! the link's state. Built once at start-up; real or simulated is decided there.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::report::{NoRelay, Reporter};
use crate::system::files::Files;
use crate::system::ubus::{RealUbus, Ubus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Real,
    Simulated,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Real => "real",
            Mode::Simulated => "simulated",
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct LinkState {
    pub connected_since: Option<SystemTime>,
    /// Links established since the agent started.
    pub connects: u64,
    pub last_error: Option<String>,
}

pub struct App {
    pub mode: Mode,
    pub router_id: String,
    pub files: Arc<dyn Files>,
    /// hostapd's client lists, netifd's wireless status.
    pub ubus: Arc<dyn Ubus>,
    pub started: Instant,
    pub link: Mutex<LinkState>,
    /// Starts recorded in the state database, this one included (0: not recorded).
    pub starts: u64,
    /// Device discovery; `None` only in tests of other parts.
    pub scanner: Option<Arc<crate::scan::Scanner>>,
    /// The policy engine; `None` only in tests of other parts.
    pub policy: Option<Arc<crate::policy::engine::Engine>>,
    /// The Wi-Fi service; `None` only in tests of other parts.
    pub wifi: Option<Arc<crate::wifi::WifiService>>,
    /// Reports to the relay outside the link; [`NoRelay`] until one is given.
    pub reporter: Arc<dyn Reporter>,
    /// Measures the line against the relay; `None` (answering 501) without a relay.
    pub speedtest: Option<Arc<crate::speedtest::SpeedTester>>,
    /// Device usage from nlbwmon; `None` only in tests of other parts.
    pub usage: Option<Arc<crate::usage::Usage>>,
}

impl App {
    pub fn new(mode: Mode, router_id: String, files: Arc<dyn Files>) -> Self {
        App {
            mode,
            router_id,
            files,
            ubus: Arc::new(RealUbus::default()),
            started: Instant::now(),
            link: Mutex::new(LinkState::default()),
            starts: 0,
            scanner: None,
            policy: None,
            wifi: None,
            reporter: Arc::new(NoRelay),
            speedtest: None,
            usage: None,
        }
    }

    pub fn with_policy(mut self, engine: Arc<crate::policy::engine::Engine>) -> Self {
        self.policy = Some(engine);
        self
    }

    pub fn with_wifi(mut self, wifi: Arc<crate::wifi::WifiService>) -> Self {
        self.wifi = Some(wifi);
        self
    }

    pub fn with_reporter(mut self, reporter: Arc<dyn Reporter>) -> Self {
        self.reporter = reporter;
        self
    }

    pub fn with_speedtest(mut self, tester: Arc<crate::speedtest::SpeedTester>) -> Self {
        self.speedtest = Some(tester);
        self
    }

    pub fn with_usage(mut self, usage: Arc<crate::usage::Usage>) -> Self {
        self.usage = Some(usage);
        self
    }

    pub fn with_ubus(mut self, ubus: Arc<dyn Ubus>) -> Self {
        self.ubus = ubus;
        self
    }

    pub fn with_scanner(mut self, scanner: crate::scan::Scanner) -> Self {
        self.scanner = Some(Arc::new(scanner));
        self
    }

    pub fn with_starts(mut self, starts: u64) -> Self {
        self.starts = starts;
        self
    }

    pub fn link_state(&self) -> LinkState {
        self.link.lock().expect("link state lock").clone()
    }

    pub fn set_link(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.link.lock().expect("link state lock"));
    }
}
