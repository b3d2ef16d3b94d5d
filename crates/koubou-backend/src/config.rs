//! Backend and routing configuration: `[backends.NAME]`, `[types.NAME]` and `[pricing]` of
//! `koubou.toml`.

use std::{collections::BTreeMap, path::PathBuf};

use koubou_task::{GenOptions, Prices};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::http::ClientOptions;

/// Every backend and every task type, as configured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendsConfig {
    pub backends: BTreeMap<String, BackendTable>,
    pub types: BTreeMap<String, TypeRoute>,
    pub pricing: PricingConfig,
}

/// One `[backends.NAME]` table: what any backend may set, beside its provider's own settings
/// (`kind` and the rest).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendTable {
    // Read first: each takes its own keys out of the table, so the provider's table (which
    // refuses unknown keys) sees only its own. (Neither may itself flatten anything: serde
    // reads a struct with a flattened field as a map, which takes nothing out.)
    #[serde(flatten)]
    pub settings: BackendSettings,
    #[serde(flatten)]
    pub prices: Prices,
    #[serde(flatten)]
    pub provider: BackendConfig,
}

impl From<BackendConfig> for BackendTable {
    fn from(provider: BackendConfig) -> Self {
        BackendTable { settings: BackendSettings::default(), prices: Prices::default(), provider }
    }
}

impl BackendTable {
    /// Whether prompts sent to this backend leave the machine: `remote` when set, else what
    /// the provider says ([`BackendConfig::remote_by_default`]).
    pub fn is_remote(&self) -> bool {
        self.settings.remote.unwrap_or_else(|| self.provider.remote_by_default())
    }
}

/// Settings every backend has, whatever its kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BackendSettings {
    /// Whether prompts sent here leave this machine. Unset: judged from the provider (a URL
    /// whose host is not loopback, or the Codex CLI, which talks to OpenAI's cloud, is remote).
    /// A type reaches a remote backend only with `allow_remote = true`, and a confidential task
    /// never does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<bool>,
}

/// `[pricing]`: the reference price that values what local backends served — "what the local
/// craftsmen spared a paid API": tokens served by local backends × these prices. An estimate:
/// it assumes the paid API would have needed as many tokens, for the same work.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PricingConfig {
    /// A `[backends.NAME]` whose prices are the reference (e.g. the paid API you would
    /// otherwise use). Explicit prices below win over it, field by field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    // The keys of `Prices`, repeated rather than flattened: serde cannot refuse unknown keys in
    // a table with a flattened part, and a typo here should be an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_input_per_mtok: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_output_per_mtok: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_cached_input_per_mtok: Option<f64>,
}

impl PricingConfig {
    /// The explicit prices of `[pricing]`.
    pub fn prices(&self) -> Prices {
        Prices {
            price_input_per_mtok: self.price_input_per_mtok,
            price_output_per_mtok: self.price_output_per_mtok,
            price_cached_input_per_mtok: self.price_cached_input_per_mtok,
        }
    }
}

/// One `[backends.NAME]` table; `kind` picks the provider.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    Ollama(OllamaConfig),
    Openai(OpenAiConfig),
    /// Anthropic's Messages API (`/v1/messages`), also served by Ollama, llama.cpp's server and
    /// LM Studio.
    Anthropic(AnthropicConfig),
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
            BackendConfig::Anthropic(_) => "anthropic",
            BackendConfig::Codex(_) => "codex",
            BackendConfig::Exec(_) => "exec",
            BackendConfig::Embedded(_) => "embedded",
            BackendConfig::Echo(_) => "echo",
        }
    }

    /// The environment variable this backend reads its secret key from, if any: withheld from
    /// every child process of another backend.
    pub fn key_env(&self) -> Option<&str> {
        match self {
            BackendConfig::Openai(c) => c.api_key_env.as_deref().filter(|v| !v.is_empty()),
            BackendConfig::Anthropic(c) => c.api_key_env.as_deref().filter(|v| !v.is_empty()),
            BackendConfig::Ollama(_)
            | BackendConfig::Codex(_)
            | BackendConfig::Exec(_)
            | BackendConfig::Embedded(_)
            | BackendConfig::Echo(_) => None,
        }
    }

    /// Whether this provider sends prompts off the machine, judged from its settings alone: an
    /// HTTP provider whose host is not loopback; the Codex CLI (it sends the task to OpenAI's
    /// cloud unless told otherwise: set `remote = false` for a local model). Every kind must be
    /// listed here, so a new provider cannot be taken for local by omission.
    pub fn remote_by_default(&self) -> bool {
        match self {
            BackendConfig::Ollama(c) => leaves(&crate::ollama::resolve_url(c.url.as_deref()), &c.proxy),
            BackendConfig::Openai(c) => leaves(&c.base_url, &c.proxy),
            BackendConfig::Anthropic(c) => leaves(&c.base_url, &c.proxy),
            BackendConfig::Codex(_) => true,
            BackendConfig::Exec(_) | BackendConfig::Embedded(_) | BackendConfig::Echo(_) => false,
        }
    }
}

/// Whether requests to `url` leave the machine: its host is not loopback, or they go through
/// an explicit proxy that is not (an explicit `proxy` is used even for loopback hosts; the
/// environment's proxies never are).
fn leaves(url: &str, proxy: &Option<String>) -> bool {
    let via_proxy = proxy.as_deref().is_some_and(|p| !p.trim().eq_ignore_ascii_case("none") && !url_is_loopback(p));
    !url_is_loopback(url) || via_proxy
}

/// True when `url`'s host is a loopback address or `localhost`; false for anything else,
/// including a URL that does not parse (a backend is taken for local only when it surely is).
pub fn url_is_loopback(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url.trim()) else { return false };
    let Some(host) = u.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
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
    /// Context window in tokens, sent as `options.num_ctx` (a type's `num_ctx` wins). Unset
    /// leaves Ollama's own (4096 unless `OLLAMA_CONTEXT_LENGTH` says otherwise), which silently
    /// drops the start of a longer prompt.
    pub num_ctx: Option<u32>,
    /// PEM file of CA certificates to trust for an `https://` URL (besides the usual roots).
    pub ca_file: Option<PathBuf>,
    /// Proxy URL, or `"none"`; unset follows HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, never for
    /// loopback.
    pub proxy: Option<String>,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        OllamaConfig {
            url: None,
            model: "gemma2:2b".into(),
            concurrency: 2,
            keep_alive: None,
            num_ctx: None,
            ca_file: None,
            proxy: None,
        }
    }
}

/// How the API key travels.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Auth {
    /// `Authorization: Bearer KEY` (OpenAI and most others).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    ApiKey,
    /// `x-api-key: KEY` (Anthropic).
    XApiKey,
    /// No key is sent.
    None,
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
    /// Environment variable holding the key; unset or empty means no key is sent.
    pub api_key_env: Option<String>,
    /// How the key is sent: `bearer`, `api-key` (Azure), `x-api-key` or `none`.
    pub auth: Auth,
    pub model: String,
    pub concurrency: usize,
    /// Extra headers on every request (e.g. OpenRouter's `HTTP-Referer`, `X-Title`).
    pub headers: BTreeMap<String, String>,
    /// Query parameters on every request (e.g. Azure's `api-version`).
    pub query: BTreeMap<String, String>,
    /// Ask for token counts in the stream (`stream_options.include_usage`); servers that refuse
    /// unknown fields (Mistral) need `false`.
    pub stream_usage: bool,
    /// The field carrying the token cap: `max_tokens`, or `max_completion_tokens` (newer
    /// OpenAI models, which refuse `max_tokens`).
    pub max_tokens_field: String,
    /// Fields merged into every request body (a task's own settings are written after them).
    pub extra_body: Map<String, Value>,
    /// PEM file of CA certificates to trust (besides the bundled web roots and the system's).
    pub ca_file: Option<PathBuf>,
    /// Proxy URL, or `"none"`; unset follows HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, never for
    /// loopback.
    pub proxy: Option<String>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://127.0.0.1:8080/v1".into(),
            api_key: None,
            api_key_env: Some("OPENAI_API_KEY".into()),
            auth: Auth::Bearer,
            model: "default".into(),
            concurrency: 4,
            headers: BTreeMap::new(),
            query: BTreeMap::new(),
            stream_usage: true,
            max_tokens_field: "max_tokens".into(),
            extra_body: Map::new(),
            ca_file: None,
            proxy: None,
        }
    }
}

/// Anthropic's Messages API, or a server that speaks it (Ollama, llama.cpp's server, LM Studio).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    /// Without `/v1` (requests go to `{base_url}/v1/messages`), e.g. `http://127.0.0.1:11434`.
    pub base_url: String,
    /// The key itself (prefer `api_key_env`).
    pub api_key: Option<String>,
    /// Environment variable holding the key.
    pub api_key_env: Option<String>,
    /// How the key is sent: `x-api-key` (Anthropic), `bearer` (Ollama's cloud), or `none`.
    pub auth: Auth,
    /// The `anthropic-version` header.
    pub anthropic_version: String,
    pub model: String,
    /// `max_tokens` when a task sets none (the API requires one).
    pub max_tokens: u32,
    pub concurrency: usize,
    /// Extra headers on every request (e.g. `anthropic-beta`).
    pub headers: BTreeMap<String, String>,
    /// Fields merged into every request body.
    pub extra_body: Map<String, Value>,
    /// PEM file of CA certificates to trust (besides the bundled web roots and the system's).
    pub ca_file: Option<PathBuf>,
    /// Proxy URL, or `"none"`; unset follows HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, never for
    /// loopback.
    pub proxy: Option<String>,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        AnthropicConfig {
            base_url: "https://api.anthropic.com".into(),
            api_key: None,
            api_key_env: Some("ANTHROPIC_API_KEY".into()),
            auth: Auth::XApiKey,
            anthropic_version: "2023-06-01".into(),
            model: "claude-sonnet-4-5".into(),
            max_tokens: 4096,
            concurrency: 4,
            headers: BTreeMap::new(),
            extra_body: Map::new(),
            ca_file: None,
            proxy: None,
        }
    }
}

/// The client options of one HTTP backend's table.
pub(crate) fn client_options(ca_file: &Option<PathBuf>, proxy: &Option<String>) -> ClientOptions {
    ClientOptions { ca_file: ca_file.clone(), proxy: proxy.clone() }
}

/// The Codex CLI (`codex exec`), run as a child process with the prompt on stdin.
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
    /// Extra environment for the child. Codex gets the server's environment minus Koubou's
    /// token and the keys other backends read (`api_key_env`), plus this.
    pub env: BTreeMap<String, String>,
    /// Variables passed from the server's environment even though another backend reads them
    /// as its key (never `KOUBOU_AUTH_TOKEN`).
    pub pass_env: Vec<String>,
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
            pass_env: vec![],
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
    /// The program's environment beyond the minimal one it always gets from the server (`PATH`,
    /// `HOME`, `USER`, `LANG`, `LC_*`, `TMPDIR`).
    pub env: BTreeMap<String, String>,
    /// Names of further variables passed from the server's environment (never
    /// `KOUBOU_AUTH_TOKEN`).
    pub pass_env: Vec<String>,
    /// What to call the "model" in task records.
    pub model: String,
    pub concurrency: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            argv: vec![],
            workdir: None,
            env: BTreeMap::new(),
            pass_env: vec![],
            model: "exec".into(),
            concurrency: 1,
        }
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
    /// Keep each sequence slot's KV cache after its task ends, and start a new task in the slot
    /// whose cached tokens share the longest prefix with its prompt: only the rest of the prompt
    /// is processed (a shared system prompt, a task asked again). Off: every prompt is processed
    /// from its first token.
    pub cache_prompts: bool,
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
            cache_prompts: true,
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
    /// Backends to try, in order, when the one before cannot serve (unreachable, rate-limited
    /// or overloaded, timed out, lacking the model; never on a request it refused as bad).
    /// One name or a list.
    #[serde(deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    /// Model on the first fallback backend; unset means that backend's default (the others
    /// always use their default).
    pub fallback_model: Option<String>,
    /// Default sampling options for this type (a task's own options win field by field).
    pub options: GenOptions,
    /// Ollama's context window for this type's tasks, in tokens (overrides the backend's
    /// `num_ctx`; other backends ignore it).
    pub num_ctx: Option<u32>,
    /// Lets tasks of this type reach remote backends (a host beyond loopback, or a backend with
    /// `remote = true`). Without it, a route or fallback to a remote backend is refused at
    /// start, and so is a task pinning one with `backend`.
    pub allow_remote: bool,
    /// Every task of this type is confidential: it runs only on local backends, whatever the
    /// routing (as a task tagged `confidential`).
    pub confidential: bool,
    /// Answers must be JSON (checked; providers are asked for JSON).
    pub json: bool,
    /// Answers must be JSON valid against this JSON Schema (implies `json`).
    pub schema: Option<serde_json::Value>,
}

/// `"name"` or `["a", "b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Default for TypeRoute {
    fn default() -> Self {
        TypeRoute {
            backend: String::new(),
            model: None,
            system_prompt: None,
            timeout_secs: 300,
            fallback: vec![],
            fallback_model: None,
            options: GenOptions::default(),
            num_ctx: None,
            allow_remote: false,
            confidential: false,
            json: false,
            schema: None,
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
        assert_eq!(c.backends["local"].provider.kind(), "ollama");
        assert_eq!(c.types["code"].timeout_secs, 120);
        assert_eq!(c.types["code"].fallback, ["gpt"]);
        assert!(toml::from_str::<BackendsConfig>("[backends.x]\nkind='ollama'\nbogus=1").is_err());
    }

    #[test]
    fn shared_backend_settings_sit_beside_the_provider_keys() {
        let c: BackendsConfig = toml::from_str(
            r#"
            [backends.paid]
            kind = "openai"
            base_url = "http://127.0.0.1:9000/v1"
            concurrency = 2
            remote = true
            price_input_per_mtok = 3
            price_output_per_mtok = 15.5
            [backends.lan]
            kind = "ollama"
            url = "http://192.168.1.20:11434"
            [backends.lan2]
            kind = "ollama"
            url = "http://192.168.1.21:11434"
            remote = false
            [types.code]
            backend = "lan"
            fallback = ["lan2", "paid"]
            allow_remote = true
            schema = { type = "object", required = ["a"] }
            [pricing]
            reference = "paid"
            "#,
        )
        .unwrap();
        let paid = &c.backends["paid"];
        assert_eq!(paid.settings.remote, Some(true));
        assert_eq!(paid.prices.price_input_per_mtok, Some(3.0));
        assert_eq!(paid.prices.price_output_per_mtok, Some(15.5));
        assert!(matches!(&paid.provider, BackendConfig::Openai(o) if o.concurrency == 2));
        assert!(paid.is_remote(), "explicit remote = true on a loopback URL");
        assert!(c.backends["lan"].is_remote(), "a LAN host is not loopback");
        assert!(!c.backends["lan2"].is_remote(), "remote = false wins");
        assert_eq!(c.types["code"].fallback, ["lan2", "paid"]);
        assert_eq!(c.types["code"].schema.as_ref().unwrap()["required"][0], "a");
        assert_eq!(c.pricing.reference.as_deref(), Some("paid"));
        // Typos are still caught, in the shared keys' table too.
        let e = toml::from_str::<BackendsConfig>("[backends.x]\nkind='echo'\nremot=true").unwrap_err();
        assert!(e.to_string().contains("remot"), "{e}");
        let e = toml::from_str::<BackendsConfig>("[backends.x]\nkind='echo'\nremote='yes'").unwrap_err();
        assert!(e.to_string().contains("remote") || e.to_string().contains("bool"), "{e}");
    }

    #[test]
    fn remote_is_judged_from_the_host() {
        for (url, local) in [
            ("http://127.0.0.1:8080/v1", true),
            ("http://127.9.9.9/v1", true),
            ("http://[::1]:8080/v1", true),
            ("http://localhost:1234", true),
            ("http://LOCALHOST.:1234", true),
            ("https://api.openai.com/v1", false),
            ("http://10.0.0.5:8080/v1", false),
            ("http://[fe80::1]:80", false),
            ("not a url", false),
        ] {
            assert_eq!(url_is_loopback(url), local, "{url}");
        }
        let via = |proxy: Option<&str>| {
            BackendConfig::Openai(OpenAiConfig { proxy: proxy.map(str::to_owned), ..OpenAiConfig::default() })
                .remote_by_default()
        };
        assert!(!via(None) && !via(Some("none")) && !via(Some("http://127.0.0.1:3128")));
        assert!(via(Some("http://proxy.example:3128")), "an explicit proxy is used even for loopback hosts");
        let codex = BackendConfig::Codex(CodexConfig::default());
        assert!(codex.remote_by_default());
        assert!(!BackendConfig::Echo(EchoConfig::default()).remote_by_default());
    }
}
