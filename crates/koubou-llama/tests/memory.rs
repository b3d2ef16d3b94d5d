//! Four concurrent generations share one copy of the weights (its own test binary, so the
//! process's memory is this test's alone).

mod common;

use common::{backend, greedy, request};
use koubou_backend::{Backend, CancellationToken, Discard};

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_model_in_memory_for_four_sequences() {
    let b = backend(4);
    let info = b.load().await.unwrap().clone();
    // One sequence first, so the weights are paged in.
    b.generate(request("Say hello.", greedy(16)), &Discard, CancellationToken::new()).await.unwrap();
    let rss_one = status_kb("VmRSS:");
    let runs = (0..4).map(|i| {
        let b = &b;
        async move {
            b.generate(
                request(&format!("Write a sentence about the number {i}."), greedy(48)),
                &Discard,
                CancellationToken::new(),
            )
            .await
            .unwrap()
        }
    });
    let outs = futures::future::join_all(runs).await;
    assert!(outs.iter().all(|g| g.usage.completion_tokens > 0));
    let peak = status_kb("VmHWM:");
    let grew_mb = peak.saturating_sub(rss_one) / 1024;
    let model_mb = info.size_bytes >> 20;
    eprintln!("rss after one sequence {} MB, peak with four {} MB, model {model_mb} MB", rss_one / 1024, peak / 1024);
    assert!(grew_mb < model_mb / 2, "memory grew by {grew_mb} MB for 4 sequences; the model is {model_mb} MB");
}
