//! Generation against the real SmolLM2-135M-Instruct GGUF (see `common::model_path`).

mod common;

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use common::{Collect, backend, greedy, request};
use koubou_backend::{Backend, BackendError, CancellationToken, Discard, GenOptions};
use koubou_llama::EmbeddedBackend;

/// One backend (one model, 4 sequences) shared by every test in this file.
fn shared() -> &'static EmbeddedBackend {
    static B: OnceLock<EmbeddedBackend> = OnceLock::new();
    B.get_or_init(|| backend(4))
}

async fn generate(prompt: &str, options: GenOptions) -> koubou_backend::Generation {
    shared().generate(request(prompt, options), &Discard, CancellationToken::new()).await.expect("generation")
}

const FRANCE: &str = "What is the capital of France? Answer in one word.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_is_deterministic_and_knows_paris() {
    let a = generate(FRANCE, greedy(64)).await;
    let b = generate(FRANCE, greedy(64)).await;
    assert!(!a.text.trim().is_empty());
    assert_eq!(a.text, b.text);
    assert!(a.text.contains("Paris"), "{:?}", a.text);
    assert_eq!(a.finish_reason, "stop");
    assert!(a.usage.prompt_tokens > 10, "{:?}", a.usage);
    assert!(a.usage.completion_tokens >= 1);
    assert_eq!(a.model, shared().default_model());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible() {
    let opts = |seed| GenOptions {
        max_tokens: Some(40),
        temperature: Some(1.0),
        top_p: Some(0.95),
        seed: Some(seed),
        ..GenOptions::default()
    };
    let prompt = "Write a short poem about the sea.";
    let a = generate(prompt, opts(42)).await;
    let b = generate(prompt, opts(42)).await;
    assert_eq!(a.text, b.text);
    let others = [
        generate(prompt, opts(1)).await.text,
        generate(prompt, opts(2)).await.text,
        generate(prompt, opts(3)).await.text,
    ];
    assert!(others.iter().any(|t| *t != a.text), "different seeds should give different text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_concatenate_to_the_text() {
    for prompt in ["Tell me about cats in three sentences.", "Say 'thank you' in Japanese, Chinese and French."] {
        let sink = Collect::default();
        let g = shared().generate(request(prompt, greedy(80)), &sink, CancellationToken::new()).await.unwrap();
        assert_eq!(sink.joined(), g.text);
        assert!(sink.0.lock().unwrap().iter().all(|p| !p.is_empty()));
        assert!(!g.text.contains('\u{FFFD}'), "{:?}", g.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let prompt = "Count from 1 to 30, separated by commas.";
    let full = generate(prompt, greedy(120)).await.text;
    // A stop string taken from the middle of the greedy answer: the answer must end right
    // before its first occurrence.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let at = full.find(&stop).unwrap();
    let sink = Collect::default();
    let opts = GenOptions { stop: vec!["never-there".into(), stop.clone()], ..greedy(120) };
    let g = shared().generate(request(prompt, opts), &sink, CancellationToken::new()).await.unwrap();
    assert_eq!(g.text, full[..at], "stop {stop:?}");
    assert_eq!(g.finish_reason, "stop");
    assert_eq!(sink.joined(), g.text, "the stop string is not streamed either");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_is_honoured() {
    let g = generate("Write a long story about a dragon.", greedy(5)).await;
    assert_eq!(g.usage.completion_tokens, 5);
    assert_eq!(g.finish_reason, "length");
    let longer = generate("Write a long story about a dragon.", greedy(20)).await;
    assert!(longer.text.starts_with(&g.text), "{:?} / {:?}", g.text, longer.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_returns_promptly() {
    let cancel = CancellationToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let sink = {
        let (cancel, seen) = (cancel.clone(), seen.clone());
        move |_: &str| {
            if seen.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                cancel.cancel();
            }
        }
    };
    let opts = GenOptions { max_tokens: Some(1500), temperature: Some(0.0), ..GenOptions::default() };
    let r = shared().generate(request("Write a very long story about a dragon.", opts), &sink, cancel).await;
    assert!(matches!(r, Err(BackendError::Cancelled)), "{r:?}");
    // Promptly means no token after the cancel (counted, not timed: a busy machine changes
    // how long a step takes, not how many steps run).
    assert_eq!(seen.load(Ordering::SeqCst), 5, "tokens kept streaming after the cancel");
    // A token that fired before the call starts: nothing runs.
    let pre = CancellationToken::new();
    pre.cancel();
    assert!(matches!(shared().generate(request(FRANCE, greedy(8)), &Discard, pre).await, Err(BackendError::Cancelled)));
    // The engine still serves.
    assert!(generate(FRANCE, greedy(16)).await.text.contains("Paris"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_equal_their_solo_outputs() {
    let prompts = [
        "What is the capital of France? Answer in one word.",
        "List three colours of the rainbow.",
        "Write one sentence about the moon.",
        "What is 2 + 2? Explain briefly.",
    ];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(generate(p, greedy(48)).await.text);
    }
    for n in [2, 4] {
        let runs = prompts[..n].iter().map(|p| generate(p, greedy(48)));
        let together = futures::future::join_all(runs).await;
        for (i, g) in together.iter().enumerate() {
            assert_eq!(g.text, solo[i], "prompt {i} with {n} at once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected() {
    let b = shared();
    let nul = b.generate(request("a\0b", greedy(4)), &Discard, CancellationToken::new()).await;
    assert!(matches!(nul, Err(BackendError::Rejected { status: 400, .. })), "{nul:?}");
    let long = "word ".repeat(5000);
    let r = b.generate(request(&long, greedy(4)), &Discard, CancellationToken::new()).await;
    assert!(matches!(r, Err(BackendError::Rejected { status: 400, .. })), "{r:?}");
    let temp = GenOptions { temperature: Some(-1.0), ..GenOptions::default() };
    let r = b.generate(request(FRANCE, temp), &Discard, CancellationToken::new()).await;
    assert!(matches!(r, Err(BackendError::Rejected { .. })), "{r:?}");
    let mut other = request(FRANCE, greedy(4));
    other.model = "some-other-model".into();
    let r = b.generate(other, &Discard, CancellationToken::new()).await;
    assert!(matches!(r, Err(BackendError::ModelMissing { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_the_loaded_file() {
    let b = shared();
    b.load().await.unwrap();
    let h = b.health().await;
    assert!(h.up, "{h:?}");
    let file = common::model_path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(h.detail.contains(&file), "{h:?}");
    assert_eq!(b.capacity(), 4);
    assert_eq!(b.kind(), "embedded");
}
