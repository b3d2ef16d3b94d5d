//! Sharing the CPU with other processes: before each decode, the engine asks [`CoreShare`]
//! whether the threads it wants are free, and runs the decode on one thread when they are not.
//!
//! Why: llama.cpp's threads meet at a barrier after every operation of the graph (hundreds per
//! token). When another process keeps a core busy, one of them is always waiting for a
//! descheduled partner, and a decode that takes 4 ms on two idle cores takes tens of ms — slower
//! than one thread alone. Measured on 2 cores with a competing `yes`: 4 sequences batched on 2
//! threads fell from ~245 to ~55-65 tokens/s (whatever the OpenMP spin count), while one thread
//! kept ~150.
//!
//! How: every [`SAMPLE_EVERY`] the share reads `/proc/stat` (CPU time of the whole machine) and
//! `/proc/self/stat` (this process's), and keeps how many cores *other* processes used over the
//! last interval. A decode may use `n` threads when `others + n <= cores + 0.5`; otherwise it
//! runs on one. The switch is OpenMP's `max-active-levels` ICV (0 = every parallel region runs
//! with a team of one; ggml reads the team size OpenMP gives it), so nothing in llama.cpp's
//! context has to change between decodes.

use std::{
    ffi::c_int,
    time::{Duration, Instant},
};

/// How often the machine's CPU use is sampled (at most).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

unsafe extern "C" {
    // libgomp, linked by llama.cpp's OpenMP build.
    fn omp_set_max_active_levels(levels: c_int);
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// Busy and total jiffies of the whole machine (all CPUs).
    busy: u64,
    total: u64,
    /// This process's CPU time, in jiffies.
    own: u64,
}

/// Decides whether a decode may run on several threads.
#[derive(Debug)]
pub struct CoreShare {
    cores: f64,
    enabled: bool,
    last: Option<Sample>,
    /// Cores other processes kept busy over the last interval.
    others: f64,
    /// Whether OpenMP currently runs parallel regions with more than one thread.
    parallel: bool,
    /// Decodes that wanted several threads: how many got them, how many ran on one.
    pub shared: u64,
    pub narrowed: u64,
    /// Where samples come from: `/proc` (tests feed synthetic ones).
    read: fn(Instant) -> Option<Sample>,
}

impl CoreShare {
    /// `enabled = false` never restricts (the configured thread counts always apply).
    pub fn new(enabled: bool) -> CoreShare {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        CoreShare { cores, enabled, last: None, others: 0.0, parallel: true, shared: 0, narrowed: 0, read: read_sample }
    }

    /// Cores other processes used over the last sampled interval.
    pub fn others(&self) -> f64 {
        self.others
    }

    /// Call before a decode that llama.cpp will run on `threads` threads. Returns whether it
    /// may (else OpenMP has been told to run it on one).
    pub fn before_decode(&mut self, threads: usize) -> bool {
        let want = threads > 1 && (!self.enabled || self.free_for(threads));
        if threads > 1 {
            if want { self.shared += 1 } else { self.narrowed += 1 }
        }
        if want != self.parallel {
            // SAFETY: sets a libgomp global; called from the engine thread between decodes,
            // never while a parallel region is running.
            unsafe { omp_set_max_active_levels(if want { 1 } else { 0 }) };
            self.parallel = want;
        }
        want
    }

    fn free_for(&mut self, threads: usize) -> bool {
        self.refresh();
        self.others + threads as f64 <= self.cores + 0.5
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l.at) < SAMPLE_EVERY) {
            return;
        }
        let Some(s) = (self.read)(now) else { return };
        if let Some(l) = self.last {
            let total = s.total.saturating_sub(l.total) as f64;
            if total > 0.0 {
                let busy = s.busy.saturating_sub(l.busy) as f64;
                let own = s.own.saturating_sub(l.own) as f64;
                self.others = ((busy - own).max(0.0) / total * self.cores).clamp(0.0, self.cores);
            }
        }
        self.last = Some(s);
    }
}

fn read_sample(at: Instant) -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (busy, total) = parse_cpu_line(stat.lines().next()?)?;
    Some(Sample { at, busy, total, own: parse_own_jiffies(&own)? })
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice` → (busy, total).
/// Guest time is already counted in user/nice.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// utime + stime (fields 14 and 15) of `/proc/self/stat`; the command name (field 2) may hold
/// spaces, so fields are counted after its closing parenthesis.
fn parse_own_jiffies(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let (busy, total) = parse_cpu_line("cpu  100 5 50 1000 20 1 2 3 0 0").unwrap();
        assert_eq!(total, 1181);
        assert_eq!(busy, 1181 - 1020);
        assert!(parse_cpu_line("cpu0 1 2 3 4 5").is_none());
        assert!(parse_cpu_line("cpu  1 2").is_none());
    }

    #[test]
    fn parses_own_time_past_a_command_with_spaces() {
        let stat = "4242 (koubou (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_own_jiffies(stat), Some(42));
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_own_jiffies(&real).is_some());
    }

    #[test]
    fn one_thread_is_always_allowed_and_disabled_share_never_restricts() {
        let mut s = CoreShare::new(false);
        assert!(s.before_decode(2));
        assert!(!s.before_decode(1));
        assert!(s.before_decode(2));
    }

    thread_local! {
        /// Synthetic `(busy, total, own)` jiffies for [`fed`], one per sample.
        static FEED: std::cell::RefCell<std::collections::VecDeque<(u64, u64, u64)>> = Default::default();
    }

    /// The next synthetic reading, stamped one interval back so that every decode takes one.
    fn fed(now: Instant) -> Option<Sample> {
        let (busy, total, own) = FEED.with(|f| f.borrow_mut().pop_front())?;
        Some(Sample { at: now.checked_sub(SAMPLE_EVERY)?, busy, total, own })
    }

    /// A share on 2 cores that reads `readings` instead of `/proc`.
    fn share_fed(readings: &[(u64, u64, u64)]) -> CoreShare {
        FEED.with(|f| *f.borrow_mut() = readings.iter().copied().collect());
        let mut s = CoreShare::new(true);
        s.cores = 2.0; // as on the 2-core machines this was measured on, whatever runs the test
        s.read = fed;
        s
    }

    #[test]
    fn batches_go_to_one_thread_while_another_process_spins_and_back_after() {
        // Each interval the machine counts 20 jiffies (2 cores × 10).
        let mut s = share_fed(&[
            (0, 0, 0),    // the first sample: nothing to compare yet
            (10, 20, 0),  // another process keeps one core busy
            (20, 40, 0),  // still
            (20, 60, 0),  // it is gone: both cores idle
            (40, 80, 20), // only this process works: its own use never counts against it
        ]);
        assert!(s.before_decode(2), "no interval measured yet");
        assert!(!s.before_decode(2), "2 threads allowed while others used {:.2} of 2 cores", s.others());
        assert_eq!(s.others(), 1.0);
        assert!(!s.before_decode(2));
        assert!(s.before_decode(2), "2 threads never came back; others {:.2}", s.others());
        assert!(s.before_decode(2), "its own threads counted as another process: {:.2}", s.others());
        assert_eq!((s.shared, s.narrowed), (3, 2));
        // With no new reading the last decision stands.
        assert!(s.before_decode(2));
    }

    #[test]
    fn half_a_core_taken_still_leaves_room_for_two_threads() {
        // others + threads <= cores + 0.5: a process using half a core does not narrow a batch.
        let mut s = share_fed(&[(0, 0, 0), (5, 20, 0), (16, 40, 0)]);
        s.before_decode(2);
        assert!(s.before_decode(2), "others {:.2}", s.others());
        assert!(!s.before_decode(2), "others {:.2}", s.others());
    }

    #[test]
    fn a_busy_core_elsewhere_is_seen() {
        // The real `/proc`: a child process spinning on one core while this process idles.
        // Other work on the machine only adds to what is seen, so wait for the figure (with a
        // generous bound) rather than sampling once after a fixed pause.
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let mut s = CoreShare::new(true);
        s.refresh();
        let mut seen = 0.0f64;
        for _ in 0..100 {
            std::thread::sleep(SAMPLE_EVERY * 2);
            s.refresh();
            seen = seen.max(s.others());
            if seen > 0.6 {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen > 0.6, "a spinning process should count as about one busy core, saw {seen:.2}");
    }
}
