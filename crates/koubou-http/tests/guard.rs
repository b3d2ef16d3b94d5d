//! The guard in front of a router, driven with `oneshot` (no sockets needed).

use std::sync::Arc;

use axum::{Router, body::Body, http::Request, routing::get};
use koubou_http::{Guard, guard};
use tower::ServiceExt;

fn app(token: Option<&str>) -> Router {
    let g = Arc::new(Guard { token: token.map(str::to_owned), allowed_origins: vec![] });
    Router::new().route("/x", get(|| async { "ok" })).layer(axum::middleware::from_fn_with_state(g, guard))
}

async fn status(app: Router, req: Request<Body>) -> (u16, Option<String>) {
    let r = app.oneshot(req).await.unwrap();
    let cookie = r.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), cookie)
}

#[tokio::test]
async fn token_by_header_query_or_cookie() {
    let req = |uri: &str| Request::get(uri);
    assert_eq!(status(app(None), req("/x").body(Body::empty()).unwrap()).await.0, 200);
    assert_eq!(status(app(Some("t0k")), req("/x").body(Body::empty()).unwrap()).await.0, 401);
    let wrong = req("/x").header("authorization", "Bearer nope").body(Body::empty()).unwrap();
    assert_eq!(status(app(Some("t0k")), wrong).await.0, 401);
    let right = req("/x").header("authorization", "Bearer t0k").body(Body::empty()).unwrap();
    assert_eq!(status(app(Some("t0k")), right).await, (200, None));
    let (code, cookie) = status(app(Some("t0k")), req("/x?access_token=t0k").body(Body::empty()).unwrap()).await;
    assert_eq!(code, 200);
    let cookie = cookie.expect("a valid query token sets the cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let with_cookie = req("/x").header("cookie", "koubou_token=t0k").body(Body::empty()).unwrap();
    assert_eq!(status(app(Some("t0k")), with_cookie).await.0, 200);
}

#[tokio::test]
async fn foreign_origin_is_refused_and_no_origin_passes() {
    let evil = Request::get("/x").header("origin", "https://evil.example").body(Body::empty()).unwrap();
    assert_eq!(status(app(None), evil).await.0, 403);
    let local = Request::get("/x").header("origin", "http://127.0.0.1:8765").body(Body::empty()).unwrap();
    assert_eq!(status(app(None), local).await.0, 200);
}
