//! The kernel's own time-zone setting. nftables' `meta day` is computed by the
//! kernel from `sys_tz.tz_minuteswest` (set at boot by some systems, 0 on most),
//! so the schedule compiler needs it; `gettimeofday` is the only way to read it.

/// `struct timezone` of gettimeofday(2); the libc crate keeps it opaque.
#[repr(C)]
struct Timezone {
    tz_minuteswest: libc::c_int,
    tz_dsttime: libc::c_int,
}

/// Minutes west of UTC the kernel applies to `meta day`.
pub fn kernel_minutes_west() -> i32 {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut tz = Timezone {
        tz_minuteswest: 0,
        tz_dsttime: 0,
    };
    // SAFETY: both pointers are to live, writable values of the types the call
    // expects; it writes nothing else.
    let rc = unsafe { libc::gettimeofday(&mut tv, (&mut tz as *mut Timezone).cast()) };
    if rc == 0 {
        tz.tz_minuteswest
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_plausible_value() {
        let west = super::kernel_minutes_west();
        assert!((-14 * 60..=12 * 60).contains(&west), "{west}");
    }
}
