//! The agent's configuration as one value: the command line over the UCI file
//! (`/etc/config/netpilot`) over the defaults, merged by [`AgentConfig::load`]. The
//! command line is checked first and alone; the file is then read, and a broken file
//! is reported and left out rather than stopping the agent. What is worth telling
//! about the file comes back as [`Warning`]s, for `main` to say once logging is set
//! up (whose level may come from that very file).

mod args;
pub mod duration;
mod run;
pub mod settings;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

pub use args::USAGE;
pub use run::{RunConfig, CONTROL_SOCKET, NO_SIMULATED_ROUTER};
pub use settings::{Settings, SettingsError, DEFAULT_PATH};

use crate::link::enroll::EnrollArgs;
use crate::link::tls::{TlsError, Trust};

/// Everything the command line and the UCI file decide, resolved.
#[derive(Debug)]
pub struct AgentConfig {
    pub command: Command,
    /// The log filter (`info`, `warn,netpilot_agent=debug`): `--log`, then UCI
    /// `log_level`, then `info`. Checked where logging is set up.
    pub log: String,
    pub warnings: Vec<Warning>,
}

/// The subcommand and what it runs with.
#[derive(Debug)]
pub enum Command {
    /// `--version`: nothing else was read.
    Version,
    /// `--help`: nothing else was read.
    Help,
    Enroll(EnrollConfig),
    Run(RunConfig),
    Cleanup(RunConfig),
    /// Puts the boot copy in place before fw4 starts.
    Boot(RunConfig),
    /// A request to the running agent over its control socket.
    Control {
        verb: ControlVerb,
        socket: PathBuf,
        /// Print the answer as JSON rather than for a person.
        json: bool,
    },
}

/// What the control socket is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlVerb {
    Status,
    Reconnect,
    Reapply,
}

impl ControlVerb {
    /// The request line's word.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlVerb::Status => "status",
            ControlVerb::Reconnect => "reconnect",
            ControlVerb::Reapply => "reapply",
        }
    }

    pub fn parse(word: &str) -> Option<ControlVerb> {
        [
            ControlVerb::Status,
            ControlVerb::Reconnect,
            ControlVerb::Reapply,
        ]
        .into_iter()
        .find(|v| v.as_str() == word)
    }
}

/// `enroll`'s arguments. The relay URL may come from the UCI file, so whether the
/// required ones are there is asked only when enrolling ([`EnrollConfig::args`]).
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    pub relay_url: Option<String>,
    pub token: Option<String>,
    /// `--ca`/`--fingerprint`, then UCI, then the system's CA bundle.
    pub trust: Trust,
    pub state_dir: PathBuf,
    /// Enroll again over an existing identity.
    pub force: bool,
}

impl EnrollConfig {
    pub fn args(&self) -> Result<EnrollArgs<'_>, ConfigError> {
        Ok(EnrollArgs {
            relay_url: self.relay_url.as_deref().ok_or(ConfigError::NoRelay)?,
            token: self.token.as_deref().ok_or(ConfigError::NoToken)?,
            trust: self.trust.clone(),
            state_dir: &self.state_dir,
            force: self.force,
        })
    }
}

/// Something about the UCI file that does not stop the agent.
#[derive(Debug)]
pub enum Warning {
    /// The file could not be read or used; the command line and defaults apply.
    IgnoredFile { path: PathBuf, error: SettingsError },
    /// Options this agent does not know (a newer package's config, a typo).
    UnknownOptions { path: PathBuf, options: Vec<String> },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::IgnoredFile { path, error } => {
                write!(f, "ignoring {}: {error}", path.display())
            }
            Warning::UnknownOptions { path, options } => {
                write!(
                    f,
                    "ignoring unknown options in {}: {}",
                    path.display(),
                    options.join(", ")
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line is malformed (a missing value, bad UTF-8).
    #[error(transparent)]
    Args(#[from] lexopt::Error),
    /// An option or argument no command takes; the usage follows.
    #[error("{0}\n\n{USAGE}")]
    Unexpected(lexopt::Error),
    /// No command, or one the agent does not have.
    #[error("{USAGE}")]
    Usage,
    /// An option's value does not read as what it must be.
    #[error("--{option} {value:?} is not {expected}")]
    Invalid {
        option: &'static str,
        value: String,
        expected: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A zero duration where only a positive one makes sense.
    #[error("--{0} must be positive")]
    NotPositive(&'static str),
    /// Two ways of trusting the relay at once.
    #[error("pass --ca or --fingerprint, not both")]
    CaAndFingerprint,
    /// `--fingerprint` is not a SHA-256 in hex.
    #[error(transparent)]
    Fingerprint(#[from] TlsError),
    #[error("enroll needs --relay URL (or relay_url in the config)")]
    NoRelay,
    #[error("enroll needs --token TOKEN")]
    NoToken,
}

impl ConfigError {
    fn invalid(
        option: &'static str,
        value: String,
        expected: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ConfigError {
        ConfigError::Invalid {
            option,
            value,
            expected,
            source: Box::new(source),
        }
    }
}

impl AgentConfig {
    /// Resolves the configuration from `args` (without the program name) and the
    /// UCI file, `uci_file` unless `--config` names another. A missing file is no
    /// settings; a broken one is a [`Warning::IgnoredFile`], not an error.
    pub fn load(
        args: impl IntoIterator<Item = OsString>,
        uci_file: &Path,
    ) -> Result<AgentConfig, ConfigError> {
        let line = match args::parse(args)? {
            args::Parsed::Version => return Ok(AgentConfig::bare(Command::Version)),
            args::Parsed::Help => return Ok(AgentConfig::bare(Command::Help)),
            args::Parsed::Line(line) => line,
        };
        let path = line.config.clone().unwrap_or_else(|| uci_file.to_owned());
        let mut warnings = Vec::new();
        let settings = Settings::load(&path).unwrap_or_else(|error| {
            warnings.push(Warning::IgnoredFile {
                path: path.clone(),
                error,
            });
            Settings::default()
        });
        if !settings.unknown.is_empty() {
            warnings.push(Warning::UnknownOptions {
                path,
                options: settings.unknown.clone(),
            });
        }
        Ok(AgentConfig::merge(*line, settings, warnings))
    }

    fn bare(command: Command) -> AgentConfig {
        AgentConfig {
            command,
            log: DEFAULT_LOG.into(),
            warnings: Vec::new(),
        }
    }

    /// The command line over the file over the defaults. Cannot fail: the command
    /// line was checked on its own, the file by [`Settings::parse`].
    fn merge(line: args::CommandLine, settings: Settings, warnings: Vec<Warning>) -> AgentConfig {
        let mut run = line.run;
        if let Some(dir) = line.state_dir.or(settings.state_dir) {
            run.state_dir = dir;
        }
        if run.lan_ifs.is_empty() {
            run.lan_ifs = settings.lan_ifs;
        }
        run.dns_user = run.dns_user.or(settings.dns_user);
        if let Some(d) = line.start_delay.or(settings.start_delay) {
            run.backoff.start_delay_max = d;
        }
        if let Some(d) = line.reconnect_spread.or(settings.reconnect_spread) {
            run.backoff.reconnect_spread = d;
        }
        if let Some(m) = settings.flow_offloading {
            run.flow_offloading = m;
        }
        // Either trust option on the command line replaces both of the file's; both
        // override what enrollment stored, as does the relay list (the command line's
        // replaces the file's).
        run.trust = line
            .trust
            .or(match (settings.ca_file, settings.fingerprint) {
                (Some(path), _) => Some(Trust::CaFile(path)),
                (None, Some(fp)) => Some(Trust::Fingerprint(fp)),
                (None, None) => None,
            });
        run.relay_urls = if line.relays.is_empty() {
            settings.relay_urls
        } else {
            line.relays
        };
        let command = match line.verb {
            args::Verb::Enroll => Command::Enroll(EnrollConfig {
                // Enrollment asks the first; the identity stores it.
                relay_url: run.relay_urls.into_iter().next(),
                token: line.token,
                trust: run.trust.unwrap_or(Trust::System),
                state_dir: run.state_dir,
                force: line.force,
            }),
            args::Verb::Run => Command::Run(run),
            args::Verb::Cleanup => Command::Cleanup(run),
            args::Verb::Boot => Command::Boot(run),
            args::Verb::Control(verb) => Command::Control {
                verb,
                socket: run.control.unwrap_or_else(|| PathBuf::from(CONTROL_SOCKET)),
                json: line.json,
            },
        };
        AgentConfig {
            command,
            log: line
                .log
                .or(settings.log_level)
                .unwrap_or_else(|| DEFAULT_LOG.into()),
            warnings,
        }
    }
}

const DEFAULT_LOG: &str = "info";

#[cfg(test)]
mod tests;
