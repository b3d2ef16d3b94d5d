//! A lone sequence on two threads (what the engine now does on an idle 2-core machine) decodes
//! exactly what it decodes on one, on the real SmolLM2 (see `common::model_path`).

mod common;

use common::{config, greedy, request};
use koubou_backend::{Backend, CancellationToken, Discard, EmbeddedConfig};
use koubou_llama::{EmbeddedBackend, ModelStore};

/// One sequence slot, `threads` threads for it and for prompts, never narrowed by other work
/// on the machine (`share_cores = false`), so the decodes really run on that many threads.
fn backend(threads: usize) -> EmbeddedBackend {
    let cfg = EmbeddedConfig { threads: Some(threads), batch_threads: Some(threads), share_cores: false, ..config(1) };
    let store = ModelStore::new(std::env::temp_dir().join("koubou-llama-test-unused"));
    EmbeddedBackend::new("embedded", &cfg, &store).expect("backend")
}

/// Greedy answers (text and usage) to `prompts` from an engine with `threads` threads, run twice.
async fn answers(threads: usize, prompts: &[&str]) -> Vec<(koubou_backend::Generation, koubou_backend::Generation)> {
    // One llama.cpp backend per process at a time: each engine is dropped before the next starts.
    let b = backend(threads);
    assert_eq!(b.load().await.unwrap().threads, threads);
    let mut out = Vec::new();
    for p in prompts {
        let first = b.generate(request(p, greedy(96)), &Discard, CancellationToken::new()).await.unwrap();
        let again = b.generate(request(p, greedy(96)), &Discard, CancellationToken::new()).await.unwrap();
        out.push((first, again));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_generate_what_one_thread_generates() {
    let prompts = [
        "What is the capital of France? Answer in one word.",
        "Explain step by step how a bicycle works.",
        "Write a short poem about the sea.",
    ];
    let one = answers(1, &prompts).await;
    let two = answers(2, &prompts).await;
    for (p, ((a, _), (b, again))) in prompts.iter().zip(one.iter().zip(&two)) {
        assert!(a.usage.completion_tokens > 5, "{p}: {:?}", a.text);
        assert_eq!(b.text, a.text, "{p}: 2 threads differ from 1");
        assert_eq!(again.text, b.text, "{p}: 2 threads are not deterministic");
        assert_eq!(b.usage, a.usage);
    }
}
