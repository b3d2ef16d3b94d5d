//! Prompt caching (`cache_prompts`) on the real SmolLM2 (see `common::model_path`): a prompt
//! that shares a beginning with what a free slot's KV cache holds skips that part, and answers
//! exactly what it answers processed from its first token.

mod common;

use common::{config, greedy, request};
use koubou_backend::{Backend, CancellationToken, Discard, EmbeddedConfig, Generation};
use koubou_llama::{EmbeddedBackend, ModelStore};

fn backend(parallel: usize, cache_prompts: bool) -> EmbeddedBackend {
    // Fixed threads and no narrowing by other work on the machine: the arithmetic of every
    // decode is the same in both engines compared.
    let cfg = EmbeddedConfig {
        threads: Some(1),
        batch_threads: Some(1),
        share_cores: false,
        cache_prompts,
        ..config(parallel)
    };
    let store = ModelStore::new(std::env::temp_dir().join("koubou-llama-test-unused"));
    EmbeddedBackend::new("embedded", &cfg, &store).expect("backend")
}

async fn ask(b: &EmbeddedBackend, prompt: &str) -> Generation {
    b.generate(request(prompt, greedy(48)), &Discard, CancellationToken::new()).await.expect("generation")
}

fn cached(g: &Generation) -> u64 {
    g.usage.cache_read_tokens.expect("the embedded backend reports cached prompt tokens")
}

const PROMPTS: [&str; 4] = [
    "What is the capital of France? Answer in one word.",
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one word.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prefix_is_skipped_and_the_answers_are_those_of_an_uncached_engine() {
    // One llama.cpp backend per process at a time: each engine is dropped before the next starts.
    let fresh: Vec<Generation> = {
        let b = backend(1, false);
        let mut out = Vec::new();
        for p in PROMPTS {
            out.push(ask(&b, p).await);
        }
        out
    };
    for g in &fresh {
        assert_eq!(cached(g), 0, "without cache_prompts nothing is reused");
    }
    let b = backend(1, true);
    let mut with_cache = Vec::new();
    for p in PROMPTS {
        with_cache.push(ask(&b, p).await);
    }
    for ((p, f), c) in PROMPTS.iter().zip(&fresh).zip(&with_cache) {
        assert!(f.usage.completion_tokens > 0, "{p}: {:?}", f.text);
        assert_eq!(c.text, f.text, "{p}: a cached prefix changed the answer");
        assert_eq!(c.usage.prompt_tokens, f.usage.prompt_tokens, "{p}: every prompt token still counts");
    }
    let prompt_tokens = |i: usize| with_cache[i].usage.prompt_tokens;
    // The first prompt finds an empty cache.
    assert_eq!(cached(&with_cache[0]), 0);
    // The second shares the chat template and "What is the capital of France? Answer in one".
    let second = cached(&with_cache[1]);
    assert!(second > 10 && second < prompt_tokens(1) - 1, "{second} of {}", prompt_tokens(1));
    // The poem shares only the template's opening with the slot's content.
    let poem = cached(&with_cache[2]);
    assert!(poem > 0 && poem < second, "{poem}");
    // The first prompt again, after the poem took the only slot: the template's opening again.
    assert_eq!(cached(&with_cache[3]), poem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_asked_again_reuses_all_but_its_last_token_in_the_slot_that_kept_it() {
    let b = backend(2, true);
    let first = ask(&b, PROMPTS[0]).await;
    // An unrelated prompt goes to the other, least recently used slot…
    ask(&b, PROMPTS[2]).await;
    // …so the first prompt's slot still holds it.
    let again = ask(&b, PROMPTS[0]).await;
    assert_eq!(cached(&again), again.usage.prompt_tokens - 1);
    assert_eq!(again.text, first.text);
}
