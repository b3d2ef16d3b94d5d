//! Free memory, for the pool's "don't scale up when memory is short" rule, and our own RSS.

/// `MemAvailable` from `/proc/meminfo`, in bytes; `None` where it cannot be read.
pub fn available_bytes() -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")
}

/// This process's resident set size in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:")
}

/// This process's peak resident set size in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM:")
}

fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_kb_lines() {
        assert_eq!(
            super::meminfo_field("MemTotal: 10 kB\nMemAvailable:    2048 kB\n", "MemAvailable:"),
            Some(2048 * 1024)
        );
        assert!(super::available_bytes().unwrap() > 0);
        assert!(super::rss_bytes().unwrap() > 0);
    }
}
