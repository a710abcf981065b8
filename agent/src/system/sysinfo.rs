//! `GET /api/scan/router`: what the router is and how it is doing, from `/proc` and
//! OpenWrt's files. Parsers are pure; `collect` reads through [`Files`], so it works
//! on any Linux and on the simulated router alike.

use serde::Serialize;

use super::files::Files;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterInfo {
    pub hostname: Option<String>,
    pub model: Option<String>,
    /// Present on OpenWrt only.
    pub openwrt: Option<OpenWrtRelease>,
    pub kernel: Option<String>,
    pub uptime_s: Option<u64>,
    pub load: Option<LoadAvg>,
    pub memory: Option<Memory>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpenWrtRelease {
    pub distribution: Option<String>,
    pub release: Option<String>,
    pub revision: Option<String>,
    pub target: Option<String>,
    pub arch: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadAvg {
    #[serde(rename = "1m")]
    pub one: f64,
    #[serde(rename = "5m")]
    pub five: f64,
    #[serde(rename = "15m")]
    pub fifteen: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: Option<u64>,
    pub buffers_bytes: Option<u64>,
    pub cached_bytes: Option<u64>,
}

/// Reads every source; a missing or unreadable one leaves its field `null`.
pub fn collect(files: &dyn Files) -> RouterInfo {
    let read = |p: &str| files.read_to_string(p).ok();
    RouterInfo {
        hostname: read("/proc/sys/kernel/hostname").and_then(first_line),
        model: read("/tmp/sysinfo/model")
            .or_else(|| read("/sys/firmware/devicetree/base/model"))
            .or_else(|| read("/sys/class/dmi/id/product_name"))
            .and_then(first_line),
        openwrt: read("/etc/openwrt_release").map(|t| parse_openwrt_release(&t)),
        kernel: read("/proc/sys/kernel/osrelease").and_then(first_line),
        uptime_s: read("/proc/uptime").and_then(|t| parse_uptime(&t)),
        load: read("/proc/loadavg").and_then(|t| parse_loadavg(&t)),
        memory: read("/proc/meminfo").and_then(|t| parse_meminfo(&t)),
    }
}

fn first_line(s: String) -> Option<String> {
    // Device-tree strings end in NUL.
    let line = s
        .lines()
        .next()?
        .trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!line.is_empty()).then(|| line.to_owned())
}

/// `/etc/openwrt_release` is shell assignments: `DISTRIB_RELEASE='23.05.3'`.
pub fn parse_openwrt_release(text: &str) -> OpenWrtRelease {
    let mut r = OpenWrtRelease::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        let slot = match key.trim() {
            "DISTRIB_ID" => &mut r.distribution,
            "DISTRIB_RELEASE" => &mut r.release,
            "DISTRIB_REVISION" => &mut r.revision,
            "DISTRIB_TARGET" => &mut r.target,
            "DISTRIB_ARCH" => &mut r.arch,
            "DISTRIB_DESCRIPTION" => &mut r.description,
            _ => continue,
        };
        *slot = Some(value);
    }
    r
}

fn unquote(v: &str) -> String {
    for q in ['\'', '"'] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_owned();
        }
    }
    v.to_owned()
}

pub fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

pub fn parse_loadavg(text: &str) -> Option<LoadAvg> {
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
    Some(LoadAvg {
        one: it.next()?.ok()?,
        five: it.next()?.ok()?,
        fifteen: it.next()?.ok()?,
    })
}

/// `/proc/meminfo` values are in KiB.
pub fn parse_meminfo(text: &str) -> Option<Memory> {
    let get = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    };
    Some(Memory {
        total_bytes: get("MemTotal")?,
        free_bytes: get("MemFree")?,
        available_bytes: get("MemAvailable"),
        buffers_bytes: get("Buffers"),
        cached_bytes: get("Cached"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::files::{MemFiles, RealFiles};

    const RELEASE: &str = "DISTRIB_ID='OpenWrt'\nDISTRIB_RELEASE='23.05.3'\nDISTRIB_REVISION='r23809-234f1a2efa'\nDISTRIB_TARGET='ramips/mt7621'\nDISTRIB_ARCH='mipsel_24kc'\nDISTRIB_DESCRIPTION='OpenWrt 23.05.3 r23809-234f1a2efa'\nDISTRIB_TAINTS=''\n";

    #[test]
    fn parses_openwrt_release() {
        let r = parse_openwrt_release(RELEASE);
        assert_eq!(r.release.as_deref(), Some("23.05.3"));
        assert_eq!(r.arch.as_deref(), Some("mipsel_24kc"));
        assert_eq!(
            r.description.as_deref(),
            Some("OpenWrt 23.05.3 r23809-234f1a2efa")
        );
        assert_eq!(
            parse_openwrt_release("DISTRIB_RELEASE=\"SNAPSHOT\"")
                .release
                .as_deref(),
            Some("SNAPSHOT")
        );
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350735));
        assert_eq!(parse_uptime("garbage"), None);
        let l = parse_loadavg("0.15 0.09 0.03 1/124 4321\n").unwrap();
        assert_eq!((l.one, l.five, l.fifteen), (0.15, 0.09, 0.03));
        assert!(parse_loadavg("0.1").is_none());
        let m = parse_meminfo("MemTotal:         124036 kB\nMemFree:           61708 kB\nMemAvailable:      58624 kB\nBuffers:            2944 kB\nCached:            17192 kB\n").unwrap();
        assert_eq!(m.total_bytes, 124036 * 1024);
        assert_eq!(m.available_bytes, Some(58624 * 1024));
        // Old kernels have no MemAvailable.
        let m = parse_meminfo("MemTotal: 1 kB\nMemFree: 1 kB\n").unwrap();
        assert_eq!(m.available_bytes, None);
    }

    #[test]
    fn collect_degrades_per_field() {
        let files = MemFiles::default()
            .with("/proc/sys/kernel/hostname", "OpenWrt\n")
            .with(
                "/sys/firmware/devicetree/base/model",
                "Xiaomi Mi Router 4A Gigabit Edition\0",
            )
            .with("/etc/openwrt_release", RELEASE)
            .with("/proc/uptime", "12.5 3.0\n");
        let info = collect(&files);
        assert_eq!(info.hostname.as_deref(), Some("OpenWrt"));
        assert_eq!(
            info.model.as_deref(),
            Some("Xiaomi Mi Router 4A Gigabit Edition")
        );
        assert_eq!(info.uptime_s, Some(12));
        assert!(info.memory.is_none() && info.load.is_none() && info.kernel.is_none());
    }

    #[test]
    fn works_on_this_linux_host() {
        let info = collect(&RealFiles::default());
        assert!(info.kernel.is_some());
        assert!(info.uptime_s.is_some());
        assert!(info.memory.unwrap().total_bytes > 0);
    }
}
