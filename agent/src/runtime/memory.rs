//! Giving freed memory back to the system. glibc keeps what a large call freed in
//! its heap (its mmap threshold grows with the blocks freed), so a burst of large
//! bodies would stay resident for good; musl (the router build) returns large
//! blocks by itself, so there this does nothing.

/// Asks the allocator to return free pages; called after a large request body is
/// done with (a few milliseconds at most, rarely).
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
