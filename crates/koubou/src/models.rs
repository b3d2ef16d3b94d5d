//! `koubou models list|pull`, fetching the embedded default model on first use, and the hidden
//! `models check-load` child that trial-loads a model for [`koubou_llama::check`].

#[cfg(feature = "embedded")]
use anyhow::Context;
use anyhow::bail;
use clap::Subcommand;
use koubou_backend::BackendConfig;
use koubou_system::Config;

use crate::{Ctx, logging, output};

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// Models in the embedded store (and Ollama's, when it answers).
    List,
    /// Fetch a model. No argument: the embedded default (SmolLM2-135M-Instruct). A path to a .gguf
    /// file: register it. `https://…/file.gguf`, `hf:<owner>/<repo>[@revision]/<file>` (from
    /// $HF_ENDPOINT, default https://huggingface.co) or a recommended name (qwen2.5-coder-1.5b,
    /// qwen2.5-coder-0.5b, smollm2-360m, smollm2-1.7b): download it, resuming a cut download.
    /// `ollama:<name>`: ask Ollama to pull that model. Every GGUF is checked (structure and a
    /// trial load) before it is registered.
    Pull {
        source: Option<String>,
        /// Name to register the model under (default: its file name, or the recommended name).
        #[arg(long)]
        name: Option<String>,
        /// Expected SHA-256 of a downloaded file (recommended models carry their own).
        #[arg(long)]
        sha256: Option<String>,
        /// Extra CA certificates (PEM) to trust for the download, besides the system's
        /// (`SSL_CERT_FILE` is honoured too).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Load a GGUF with llama.cpp and report (the trial load run in a child process).
    #[command(hide = true)]
    CheckLoad { path: std::path::PathBuf },
}

fn bar(total: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

async fn pull_ollama(model: &str) -> anyhow::Result<()> {
    let url = koubou_backend::ollama::resolve_url(None);
    let b = bar(0);
    b.set_message(format!("ollama pull {model}"));
    koubou_backend::ollama::pull(&url, model, |p| {
        if let (Some(t), Some(c)) = (p.total, p.completed) {
            b.set_length(t);
            b.set_position(c);
        }
        b.set_message(p.status.clone());
    })
    .await?;
    b.finish_with_message(format!("ollama has {model}"));
    Ok(())
}

/// Makes every model check in this process trial-load in a child: this binary, re-executed as
/// `koubou models check-load <path>`.
#[cfg(feature = "embedded")]
pub fn install_trial_loader() {
    if let Ok(exe) = std::env::current_exe() {
        koubou_llama::TrialLoader::new(exe, ["models", "check-load"]).install();
    }
}

#[cfg(not(feature = "embedded"))]
pub fn install_trial_loader() {}

#[cfg(feature = "embedded")]
mod embedded {
    use koubou_llama::{ModelStore, PullProgress};

    use super::bar;

    pub fn store() -> anyhow::Result<ModelStore> {
        Ok(ModelStore::from_env()?)
    }

    /// A progress callback drawing `b`.
    pub fn draw(b: &indicatif::ProgressBar) -> impl FnMut(PullProgress) + Send + '_ {
        move |p: PullProgress| match p {
            PullProgress::Downloading { package } => b.set_message(format!("downloading {package}")),
            PullProgress::Extracting { done, total } => {
                b.set_message("extracting");
                b.set_length(total);
                b.set_position(done);
            }
            PullProgress::Fetching { done, total, resumed_from, .. } => {
                b.set_message(if resumed_from > 0 { "resuming" } else { "downloading" });
                if let Some(t) = total {
                    b.set_length(t);
                }
                b.set_position(done);
            }
            PullProgress::Checking { .. } => b.set_message("checking (GGUF structure, trial load)"),
            PullProgress::Done { path } => b.finish_with_message(format!("ready: {}", path.display())),
        }
    }

    /// Runs a blocking pull with a progress bar on stderr.
    pub async fn with_bar<T: Send + 'static>(
        f: impl FnOnce(&mut dyn FnMut(PullProgress)) -> Result<T, koubou_llama::models::ModelError> + Send + 'static,
    ) -> anyhow::Result<T> {
        Ok(tokio::task::spawn_blocking(move || {
            let b = bar(0);
            f(&mut draw(&b))
        })
        .await??)
    }
}

/// Before starting a system: fetch the embedded default model if the configuration may use it
/// (explicitly, or by the automatic choice when no backend is configured) and it is missing. A
/// failure is only a warning: the embedded backend then reports itself down, and why.
pub async fn prepare(cfg: &Config) -> anyhow::Result<()> {
    #[cfg(feature = "embedded")]
    {
        let wants_default = cfg.backends.is_empty()
            || cfg.backends.values().any(
                |b| matches!(&b.provider, BackendConfig::Embedded(e) if koubou_llama::ModelStore::is_default_name(&e.model)),
            );
        if wants_default {
            let store = embedded::store()?;
            if !store.default_path().exists() {
                eprintln!("fetching the embedded model (SmolLM2-135M-Instruct, 98 MB) into {}", store.dir().display());
                if let Err(e) = embedded::with_bar(move |p| store.ensure_default(p)).await {
                    eprintln!("koubou: could not fetch the embedded model ({e:#}); the embedded backend stays down");
                }
            }
        }
    }
    #[cfg(not(feature = "embedded"))]
    let _ = cfg;
    Ok(())
}

pub async fn run(ctx: &Ctx, cmd: ModelsCmd) -> anyhow::Result<()> {
    logging::init_quiet();
    match cmd {
        ModelsCmd::List => list(ctx).await,
        ModelsCmd::Pull { source: Some(s), .. } if s.starts_with("ollama:") => pull_ollama(&s["ollama:".len()..]).await,
        ModelsCmd::Pull { source, name, sha256, ca_file } => pull_local(source, name, sha256, ca_file).await,
        ModelsCmd::CheckLoad { path } => check_load(&path),
    }
}

#[cfg(feature = "embedded")]
fn check_load(path: &std::path::Path) -> anyhow::Result<()> {
    let code = koubou_llama::check::child_main(path);
    std::process::exit(code);
}

#[cfg(not(feature = "embedded"))]
fn check_load(_path: &std::path::Path) -> anyhow::Result<()> {
    bail!("this koubou was built without the embedded engine")
}

#[cfg(feature = "embedded")]
async fn pull_local(
    source: Option<String>,
    name: Option<String>,
    sha256: Option<String>,
    ca_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use koubou_llama::remote;

    let store = embedded::store()?;
    let Some(src) = source else {
        let path = embedded::with_bar(move |p| store.ensure_default(p)).await?;
        println!("{}", path.display());
        return Ok(());
    };
    let path = std::path::PathBuf::from(&src);
    if path.is_file() || !remote::is_remote(&src) {
        if !path.exists() && !src.contains('/') && !src.ends_with(".gguf") {
            // Neither a file nor a known source: say what would work.
            remote::resolve_source(&src, "")?;
        }
        let name = name.unwrap_or_else(|| {
            path.file_name().map(|s| remote::default_name(&s.to_string_lossy())).unwrap_or_else(|| "model".into())
        });
        let e = tokio::task::spawn_blocking(move || store.register(&name, &path))
            .await?
            .with_context(|| format!("registering {src}"))?;
        println!("registered {} → {}", e.name, e.path.display());
        return Ok(());
    }
    let mut model = remote::resolve_source(&src, &remote::hf_endpoint())?;
    if let Some(s) = sha256 {
        let s = s.trim().to_ascii_lowercase();
        if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("--sha256 must be 64 hexadecimal digits");
        }
        model.sha256 = Some(s);
    }
    let client = remote::http_client(ca_file.as_deref())?;
    eprintln!("fetching {} into {}", model.url, store.dir().display());
    let b = bar(model.size.unwrap_or(0));
    let entry = store.pull_remote(&model, name.as_deref(), &client, &mut embedded::draw(&b)).await;
    let entry = match entry {
        Ok(e) => e,
        Err(e) => {
            b.abandon();
            return Err(e.into());
        }
    };
    println!("registered {} → {}", entry.name, entry.path.display());
    Ok(())
}

#[cfg(not(feature = "embedded"))]
async fn pull_local(
    _source: Option<String>,
    _name: Option<String>,
    _sha256: Option<String>,
    _ca_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    bail!("this koubou was built without the embedded engine; use `koubou models pull ollama:<model>`")
}

async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    #[allow(unused_mut)]
    let mut rows: Vec<Vec<String>> = Vec::new();
    #[cfg(feature = "embedded")]
    for m in embedded::store()?.list()? {
        rows.push(vec![
            "embedded".into(),
            m.name,
            format!("{:.1} MB", m.size as f64 / 1e6),
            m.path.display().to_string(),
        ]);
    }
    let ollama = koubou_backend::build("ollama", &BackendConfig::Ollama(Default::default()))?;
    if let Some(o) = ollama {
        let h = tokio::time::timeout(std::time::Duration::from_secs(3), o.health()).await;
        if let Ok(h) = h.as_ref().map_err(|_| ()).and_then(|h| if h.up { Ok(h) } else { Err(()) }) {
            for m in &h.models {
                rows.push(vec!["ollama".into(), m.clone(), "".into(), koubou_backend::ollama::resolve_url(None)]);
            }
        }
    }
    if ctx.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"source": r[0], "name": r[1], "size": r[2], "location": r[3]}))
            .collect();
        return output::json(&v);
    }
    output::table(&["SOURCE", "NAME", "SIZE", "LOCATION"], &rows);
    Ok(())
}
