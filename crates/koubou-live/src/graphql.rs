//! The GraphQL endpoint: `/graphql` answers POST queries, GET queries, graphql-ws upgrades
//! (`graphql-transport-ws` and the legacy `graphql-ws` subprotocol) and — for a GET without a
//! query — the GraphiQL page, whose files are served from `/graphql/assets/`.
//!
//! What a web page could send without the browser asking Koubou first is refused (the guard
//! checks `Origin`; this checks the rest): a mutation runs only from a POST whose
//! `Content-Type` is `application/json` — never from a GET (an `<img>` tag can send one: 405,
//! `Allow: POST`), nor from a form or `text/plain` POST (415; multipart uploads are off).
//! A document over the [`crate::gql_limits`] gets 400 before anything runs. These errors are
//! GraphQL-shaped (`{"errors": [{"message", "extensions": {"code", "field"}}]}`), like the
//! schema's own.

use async_graphql::{
    Response as GqlResponse, ServerError,
    http::ALL_WEBSOCKET_PROTOCOLS,
    parser::{parse_query, types::OperationType},
};
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{FromRequestParts, Request, State, ws::WebSocketUpgrade},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;

use koubou_api::Api;

use crate::{
    assets,
    gql::{KoubouSchema, schema},
    gql_limits::{is_limit_error, operation_type},
    ws::{WsLimits, WsSlot},
};

#[derive(Clone)]
struct Gql {
    schema: KoubouSchema,
    ws: WsLimits,
}

/// Router for port 8767: `/graphql` (+ `/graphql/assets/{file}`); `/` redirects to `/graphql`.
pub fn graphql_router(k: Arc<dyn Api>) -> Router {
    let ws = WsLimits::from_limits(&k.limits());
    graphql_router_with(k, ws)
}

/// [`graphql_router`] with the port's shared WebSocket limits.
pub fn graphql_router_with(k: Arc<dyn Api>, ws: WsLimits) -> Router {
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/assets/{file}", get(graphiql_asset))
        .route("/", get(|| async { axum::response::Redirect::temporary("/graphql") }))
        .with_state(Gql { schema: schema(k), ws })
}

/// A GraphQL-shaped error with an HTTP status (`extensions.code` and `extensions.field`).
fn refuse(status: StatusCode, code: &str, field: &str, message: String) -> Response {
    let mut e = ServerError::new(message, None);
    let mut ext = async_graphql::ErrorExtensionValues::default();
    ext.set("code", code);
    ext.set("field", field);
    e.extensions = Some(ext);
    (status, GraphQLResponse::from(GqlResponse::from_errors(vec![e]))).into_response()
}

/// Runs `req`; a document over a limit is answered 400 (nothing ran).
async fn run(schema: &KoubouSchema, req: async_graphql::Request) -> Response {
    let resp = schema.execute(req).await;
    let status = if resp.errors.iter().any(is_limit_error) { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    (status, GraphQLResponse::from(resp)).into_response()
}

async fn graphql_post(State(g): State<Gql>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    if !ct.is_some_and(mime_is_json) {
        let ct = ct.map_or_else(|| "no Content-Type".to_owned(), |ct| format!("{ct:?}"));
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type",
            format!("send GraphQL requests as JSON (Content-Type: application/json), not {ct}"),
        );
    }
    match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(req) => run(&g.schema, req).await,
        Err(e) => refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body",
            format!("the body is not a GraphQL request ({{\"query\", \"variables\"?, \"operationName\"?}}): {e}"),
        ),
    }
}

fn mime_is_json(ct: &str) -> bool {
    ct.parse::<mime::Mime>().is_ok_and(|m| m.essence_str() == "application/json")
}

async fn graphql_get(State(g): State<Gql>, req: Request<Body>) -> Response {
    let (mut parts, body) = req.into_parts();
    if parts.headers.contains_key(header::UPGRADE) {
        let protocol = match GraphQLProtocol::from_request_parts(&mut parts, &()).await {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(u) => u,
            Err(e) => return e.into_response(),
        };
        let (upgrade, slot) = match g.ws.admit(upgrade) {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        let schema = g.schema.clone();
        return upgrade
            .protocols(ALL_WEBSOCKET_PROTOCOLS)
            .on_upgrade(move |socket| subscriptions(socket, schema, protocol, slot))
            .into_response();
    }
    // No query: the GraphiQL page, for a browser and for any other client that only checks the
    // endpoint is up (the prototype's `test_graphql.py` does, with `Accept: */*`).
    if parts.uri.query().is_none_or(|q| !q.contains("query=")) {
        return graphiql_page();
    }
    let req = Request::from_parts(parts, body);
    let r = match <GraphQLRequest as axum::extract::FromRequest<()>>::from_request(req, &()).await {
        Ok(r) => r.into_inner(),
        Err(e) => return e.into_response(),
    };
    // Only a query may run from a GET. (A document that does not parse is left to `execute`,
    // which says why.)
    if let Ok(doc) = parse_query(&r.query)
        && operation_type(&doc, r.operation_name.as_deref()) == Some(OperationType::Mutation)
    {
        let mut resp = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "query",
            "a mutation runs only from a POST with Content-Type: application/json, never from a GET".into(),
        );
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    run(&g.schema, r).await
}

/// graphql-ws on one connection, which holds its `slot` until it ends. A message over the size
/// limit ends it with close code 1009 (async-graphql-axum would just drop the connection).
async fn subscriptions(
    socket: axum::extract::ws::WebSocket,
    schema: KoubouSchema,
    protocol: GraphQLProtocol,
    slot: WsSlot,
) {
    use axum::extract::ws::Message;
    let (mut sink, stream) = socket.split();
    let (tx, mut rx) = futures::channel::mpsc::channel::<Message>(16);
    let (too_big_tx, too_big_rx) = std::sync::mpsc::channel();
    let stream = stream.inspect(|m| {
        if let Err(e) = m
            && let Some(frame) = slot.too_big(e)
        {
            let _ = too_big_tx.send(frame);
        }
    });
    let serve = GraphQLWebSocket::new_with_pair(tx, stream, schema, protocol).serve();
    let forward = async {
        while let Some(m) = rx.next().await {
            if sink.send(m).await.is_err() {
                return None;
            }
        }
        Some(sink)
    };
    let ((), sink) = futures::future::join(serve, forward).await;
    if let (Some(mut sink), Ok(frame)) = (sink, too_big_rx.try_recv()) {
        tracing::info!(reason = %frame.reason, "closing GraphQL WebSocket client");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
    }
}

fn graphiql_page() -> Response {
    let mut r = assets::serve(assets::GRAPHIQL, "graphiql.html");
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(assets::CSP));
    r
}

async fn graphiql_asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    assets::serve(assets::GRAPHIQL, &file)
}
