//! Sharing the CPU with other processes: before each decode, the engine asks [`CoreShare`]
//! whether the threads it wants are free, and runs the decode on one thread when they are not.
//! This holds for every decode, a lone generating sequence's included: on an otherwise idle
//! machine it uses every core it was given, and the moment another process takes one, one.
//!
//! Why: llama.cpp's threads meet at a barrier after every operation of the graph (hundreds per
//! token). When another process keeps a core busy, one of them is always waiting for a
//! descheduled partner, and a decode that takes 4 ms on two idle cores takes tens of ms — slower
//! than one thread alone. Measured on 2 cores with a competing `yes`: 4 sequences batched on 2
//! threads fell from ~245 to ~55-65 tokens/s (whatever the OpenMP spin count), while one thread
//! kept ~150; one sequence on 2 threads fell to 4–14 tokens/s, on one thread it kept ~73.
//!
//! How: every [`SAMPLE_EVERY`] the share takes a [`Reading`] — `/proc/stat` (CPU time of the
//! whole machine) and `/proc/self/stat` (this process's) — and keeps how many cores *other*
//! processes used over the last interval. A decode may use `n` threads when
//! `others + n <= cores + 0.5`; otherwise it runs on one. While the decode runs on `n` threads
//! and another process becomes runnable, the kernel gives that process about a third of the two
//! cores (0.67 > 0.5): the next reading narrows. While it runs on one thread, the other process
//! has a whole core to itself (1.0): the share stays narrow until it stops. The switch is
//! OpenMP's `max-active-levels` ICV (0 = every parallel region runs with a team of one; ggml
//! reads the team size OpenMP gives it), so nothing in llama.cpp's context has to change between
//! decodes. (A team between one and `n` would need `llama_set_n_threads`, which llama-cpp-2
//! does not expose.)
//!
//! Where readings come from is a seam: [`CoreShare::with_source`] takes any function, so the
//! decision is tested on synthetic readings, without the real machine's `/proc`.

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

/// CPU time counters at one moment, in jiffies (any unit works, as long as it is the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// Busy time of the whole machine, all CPUs together.
    pub busy: u64,
    /// Busy plus idle time of the whole machine.
    pub total: u64,
    /// This process's CPU time.
    pub own: u64,
}

/// A source of readings: [`proc_reading`] on the real machine.
pub type Source = Box<dyn FnMut() -> Option<Reading> + Send>;

/// The threads a decode that wants `threads` may use, when other processes kept `others` of
/// `cores` busy: all of them if they fit beside the others (half a core of slack), else one.
/// More threads than cores are compared as `cores` (they cannot all run at once anyway).
pub fn allowed_threads(threads: usize, cores: f64, others: f64) -> usize {
    let fits = (threads as f64).min(cores);
    if threads <= 1 || others + fits <= cores + 0.5 { threads.max(1) } else { 1 }
}

/// Decides whether a decode may run on several threads.
pub struct CoreShare {
    cores: f64,
    enabled: bool,
    every: Duration,
    source: Source,
    last: Option<(Instant, Reading)>,
    /// Cores other processes kept busy over the last interval.
    others: f64,
    /// Whether OpenMP currently runs parallel regions with more than one thread.
    parallel: bool,
    /// Decodes that wanted several threads: how many got them, how many ran on one.
    pub shared: u64,
    pub narrowed: u64,
}

impl std::fmt::Debug for CoreShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreShare")
            .field("cores", &self.cores)
            .field("enabled", &self.enabled)
            .field("others", &self.others)
            .field("shared", &self.shared)
            .field("narrowed", &self.narrowed)
            .finish()
    }
}

impl CoreShare {
    /// On the real machine: every logical CPU, `/proc` sampled every [`SAMPLE_EVERY`].
    /// `enabled = false` never restricts (the configured thread counts always apply).
    pub fn new(enabled: bool) -> CoreShare {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        CoreShare::with_source(enabled, cores, SAMPLE_EVERY, Box::new(proc_reading))
    }

    /// With `cores` CPUs and readings from `source`, taken at most once per `every`
    /// (`Duration::ZERO`: at every decode).
    pub fn with_source(enabled: bool, cores: usize, every: Duration, source: Source) -> CoreShare {
        CoreShare {
            cores: cores.max(1) as f64,
            enabled,
            every,
            source,
            last: None,
            others: 0.0,
            parallel: true,
            shared: 0,
            narrowed: 0,
        }
    }

    /// Cores other processes used over the last sampled interval.
    pub fn others(&self) -> f64 {
        self.others
    }

    /// Call before a decode that llama.cpp will run on `threads` threads. Returns whether it
    /// may (else OpenMP has been told to run it on one).
    pub fn before_decode(&mut self, threads: usize) -> bool {
        let want = self.threads_for(threads) > 1;
        if want != self.parallel {
            // SAFETY: sets a libgomp global; called from the engine thread between decodes,
            // never while a parallel region is running.
            unsafe { omp_set_max_active_levels(if want { 1 } else { 0 }) };
            self.parallel = want;
        }
        want
    }

    /// The threads a decode that wants `threads` may use now (`threads`, or 1), counted in
    /// [`CoreShare::shared`] / [`CoreShare::narrowed`]. Takes a reading when one is due.
    pub fn threads_for(&mut self, threads: usize) -> usize {
        if threads <= 1 {
            return 1;
        }
        let n = if self.enabled {
            self.refresh();
            allowed_threads(threads, self.cores, self.others)
        } else {
            threads
        };
        if n > 1 {
            self.shared += 1
        } else {
            self.narrowed += 1
        }
        n
    }

    fn refresh(&mut self) {
        let now = Instant::now();
        if self.last.is_some_and(|(at, _)| now.duration_since(at) < self.every) {
            return;
        }
        let Some(s) = (self.source)() else { return };
        if let Some((_, l)) = self.last {
            let total = s.total.saturating_sub(l.total) as f64;
            if total > 0.0 {
                let busy = s.busy.saturating_sub(l.busy) as f64;
                let own = s.own.saturating_sub(l.own) as f64;
                self.others = ((busy - own).max(0.0) / total * self.cores).clamp(0.0, self.cores);
            }
        }
        self.last = Some((now, s));
    }
}

/// A reading of the real machine: `/proc/stat` and `/proc/self/stat`.
pub fn proc_reading() -> Option<Reading> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (busy, total) = parse_cpu_line(stat.lines().next()?)?;
    Some(Reading { busy, total, own: parse_own_jiffies(&own)? })
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

    /// Readings of a 2-core machine, 10 jiffies per core per interval: each step says how many
    /// cores other processes and this one kept busy over it.
    fn two_cores(steps: &[(f64, f64)]) -> Source {
        let mut at = Reading { busy: 1_000, total: 10_000, own: 50 };
        let mut readings = vec![at];
        for &(others, own) in steps {
            at.total += 20;
            at.busy += ((others + own) * 10.0).round() as u64;
            at.own += (own * 10.0).round() as u64;
            readings.push(at);
        }
        let mut it = readings.into_iter();
        Box::new(move || it.next())
    }

    #[test]
    fn the_rule_gives_every_core_while_others_leave_them_idle() {
        // 2 cores: idle, a little background work, and another process sharing them.
        assert_eq!(allowed_threads(2, 2.0, 0.0), 2);
        assert_eq!(allowed_threads(2, 2.0, 0.4), 2);
        assert_eq!(allowed_threads(2, 2.0, 0.67), 1, "a competitor given a third of two cores");
        assert_eq!(allowed_threads(2, 2.0, 1.0), 1, "a competitor holding a whole core");
        assert_eq!(allowed_threads(1, 2.0, 0.0), 1);
        assert_eq!(allowed_threads(0, 2.0, 0.0), 1);
        // More threads than cores are judged as every core.
        assert_eq!(allowed_threads(4, 2.0, 0.0), 4);
        assert_eq!(allowed_threads(4, 2.0, 1.0), 1);
        // 8 cores, one busy elsewhere: 7 threads fit, 8 do not.
        assert_eq!(allowed_threads(7, 8.0, 1.0), 7);
        assert_eq!(allowed_threads(8, 8.0, 1.0), 1);
    }

    #[test]
    fn a_lone_sequence_narrows_when_another_process_takes_a_core_and_widens_after() {
        let steps = [
            (0.0, 2.0),   // idle machine, our two threads busy
            (0.05, 1.95), // a little background noise
            (0.67, 1.33), // a competitor starts: the kernel gives it a third of the cores
            (1.0, 1.0),   // we run one thread; it holds a whole core
            (1.0, 1.0),
            (0.0, 1.0), // it stopped
            (0.0, 2.0),
        ];
        let mut share = CoreShare::with_source(true, 2, Duration::ZERO, two_cores(&steps));
        // The first decode has one reading, no interval yet: nothing says the cores are taken.
        let got: Vec<usize> = (0..=steps.len()).map(|_| share.threads_for(2)).collect();
        assert_eq!(got, [2, 2, 2, 1, 1, 1, 2, 2]);
        assert_eq!((share.shared, share.narrowed), (5, 3));
        // One token at a time on one thread is never counted: it asked for nothing more.
        assert_eq!(share.threads_for(1), 1);
        assert_eq!((share.shared, share.narrowed), (5, 3));
    }

    #[test]
    fn without_readings_the_last_decision_stands_and_disabled_never_narrows() {
        let mut share = CoreShare::with_source(true, 2, Duration::ZERO, two_cores(&[(1.0, 1.0)]));
        assert_eq!(share.threads_for(2), 2);
        assert_eq!(share.threads_for(2), 1);
        assert!((share.others() - 1.0).abs() < 1e-9, "{}", share.others());
        // The source has run dry (an unreadable /proc): still narrow, as last measured.
        assert_eq!(share.threads_for(2), 1);
        assert_eq!(share.threads_for(2), 1);

        let mut off = CoreShare::with_source(false, 2, Duration::ZERO, two_cores(&[(2.0, 0.0), (2.0, 0.0)]));
        assert_eq!((off.threads_for(2), off.threads_for(2), off.threads_for(2)), (2, 2, 2));
        assert_eq!(off.others(), 0.0, "a disabled share does not even read");
    }

    #[test]
    fn readings_are_taken_at_most_once_per_interval() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let source: Source = Box::new(move || {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u64;
            Some(Reading { busy: 20 * n, total: 20 * n, own: 0 })
        });
        let mut share = CoreShare::with_source(true, 2, Duration::from_secs(3600), source);
        for _ in 0..100 {
            share.threads_for(2);
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

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
