//! Benchmarks the embedded engine: for 1 and 2 threads, with and without a competing CPU load (a
//! `timeout 600 yes >/dev/null` process, killed after each variant), prints prompt tokens/s,
//! generation tokens/s, first-token latency and peak RSS (VmHWM), for 1 sequence and for 4
//! concurrent sequences (aggregate). Same raw prompt, greedy, end-of-generation ignored, median
//! of `--runs` — the same terms as `scripts/bench-llama-cpp-python.py`, which `--compare PY`
//! runs right after each variant so both engines are measured in one run.
//!
//! ```text
//! cargo run -p koubou-llama --release --example bench_engine -- \
//!     --compare "$(scripts/ensure-llama-cpp-python.sh)"
//! ```
//! Options: `--model PATH` (else `$KOUBOU_TEST_MODEL`, else the store's default, pulled if
//! missing), `--threads 1,2`, `--batch-threads N` (default: each `--threads` value),
//! `--share-cores yes|no` (default no), `--weights auto|original|q4_0|q8_0|iq4_nl` (default
//! original), `--kv-cache q8_0|f16` (default f16), `--tokens 128`, `--runs 5`, `--parallel 4`,
//! `--loads no,yes`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use koubou_backend::CancellationToken;
use koubou_llama::{Engine, EngineConfig, Event, JobSpec, KvCache, ModelStore, Prompt, Weights};

/// Keep in sync with BENCH_PROMPT in scripts/bench-llama-cpp-python.py.
const BENCH_PROMPT: &str = "<|im_start|>system\nYou are a helpful assistant who writes clear, detailed and well organised \
explanations for curious readers.<|im_end|>\n<|im_start|>user\nExplain step by step how a \
bicycle works: describe the frame, the wheels, the chain and the gears, the brakes, and how the \
rider keeps balance while moving. Then give three practical tips for keeping a bicycle in good \
condition through the winter.<|im_end|>\n<|im_start|>assistant\n";

struct Args {
    model: Option<PathBuf>,
    threads: Vec<usize>,
    loads: Vec<bool>,
    tokens: u32,
    runs: usize,
    parallel: usize,
    compare: Option<String>,
    batch_threads: Option<usize>,
    share_cores: bool,
    weights: Weights,
    kv_cache: KvCache,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        threads: vec![1, 2],
        loads: vec![false, true],
        tokens: 128,
        runs: 5,
        parallel: 4,
        compare: None,
        batch_threads: None,
        share_cores: false,
        weights: Weights::Original,
        kv_cache: KvCache::F16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(val()?)),
            "--threads" => {
                a.threads = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--loads" => a.loads = val()?.split(',').map(|s| s.trim() == "yes").collect(),
            "--tokens" => a.tokens = val()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--runs" => a.runs = val()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--parallel" => a.parallel = val()?.parse().map_err(|e| format!("--parallel: {e}"))?,
            "--compare" => a.compare = Some(val()?),
            "--batch-threads" => a.batch_threads = Some(val()?.parse().map_err(|e| format!("--batch-threads: {e}"))?),
            "--share-cores" => a.share_cores = val()? == "yes",
            "--weights" => {
                let v = val()?;
                a.weights = Weights::parse(&v).ok_or_else(|| format!("--weights: unknown {v:?}"))?
            }
            "--kv-cache" => {
                let v = val()?;
                a.kv_cache = KvCache::parse(&v).ok_or_else(|| format!("--kv-cache: unknown {v:?}"))?
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.runs == 0 || a.tokens < 2 || a.parallel == 0 {
        return Err("--runs >= 1, --tokens >= 2 and --parallel >= 1 please".into());
    }
    Ok(a)
}

/// Timings of one sequence: when it was submitted, and when each token arrived.
struct Trace {
    start: Instant,
    stamps: Vec<Instant>,
    prompt_tokens: u32,
}

fn run_batch(engine: &Engine, n: usize, tokens: u32) -> Result<Vec<Trace>, String> {
    let spec = JobSpec {
        prompt: Prompt::Raw(BENCH_PROMPT.into()),
        max_tokens: tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: None,
        stop: vec![],
        ignore_eos: true,
        grammar: None,
    };
    let start = Instant::now();
    let rxs = (0..n)
        .map(|_| engine.submit(spec.clone(), CancellationToken::new()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || -> Result<Trace, String> {
                let mut stamps = Vec::with_capacity(tokens as usize);
                loop {
                    match rx.blocking_recv() {
                        Some(Event::Token(_)) => stamps.push(Instant::now()),
                        Some(Event::Done(f)) => {
                            // The last token's text comes with Done's flush; count it once.
                            if stamps.len() < f.completion_tokens as usize {
                                stamps.push(Instant::now());
                            }
                            return Ok(Trace { start, stamps, prompt_tokens: f.prompt_tokens });
                        }
                        Some(Event::Failed(e)) => return Err(e.to_string()),
                        None => return Err("engine went away".into()),
                    }
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().map_err(|_| "reader panicked".to_string())?).collect()
}

struct Figures {
    prompt_tps: f64,
    gen_tps: f64,
    first_token_s: f64,
}

fn figures(traces: &[Trace]) -> Figures {
    let start = traces[0].start;
    let first_max = traces.iter().map(|t| t.stamps[0]).max().expect("non-empty");
    let last = traces.iter().map(|t| *t.stamps.last().expect("non-empty")).max().expect("non-empty");
    let prompt_tokens: u32 = traces.iter().map(|t| t.prompt_tokens).sum();
    let generated: usize = traces.iter().map(|t| t.stamps.len() - 1).sum();
    let first = (first_max - start).as_secs_f64();
    Figures {
        prompt_tps: f64::from(prompt_tokens) / first,
        gen_tps: generated as f64 / (last - first_max).as_secs_f64(),
        first_token_s: first,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn start_load() -> Result<Child, String> {
    // `timeout` bounds it even if this process dies; it must be stopped with SIGTERM (which it
    // forwards to `yes`), not SIGKILL (which would orphan `yes`).
    let child = Command::new("timeout")
        .args(["600", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the load process: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

fn stop_load(c: &mut Child) {
    let term = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
    if !term.is_ok_and(|s| s.success()) {
        let _ = c.kill();
    }
    let _ = c.wait();
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench_engine: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args = parse_args()?;
    let model = match args.model.clone().or_else(|| std::env::var_os("KOUBOU_TEST_MODEL").map(PathBuf::from)) {
        Some(p) => p,
        None => {
            let store = ModelStore::from_env().map_err(|e| e.to_string())?;
            store.ensure_default(&mut |p| eprintln!("{p:?}")).map_err(|e| e.to_string())?
        }
    };
    println!(
        "model {} | {} generated tokens, median of {} | cores {}",
        model.display(),
        args.tokens,
        args.runs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for &threads in &args.threads {
        let engine = Engine::start(EngineConfig {
            model_path: model.clone(),
            threads,
            batch_threads: args.batch_threads.unwrap_or(threads),
            parallel: args.parallel,
            context: 2048,
            batch: 512,
            weights: args.weights,
            kv_cache: args.kv_cache,
            share_cores: args.share_cores,
            // Every run processes its whole prompt: the prompt rate measured is llama.cpp's.
            cache_prompts: false,
            copies_dir: None,
        })
        .map_err(|e| e.to_string())?;
        let info = engine.info();
        println!(
            "serving {} (weights {}, kv cache {}), {} threads, {} for batches{}",
            info.served_path.display(),
            info.weights,
            info.kv_cache.as_str(),
            info.threads,
            info.batch_threads,
            if args.share_cores { " while the cores are free" } else { "" }
        );
        // Warm up (page in the weights).
        run_batch(&engine, 1, 8)?;
        for &load in &args.loads {
            let mut load_proc = if load { Some(start_load()?) } else { None };
            let result = (|| -> Result<(), String> {
                for n in [1, args.parallel] {
                    let mut runs = Vec::with_capacity(args.runs);
                    for _ in 0..args.runs {
                        runs.push(figures(&run_batch(&engine, n, args.tokens)?));
                    }
                    let p = median(runs.iter().map(|f| f.prompt_tps).collect());
                    let g = median(runs.iter().map(|f| f.gen_tps).collect());
                    let ft = median(runs.iter().map(|f| f.first_token_s).collect());
                    println!(
                        "koubou-llama     threads={threads} load={} seqs={n}: prompt {p:7.1} tok/s  gen {g:6.1} tok/s  first token {ft:.3} s  peak RSS {:.0} MB{}",
                        if load { "yes" } else { "no " },
                        vm_hwm_mb(),
                        if n > 1 { "  (aggregate)" } else { "" }
                    );
                }
                Ok(())
            })();
            if let Some(c) = load_proc.as_mut() {
                stop_load(c);
            }
            result?;
            if let Some(py) = &args.compare {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bench-llama-cpp-python.py");
                let mut cmd = Command::new(py);
                cmd.arg(script)
                    .arg("--model")
                    .arg(&model)
                    .args(["--threads", &threads.to_string()])
                    .args(["--tokens", &args.tokens.to_string()])
                    .args(["--runs", &args.runs.to_string()]);
                if load {
                    cmd.arg("--load");
                }
                let out = cmd.output().map_err(|e| format!("{py}: {e}"))?;
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    eprint!("{}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
    }
    Ok(())
}
