//! `/metrics`: Prometheus text exposition, written by hand (a dozen series need no library).

use std::fmt::Write;

use koubou_task::TaskStatus;

use koubou_api::ApiError;

use crate::{
    live::{Histogram, LATENCY_BUCKETS},
    system::Koubou,
};

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", h.counts.get(i).copied().unwrap_or(0));
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.count, h.sum, h.count);
}

/// A label value, escaped as the exposition format wants.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Tokens, answers and cost per backend, and what the local ones spared a paid API.
fn backend_usage(o: &mut String, router: &koubou_backend::Router) {
    let rows: Vec<_> =
        router.backends().map(|b| (label(b.name()), router.is_remote(b.name()), router.reading(b.name()))).collect();
    let _ = writeln!(
        o,
        "# HELP koubou_backend_tokens_total Tokens each backend processed since start (remote: prompts left the \
         machine).\n# TYPE koubou_backend_tokens_total counter"
    );
    for (name, remote, m) in &rows {
        for (kind, n) in [("prompt", m.prompt_tokens), ("completion", m.completion_tokens), ("cached", m.cached_tokens)]
        {
            let _ = writeln!(
                o,
                "koubou_backend_tokens_total{{backend=\"{name}\",remote=\"{remote}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP koubou_backend_answers_total Generations each backend completed since start.\n\
         # TYPE koubou_backend_answers_total counter"
    );
    for (name, remote, m) in &rows {
        let _ = writeln!(o, "koubou_backend_answers_total{{backend=\"{name}\",remote=\"{remote}\"}} {}", m.answers);
    }
    let _ = writeln!(
        o,
        "# HELP koubou_backend_cost_total What each backend's tokens cost at its configured prices since start \
         (the currency of the prices).\n# TYPE koubou_backend_cost_total counter"
    );
    for (name, remote, m) in &rows {
        let _ = writeln!(o, "koubou_backend_cost_total{{backend=\"{name}\",remote=\"{remote}\"}} {}", m.cost);
    }
    if let Some(s) = router.spared() {
        let _ = writeln!(
            o,
            "# HELP koubou_spared_cost_total Tokens served by local backends since start, valued at the [pricing] \
             reference prices: what a paid API would have charged for them.\n# TYPE koubou_spared_cost_total counter"
        );
        let _ = writeln!(o, "koubou_spared_cost_total {}", s.cost);
    }
}

pub async fn render(k: &Koubou) -> Result<String, ApiError> {
    let counts = k.counts().await?;
    let c = k.live().counters();
    let mut o = String::with_capacity(4096);
    let _ = writeln!(o, "# HELP koubou_queue_tasks Tasks in the queue by status.\n# TYPE koubou_queue_tasks gauge");
    for s in TaskStatus::ALL {
        let _ = writeln!(o, "koubou_queue_tasks{{status=\"{s}\"}} {}", counts.get(s));
    }
    let _ = writeln!(o, "# HELP koubou_tasks_total Task outcomes since start.\n# TYPE koubou_tasks_total counter");
    for (outcome, n) in [
        ("submitted", c.created),
        ("completed", c.completed),
        ("failed", c.failed),
        ("retried", c.retried),
        ("cancelled", c.cancelled),
        ("requeued", c.requeued),
    ] {
        let _ = writeln!(o, "koubou_tasks_total{{outcome=\"{outcome}\"}} {n}");
    }
    histogram(&mut o, "koubou_task_latency_seconds", "Submit-to-completion time of completed tasks.", &c.latency);
    histogram(&mut o, "koubou_task_run_seconds", "Time tasks spent running on a backend.", &c.run_time);
    let _ = writeln!(o, "# HELP koubou_tokens_total Tokens processed since start.\n# TYPE koubou_tokens_total counter");
    let _ = writeln!(o, "koubou_tokens_total{{kind=\"prompt\"}} {}", c.prompt_tokens);
    let _ = writeln!(o, "koubou_tokens_total{{kind=\"completion\"}} {}", c.completion_tokens);
    if let Some(pool) = k.pool() {
        let ws = pool.workers();
        let busy = ws.iter().filter(|w| w.state == "busy").count();
        let _ = writeln!(o, "# HELP koubou_workers Workers by state.\n# TYPE koubou_workers gauge");
        let _ = writeln!(
            o,
            "koubou_workers{{state=\"busy\"}} {busy}\nkoubou_workers{{state=\"idle\"}} {}",
            ws.len() - busy
        );
        let _ =
            writeln!(o, "# HELP koubou_workers_max Most workers the pool will run.\n# TYPE koubou_workers_max gauge");
        let _ = writeln!(o, "koubou_workers_max {}", pool.ceiling());
    }
    let _ = writeln!(
        o,
        "# HELP koubou_task_watchers Open streams of one task's events.\n# TYPE koubou_task_watchers gauge"
    );
    let _ = writeln!(o, "koubou_task_watchers {}", k.live().watchers());
    let _ = writeln!(
        o,
        "# HELP koubou_backend_up Whether a backend answered its last health check.\n# TYPE koubou_backend_up gauge"
    );
    let mut health: Vec<_> = k.backend_health().into_iter().collect();
    health.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, h) in health {
        let _ = writeln!(o, "koubou_backend_up{{backend=\"{}\"}} {}", label(&name), u8::from(h.up));
    }
    backend_usage(&mut o, k.router());
    let _ = writeln!(
        o,
        "# HELP koubou_resident_memory_bytes Resident memory of the koubou process.\n# TYPE koubou_resident_memory_bytes gauge"
    );
    let _ = writeln!(o, "koubou_resident_memory_bytes {}", koubou_worker::memory::rss_bytes().unwrap_or(0));
    let _ = writeln!(o, "# HELP koubou_uptime_seconds Seconds since start.\n# TYPE koubou_uptime_seconds gauge");
    let _ = writeln!(o, "koubou_uptime_seconds {}", k.uptime().as_secs());
    Ok(o)
}
