//! `/metrics`: Prometheus text exposition, written by hand (a dozen series need no library).

use std::fmt::Write;

use koubou_task::TaskStatus;

use crate::{
    api::ApiError,
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
        let _ = writeln!(o, "koubou_backend_up{{backend=\"{name}\"}} {}", u8::from(h.up));
    }
    let _ = writeln!(
        o,
        "# HELP koubou_resident_memory_bytes Resident memory of the koubou process.\n# TYPE koubou_resident_memory_bytes gauge"
    );
    let _ = writeln!(o, "koubou_resident_memory_bytes {}", koubou_worker::memory::rss_bytes().unwrap_or(0));
    let _ = writeln!(o, "# HELP koubou_uptime_seconds Seconds since start.\n# TYPE koubou_uptime_seconds gauge");
    let _ = writeln!(o, "koubou_uptime_seconds {}", k.uptime().as_secs());
    Ok(o)
}
