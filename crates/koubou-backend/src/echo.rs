//! `kind = "echo"`: answers at once with the prompt (or a fixed reply), streamed word by word.
//!
//! Why it exists: to check a deployment end to end without any model (`koubou submit --backend
//! echo`), and to let `koubou bench` measure Koubou itself — queue, workers, faces — with a
//! backend that costs nothing.

use async_trait::async_trait;
use koubou_task::Usage;

use crate::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, TokenSink, config::EchoConfig,
};

pub struct EchoBackend {
    name: String,
    cfg: EchoConfig,
}

impl EchoBackend {
    pub fn new(name: &str, cfg: &EchoConfig) -> Self {
        EchoBackend { name: name.to_owned(), cfg: cfg.clone() }
    }
}

#[async_trait]
impl Backend for EchoBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "echo"
    }
    fn default_model(&self) -> &str {
        "echo"
    }
    fn capacity(&self) -> usize {
        self.cfg.concurrency.max(1)
    }
    async fn health(&self) -> Health {
        Health::up("echo backend (answers with the prompt)", vec!["echo".into()])
    }
    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        if cancel.is_cancelled() {
            return Err(BackendError::Cancelled);
        }
        let text = self.cfg.reply.clone().unwrap_or(req.prompt);
        let mut n = 0u64;
        for piece in text.split_inclusive(' ') {
            sink.token(piece);
            n += 1;
        }
        Ok(Generation {
            usage: Usage::new(0, n),
            text,
            model: req.model,
            finish_reason: "stop".into(),
            warnings: vec![],
        })
    }
}
