//! `[vendors]`: MAC vendor enrichment (issue 17) — whether the relay adds `vendor`
//! to the device objects it forwards, and which IEEE-format CSV files it loads over
//! the registry it embeds. The files are read at start (`vendors::Vendors::load`),
//! not here: the configuration only names them.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// `off` (or `false`, `0`) turns enrichment off, `on` (`true`, `1`) on; beats
/// `vendors.enabled`.
pub const ENV_VENDORS: &str = "NETPILOT_VENDORS";
/// The vendor files, separated by `,` or `:` (as `PATH` is); beats
/// `vendors.files`.
pub const ENV_VENDOR_FILES: &str = "NETPILOT_VENDOR_FILES";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorsConfig {
    /// Add `vendor` to device objects and the CSV export (default on).
    pub enabled: bool,
    /// IEEE-format CSV files (`oui.csv`, `mam.csv`, `oui36.csv`, …) read at start,
    /// in order, over the embedded registry.
    pub files: Vec<PathBuf>,
}

impl Default for VendorsConfig {
    fn default() -> Self {
        VendorsConfig {
            enabled: true,
            files: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileVendors {
    enabled: Option<bool>,
    files: Option<Vec<PathBuf>>,
}

impl VendorsConfig {
    /// The environment over the file over the defaults. An empty variable is unset
    /// (systemd's `Environment=NAME=`).
    pub(crate) fn resolve(
        file: FileVendors,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<VendorsConfig, ConfigError> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let d = VendorsConfig::default();
        let enabled = match env(ENV_VENDORS) {
            None => file.enabled.unwrap_or(d.enabled),
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "on" | "true" | "1" => true,
                "off" | "false" | "0" => false,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{ENV_VENDORS} must be on or off, not {v:?}"
                    )))
                }
            },
        };
        let files = match env(ENV_VENDOR_FILES) {
            Some(list) => list
                .split([',', ':'])
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => file.files.unwrap_or(d.files),
        };
        if let Some(empty) = files.iter().find(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid(format!(
                "vendors.files holds an empty path ({empty:?})"
            )));
        }
        Ok(VendorsConfig { enabled, files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(file: &str, env: &[(&str, &str)]) -> Result<VendorsConfig, ConfigError> {
        let f: FileVendors = toml::from_str(file).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        VendorsConfig::resolve(f, &|k| env.get(k).cloned())
    }

    #[test]
    fn on_by_default_without_files() {
        assert_eq!(resolve("", &[]).unwrap(), VendorsConfig::default());
        assert!(VendorsConfig::default().enabled);
    }

    #[test]
    fn the_file_sets_them_and_the_environment_wins() {
        let file = "enabled = false\nfiles = [\"/etc/oui.csv\", \"/etc/mam.csv\"]\n";
        let c = resolve(file, &[]).unwrap();
        assert!(!c.enabled);
        assert_eq!(
            c.files,
            [PathBuf::from("/etc/oui.csv"), PathBuf::from("/etc/mam.csv")]
        );
        let c = resolve(
            file,
            &[
                (ENV_VENDORS, "on"),
                (ENV_VENDOR_FILES, "/a/oui.csv, /a/mam.csv:/a/oui36.csv,"),
            ],
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(
            c.files,
            [
                PathBuf::from("/a/oui.csv"),
                PathBuf::from("/a/mam.csv"),
                PathBuf::from("/a/oui36.csv")
            ]
        );
        for off in ["off", "OFF", "false", "0"] {
            assert!(
                !resolve("", &[(ENV_VENDORS, off)]).unwrap().enabled,
                "{off}"
            );
        }
        // Empty variables are unset.
        let c = resolve(file, &[(ENV_VENDORS, ""), (ENV_VENDOR_FILES, "")]).unwrap();
        assert!(!c.enabled);
        assert_eq!(c.files.len(), 2);
    }

    #[test]
    fn bad_values_are_explained() {
        let err = resolve("", &[(ENV_VENDORS, "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("NETPILOT_VENDORS must be on or off"), "{err}");
        let err = resolve("files = [\"\"]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("vendors.files"), "{err}");
    }
}
