//! The GraphQL endpoint: `/graphql` answers POST queries, GET queries, graphql-ws upgrades
//! (`graphql-transport-ws` and the legacy `graphql-ws` subprotocol) and — for a GET without a
//! query — the GraphiQL page, whose files are served from `/graphql/assets/`.

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::{
    Router,
    body::Body,
    extract::{FromRequestParts, Request, State, ws::WebSocketUpgrade},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use koubou_system::Koubou;

use crate::{
    assets,
    gql::{KoubouSchema, schema},
};

/// Router for port 8767: `/graphql` (+ `/graphql/assets/{file}`); `/` redirects to `/graphql`.
pub fn graphql_router(k: Koubou) -> Router {
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/assets/{file}", get(graphiql_asset))
        .route("/", get(|| async { axum::response::Redirect::temporary("/graphql") }))
        .with_state(schema(k))
}

async fn graphql_post(State(schema): State<KoubouSchema>, req: GraphQLRequest) -> GraphQLResponse {
    schema.execute(req.into_inner()).await.into()
}

async fn graphql_get(State(schema): State<KoubouSchema>, req: Request<Body>) -> Response {
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
        return upgrade
            .protocols(ALL_WEBSOCKET_PROTOCOLS)
            .on_upgrade(move |stream| GraphQLWebSocket::new(stream, schema, protocol).serve())
            .into_response();
    }
    // No query: the GraphiQL page, for a browser and for any other client that only checks the
    // endpoint is up (the prototype's `test_graphql.py` does, with `Accept: */*`).
    if parts.uri.query().is_none_or(|q| !q.contains("query=")) {
        return graphiql_page();
    }
    let req = Request::from_parts(parts, body);
    match <GraphQLRequest as axum::extract::FromRequest<()>>::from_request(req, &()).await {
        Ok(r) => GraphQLResponse::from(schema.execute(r.into_inner()).await).into_response(),
        Err(e) => e.into_response(),
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
