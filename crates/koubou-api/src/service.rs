//! The [`Api`] trait: the operations every face calls.

use std::{pin::Pin, time::Duration};

use async_trait::async_trait;
use futures::Stream;
use koubou_task::{Event, Limits, TaskId};

use crate::{
    ApiError, HealthView, ListQuery, Second, SubmitRequest, SubmitResponse, SystemInfo, SystemStatus, TaskList,
    TaskView, WorkersView,
};

/// One task's events ([`Api::watch`]).
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, ApiError>> + Send>>;

/// Every event ([`Api::events`]), in `seq` order; an `Err` says how many a reader too slow to
/// keep up missed (it may read on, or stop).
pub type EventFeed = koubou_task::Subscription;

/// The operations every face offers. Faces hold an `Arc<dyn Api>` and nothing else of the
/// system: `koubou_system::Koubou` implements it in-process, `koubou_client::Client` over HTTP.
#[async_trait]
pub trait Api: Send + Sync {
    async fn submit(&self, req: SubmitRequest) -> Result<SubmitResponse, ApiError>;
    async fn task(&self, id: TaskId) -> Result<TaskView, ApiError>;
    async fn tasks(&self, query: ListQuery) -> Result<TaskList, ApiError>;
    async fn cancel(&self, id: TaskId) -> Result<TaskView, ApiError>;
    async fn workers(&self) -> Result<WorkersView, ApiError>;
    /// Every node registered with the queue (this one included), oldest first.
    async fn nodes(&self) -> Result<crate::NodesView, ApiError>;
    async fn health(&self) -> Result<HealthView, ApiError>;
    async fn status(&self) -> Result<SystemStatus, ApiError>;
    /// Events about one task (tokens, state changes) from now until it ends. Ends at once
    /// (after one synthetic event carrying its state) if the task is already finished.
    async fn watch(&self, id: TaskId) -> Result<EventStream, ApiError>;
    /// Every event after `after` that the log still keeps, then every new one (tokens
    /// included); with `None`, from now on. For faces that relay the whole stream (WebSocket
    /// topics, GraphQL subscriptions, the dashboard's charts) and readers that resume.
    async fn events(&self, after: Option<u64>) -> Result<EventFeed, ApiError>;
    /// Prometheus text exposition of the queue, tasks, tokens, workers and backends.
    async fn metrics_text(&self) -> Result<String, ApiError>;
    /// Where the system keeps its files, and its version.
    async fn info(&self) -> Result<SystemInfo, ApiError>;
    /// Tasks finished and tokens streamed in each of the last `secs` seconds, oldest first.
    async fn history(&self, secs: usize) -> Result<Vec<Second>, ApiError>;
    /// The limits submissions and messages are held to: faces size request bodies, WebSocket
    /// messages and GraphQL documents by them.
    fn limits(&self) -> Limits;

    /// Waits up to `timeout` for the task to finish, calling `on_token` with each piece of the
    /// answer as it streams; returns the task as it stands then (finished or not).
    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
        on_token: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<TaskView, ApiError> {
        use futures::StreamExt;
        let mut events = self.watch(id).await?;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                e = events.next() => match e {
                    Some(Ok(e)) => {
                        if let koubou_task::EventKind::TaskToken { text, .. } = &e.kind {
                            on_token(text);
                        }
                        if e.kind.is_terminal() {
                            break;
                        }
                    }
                    Some(Err(err)) => return Err(err),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        self.task(id).await
    }
}
