#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use koubou_backend::{EmbeddedConfig, GenOptions, GenerateRequest};
use koubou_llama::{EmbeddedBackend, ModelStore};

/// The real SmolLM2 file: `$KOUBOU_TEST_MODEL`, else the store's default (pulled if missing).
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("KOUBOU_TEST_MODEL") {
            return PathBuf::from(p);
        }
        let store = ModelStore::from_env().expect("a models directory");
        store.ensure_default(&mut |p| eprintln!("{p:?}")).expect("pull the default model")
    })
    .clone()
}

pub fn config(parallel: usize) -> EmbeddedConfig {
    EmbeddedConfig {
        model: model_path().display().to_string(),
        threads: Some(1),
        batch_threads: None,
        parallel,
        context: 2048,
        max_tokens: 256,
        ..EmbeddedConfig::default()
    }
}

pub fn backend(parallel: usize) -> EmbeddedBackend {
    let store = ModelStore::new(std::env::temp_dir().join("koubou-llama-test-unused"));
    EmbeddedBackend::new("embedded", &config(parallel), &store).expect("backend")
}

pub fn request(prompt: &str, options: GenOptions) -> GenerateRequest {
    GenerateRequest {
        model: String::new(),
        system: None,
        prompt: prompt.into(),
        options,
        timeout: Duration::from_secs(120),
        task_id: "t".into(),
        task_kind: "test".into(),
        num_ctx: None,
        response_format: None,
    }
}

pub fn greedy(max_tokens: u32) -> GenOptions {
    GenOptions { max_tokens: Some(max_tokens), temperature: Some(0.0), ..GenOptions::default() }
}

/// A sink that keeps everything it is given.
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<String>>);

impl koubou_backend::TokenSink for Collect {
    fn token(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_string());
    }
}

impl Collect {
    pub fn joined(&self) -> String {
        self.0.lock().unwrap().concat()
    }
}
