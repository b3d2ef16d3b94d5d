//! Serving the real SmolLM2 (stored as Q4_1) re-encoded into another weight format (its own
//! test binary: it loads its own engine).

mod common;

use common::{config, greedy, request};
use koubou_backend::{Backend, CancellationToken, Discard, EmbeddedConfig};
use koubou_llama::{EmbeddedBackend, ModelStore, transcode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_q4_1_model_served_as_q8_0_answers_the_same_question() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ModelStore::new(store_dir.path());
    let cfg = EmbeddedConfig { weights: "q8_0".into(), ..config(2) };
    let b = EmbeddedBackend::new("embedded", &cfg, &store).expect("backend");
    let info = b.load().await.expect("load").clone();

    // The copy sits in the store's copies directory, the original is untouched, and the engine
    // says what it serves.
    assert_eq!(transcode::file_type(&common::model_path()), Some(3), "the default model is Q4_1");
    assert!(info.served_path.starts_with(store.copies_dir()), "{}", info.served_path.display());
    assert_eq!(transcode::file_type(&info.served_path), Some(7), "the copy is Q8_0");
    assert_eq!(info.weights, "q8_0, re-encoded from q4_1");
    assert_eq!(info.path, common::model_path());
    let h = b.health().await;
    assert!(h.detail.contains("weights q8_0, re-encoded from q4_1"), "{}", h.detail);

    let g = b
        .generate(
            request("What is the capital of France? Answer in one word.", greedy(8)),
            &Discard,
            CancellationToken::new(),
        )
        .await
        .expect("generation");
    assert!(g.text.contains("Paris"), "{:?}", g.text);

    // A second backend reuses the copy instead of writing it again.
    let modified = std::fs::metadata(&info.served_path).unwrap().modified().unwrap();
    let again =
        transcode::ensure_copy(&common::model_path(), transcode::WeightFormat::Q8_0, Some(&store.copies_dir()), 1)
            .expect("copy");
    assert_eq!(again, info.served_path);
    assert_eq!(std::fs::metadata(&again).unwrap().modified().unwrap(), modified);
}

#[test]
fn auto_keeps_formats_that_batch_and_names_the_stored_one() {
    let (path, weights) =
        transcode::resolve(&common::model_path(), koubou_llama::Weights::Original, None, 1).expect("resolve");
    assert_eq!(path, common::model_path());
    assert_eq!(weights, "q4_1");
    // Q4_0, Q8_0 and the K-quants have batched kernels already: auto leaves them alone.
    for ft in [2, 7, 15, 18] {
        assert_eq!(transcode::batched_format_for(ft), None, "file type {ft}");
    }
}
