//! Builds a provider from its `[backends.NAME]` table.
//!
//! Why it exists: the server, the CLI and tests all turn configuration into backends; this is
//! the one place that knows which struct serves which `kind`. The embedded engine is the
//! exception: it lives in the `koubou-llama` crate (which depends on this one), so it is built
//! there and this returns `Ok(None)` for it.

use std::sync::Arc;

use crate::anthropic::AnthropicBackend;
use crate::codex::CodexBackend;
use crate::exec::ExecBackend;
use crate::ollama::OllamaBackend;
use crate::openai::OpenAiBackend;
use crate::{Backend, BackendConfig, BackendError};

/// The backend for `cfg`, named `name`; `Ok(None)` for `kind = "embedded"`. Fails with
/// [`BackendError::Config`] when the table cannot work (empty `argv`, an unsandboxed codex
/// without `CODEX_UNSAFE_ALLOW_NO_SANDBOX=1`, an unreadable `ca_file`, a bad `proxy`, …).
pub fn build(name: &str, cfg: &BackendConfig) -> Result<Option<Arc<dyn Backend>>, BackendError> {
    Ok(Some(match cfg {
        BackendConfig::Ollama(c) => Arc::new(OllamaBackend::new(name, c)?),
        BackendConfig::Openai(c) => Arc::new(OpenAiBackend::new(name, c)?),
        BackendConfig::Anthropic(c) => Arc::new(AnthropicBackend::new(name, c)?),
        BackendConfig::Codex(c) => Arc::new(CodexBackend::new(name, c)?),
        BackendConfig::Exec(c) => Arc::new(ExecBackend::new(name, c)?),
        BackendConfig::Echo(c) => Arc::new(crate::echo::EchoBackend::new(name, c)),
        BackendConfig::Embedded(_) => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AnthropicConfig, CodexConfig, EmbeddedConfig, ExecConfig, OllamaConfig, OpenAiConfig};

    #[test]
    fn builds_each_kind_but_embedded() {
        let ok = |c: BackendConfig| build("b", &c).unwrap().map(|b| (b.name().to_owned(), b.kind()));
        assert_eq!(ok(BackendConfig::Ollama(OllamaConfig::default())), Some(("b".into(), "ollama")));
        assert_eq!(ok(BackendConfig::Openai(OpenAiConfig::default())), Some(("b".into(), "openai")));
        assert_eq!(ok(BackendConfig::Anthropic(AnthropicConfig::default())), Some(("b".into(), "anthropic")));
        assert_eq!(ok(BackendConfig::Codex(CodexConfig::default())), Some(("b".into(), "codex")));
        let exec = ExecConfig { argv: vec!["true".into()], ..Default::default() };
        assert_eq!(ok(BackendConfig::Exec(exec)), Some(("b".into(), "exec")));
        assert_eq!(ok(BackendConfig::Embedded(EmbeddedConfig::default())), None);
        let e = build("b", &BackendConfig::Exec(ExecConfig::default())).err();
        assert!(matches!(e, Some(BackendError::Config { .. })), "{e:?}");
    }
}
