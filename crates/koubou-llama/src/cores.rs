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
}

impl CoreShare {
    /// `enabled = false` never restricts (the configured thread counts always apply).
    pub fn new(enabled: bool) -> CoreShare {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        CoreShare { cores, enabled, last: None, others: 0.0, parallel: true, shared: 0, narrowed: 0 }
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
        let Some(s) = read_sample(now) else { return };
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

    #[test]
    fn batches_go_to_one_thread_while_another_process_spins_and_back_after() {
        let mut s = CoreShare::new(true);
        s.cores = 2.0; // as on the 2-core machines this was measured on, whatever runs the test
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        s.before_decode(2);
        std::thread::sleep(Duration::from_millis(600));
        let while_busy = s.before_decode(2);
        let others = s.others();
        let _ = child.kill();
        let _ = child.wait();
        assert!(!while_busy, "2 threads allowed while others used {others:.2} of 2 cores");
        // Once the spinner is gone the cores come back (other tests may run beside this one, so
        // allow a few intervals).
        let back = (0..30).any(|_| {
            std::thread::sleep(SAMPLE_EVERY + Duration::from_millis(20));
            s.before_decode(2)
        });
        assert!(back || s.others() > 1.0, "2 threads never came back; others {:.2}", s.others());
    }

    #[test]
    fn a_busy_core_elsewhere_is_seen() {
        // A child process spinning on one core; this process idles.
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let mut s = CoreShare::new(true);
        s.refresh();
        std::thread::sleep(Duration::from_millis(600));
        s.refresh();
        let others = s.others();
        let _ = child.kill();
        let _ = child.wait();
        assert!(others > 0.6, "a spinning process should count as about one busy core, saw {others:.2}");
    }
}
