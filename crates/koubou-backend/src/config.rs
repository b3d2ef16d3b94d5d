//! Backend and routing configuration: `[backends.NAME]` and `[types.NAME]` tables of `koubou.toml`.

use std::{collections::BTreeMap, path::PathBuf};

use koubou_task::GenOptions;
use serde::{Deserialize, Serialize};

/// Every backend and every task type, as configured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendsConfig {
    pub backends: BTreeMap<String, BackendConfig>,
    pub types: BTreeMap<String, TypeRoute>,
}

/// One `[backends.NAME]` table; `kind` picks the provider.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    Ollama(OllamaConfig),
    Openai(OpenAiConfig),
    Codex(CodexConfig),
    Exec(ExecConfig),
    Embedded(EmbeddedConfig),
    /// Answers with the prompt: for smoke tests and benchmarks of Koubou itself.
    Echo(EchoConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Ollama(_) => "ollama",
            BackendConfig::Openai(_) => "openai",
            BackendConfig::Codex(_) => "codex",
            BackendConfig::Exec(_) => "exec",
            BackendConfig::Embedded(_) => "embedded",
            BackendConfig::Echo(_) => "echo",
        }
    }
}

/// Ollama's native API (`/api/chat`, streamed NDJSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OllamaConfig {
    /// Base URL; unset means `$OLLAMA_HOST`, else `http://127.0.0.1:11434`.
    pub url: Option<String>,
    pub model: String,
    /// Generations Ollama runs at once (its `OLLAMA_NUM_PARALLEL`).
    pub concurrency: usize,
    /// Ollama's `keep_alive` (e.g. "5m"); unset leaves Ollama's default.
    pub keep_alive: Option<String>,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        OllamaConfig { url: None, model: "gemma2:2b".into(), concurrency: 2, keep_alive: None }
    }
}

/// Any server speaking OpenAI's `/v1/chat/completions` (LM Studio, vLLM, llama.cpp's server,
/// llama-cpp-python, hosted APIs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// The key itself (prefer `api_key_env`).
    pub api_key: Option<String>,
    /// Environment variable holding the key; unset or empty means no `Authorization` header.
    pub api_key_env: Option<String>,
    pub model: String,
    pub concurrency: usize,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://127.0.0.1:8080/v1".into(),
            api_key: None,
            api_key_env: Some("OPENAI_API_KEY".into()),
            model: "default".into(),
            concurrency: 4,
        }
    }
}

/// The Codex CLI (`codex exec`), run as a child process with the prompt as one argv element.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CodexConfig {
    /// The `codex` program (a path, or a name looked up on `PATH`).
    pub program: String,
    /// Where codex works (`-C`); unset means the server's working directory.
    pub workdir: Option<PathBuf>,
    /// `read-only` or `workspace-write`; `danger-full-access` only when the environment has
    /// `CODEX_UNSAFE_ALLOW_NO_SANDBOX=1`.
    pub sandbox: String,
    /// `CODEX_HOME` for the child; unset leaves codex's own default.
    pub codex_home: Option<PathBuf>,
    /// Passed as `-m MODEL` when set.
    pub model: Option<String>,
    /// More arguments, inserted before the prompt.
    pub extra_args: Vec<String>,
    /// Extra environment for the child.
    pub env: BTreeMap<String, String>,
    pub concurrency: usize,
}

impl Default for CodexConfig {
    fn default() -> Self {
        CodexConfig {
            program: "codex".into(),
            workdir: None,
            sandbox: "read-only".into(),
            codex_home: None,
            model: None,
            extra_args: vec![],
            env: BTreeMap::new(),
            concurrency: 1,
        }
    }
}

/// A configured program: gets the task as JSON on stdin, answers on stdout (the seed's
/// "custom worker type"). Never run through a shell.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// Program and arguments, e.g. `["python3", "my_worker.py"]`.
    pub argv: Vec<String>,
    pub workdir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// What to call the "model" in task records.
    pub model: String,
    pub concurrency: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig { argv: vec![], workdir: None, env: BTreeMap::new(), model: "exec".into(), concurrency: 1 }
    }
}

/// A GGUF model run inside the Koubou process (crate `koubou-llama`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// A model name known to `koubou models list`, or a path to a `.gguf` file.
    pub model: String,
    /// CPU threads for generating one sequence; unset means every core on a machine with 1–2
    /// cores, else all but one (at most 8). With `share_cores` they are used only while other
    /// processes leave those cores idle, else the decode runs on one thread.
    pub threads: Option<usize>,
    /// CPU threads for batched work (prompt processing, several sequences at once); unset means
    /// every core (at most 8). With `share_cores` they are used only while other processes
    /// leave those cores idle.
    pub batch_threads: Option<usize>,
    /// Run a decode on one thread whenever other processes keep the cores it would use busy
    /// (llama.cpp's threads wait for each other at every step, so a busy core slows them all
    /// down far below one thread's speed).
    pub share_cores: bool,
    /// The weight format served: `original` (as stored), `auto` (re-encode, once, a model whose
    /// format has no batched kernel on this CPU into a nearly lossless one that has: Q4_1 → Q8_0
    /// on x86 with AVX2), or one of `q8_0` (nearly lossless from 4- and 5-bit formats), `q4_0`,
    /// `iq4_nl` (fastest, but re-encoding 4-bit weights costs quality). Measured with SmolLM2
    /// (Q4_1) on 2 cores: 1 task 79 / 111 / 137 tok/s as original / q8_0 / q4_0, perplexity
    /// 35.7 / 35.7 / 43.3; see docs/benchmarks.md.
    pub weights: String,
    /// KV cache element type: `q8_0` (half the memory of `f16`, faster attention on CPU) or
    /// `f16`.
    pub kv_cache: String,
    /// Sequences decoded together in one batch (the backend's capacity).
    pub parallel: usize,
    /// Context length per sequence, in tokens.
    pub context: u32,
    /// Default cap on generated tokens when a task sets none.
    pub max_tokens: u32,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            model: "smollm2-135m-instruct".into(),
            threads: None,
            batch_threads: None,
            share_cores: true,
            weights: "original".into(),
            kv_cache: "q8_0".into(),
            parallel: 4,
            context: 4096,
            max_tokens: 512,
        }
    }
}

/// `kind = "echo"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// A fixed reply (default: the prompt itself).
    pub reply: Option<String>,
    pub concurrency: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig { reply: None, concurrency: 64 }
    }
}

/// One `[types.NAME]` table: where tasks of that type go.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TypeRoute {
    /// Name of a `[backends.NAME]` table.
    pub backend: String,
    /// Model for this type; unset means the backend's default model.
    pub model: Option<String>,
    /// System prompt for this type, unless the task brings its own.
    pub system_prompt: Option<String>,
    /// Wall-clock budget per attempt, unless the task sets `timeout_secs`.
    pub timeout_secs: u64,
    /// Backend to use when the first one is unreachable or lacks the model.
    pub fallback: Option<String>,
    /// Model on the fallback backend; unset means that backend's default.
    pub fallback_model: Option<String>,
    /// Default sampling options for this type (a task's own options win field by field).
    pub options: GenOptions,
}

impl Default for TypeRoute {
    fn default() -> Self {
        TypeRoute {
            backend: String::new(),
            model: None,
            system_prompt: None,
            timeout_secs: 300,
            fallback: None,
            fallback_model: None,
            options: GenOptions::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_tables() {
        let c: BackendsConfig = toml::from_str(
            r#"
            [backends.local]
            kind = "ollama"
            model = "qwen2.5-coder:7b"
            [backends.gpt]
            kind = "openai"
            base_url = "http://127.0.0.1:9000/v1"
            [types.code]
            backend = "local"
            fallback = "gpt"
            timeout_secs = 120
            "#,
        )
        .unwrap();
        assert_eq!(c.backends["local"].kind(), "ollama");
        assert_eq!(c.types["code"].timeout_secs, 120);
        assert!(toml::from_str::<BackendsConfig>("[backends.x]\nkind='ollama'\nbogus=1").is_err());
    }
}
