//! The guard in front of a router, driven with `oneshot` (no sockets needed). The attacks on the
//! real binary are in `crates/koubou/tests/guard.rs`.

use std::sync::Arc;

use axum::{Router, body::Body, http::Request, routing::get};
use koubou_http::{Guard, guard};
use tower::ServiceExt;

fn app(g: Guard) -> Router {
    Router::new().route("/x", get(|| async { "ok" })).layer(axum::middleware::from_fn_with_state(Arc::new(g), guard))
}

fn token(t: &str) -> Router {
    app(Guard::loopback(8765).with_token(t))
}

fn req(uri: &str) -> axum::http::request::Builder {
    Request::get(uri).header("host", "127.0.0.1:8765")
}

async fn status(app: Router, req: Request<Body>) -> (u16, Option<String>) {
    let r = app.oneshot(req).await.unwrap();
    let cookie = r.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), cookie)
}

async fn refusal(app: Router, req: Request<Body>) -> (u16, serde_json::Value) {
    let r = app.oneshot(req).await.unwrap();
    let code = r.status().as_u16();
    let body = http_body_util::BodyExt::collect(r.into_body()).await.unwrap().to_bytes();
    (code, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test]
async fn token_by_header_query_or_cookie() {
    let open = app(Guard::loopback(8765));
    assert_eq!(status(open, req("/x").body(Body::empty()).unwrap()).await.0, 200);
    assert_eq!(status(token("t0k"), req("/x").body(Body::empty()).unwrap()).await.0, 401);
    let wrong = req("/x").header("authorization", "Bearer nope").body(Body::empty()).unwrap();
    assert_eq!(status(token("t0k"), wrong).await.0, 401);
    let right = req("/x").header("authorization", "Bearer t0k").body(Body::empty()).unwrap();
    assert_eq!(status(token("t0k"), right).await, (200, None));
    let (code, cookie) = status(token("t0k"), req("/x?access_token=t0k").body(Body::empty()).unwrap()).await;
    assert_eq!(code, 200);
    let cookie = cookie.expect("a valid query token sets the cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let with_cookie = req("/x").header("cookie", "koubou_token=t0k").body(Body::empty()).unwrap();
    assert_eq!(status(token("t0k"), with_cookie).await.0, 200);
}

#[tokio::test]
async fn foreign_origin_is_refused_and_no_origin_passes() {
    let a = || app(Guard::loopback(8765));
    let evil = req("/x").header("origin", "https://evil.example").body(Body::empty()).unwrap();
    let (code, body) = refusal(a(), evil).await;
    assert_eq!(
        (code, body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (403, Some("forbidden_origin"), Some("Origin"))
    );
    let own = req("/x").header("origin", "http://127.0.0.1:8765").body(Body::empty()).unwrap();
    assert_eq!(status(a(), own).await.0, 200);
    // Another local port is another origin.
    let other_port = req("/x").header("origin", "http://127.0.0.1:3000").body(Body::empty()).unwrap();
    assert_eq!(status(a(), other_port).await.0, 403);
}

#[tokio::test]
async fn host_must_be_ours_and_checked_before_the_token() {
    let a = || token("t0k");
    for host in ["evil.example", "evil.example:8765", "localhost.evil.example", "127.0.0.1.nip.io:8765", "x y"] {
        let r =
            Request::get("/x").header("host", host).header("authorization", "Bearer t0k").body(Body::empty()).unwrap();
        let (code, body) = refusal(a(), r).await;
        assert_eq!(code, 403, "{host}");
        assert_eq!(body["error"]["code"], "forbidden_host", "{host}: {body}");
        assert_eq!(body["error"]["field"], "Host");
    }
    // No Host at all, or two of them.
    let (code, body) = refusal(a(), Request::get("/x").body(Body::empty()).unwrap()).await;
    assert_eq!((code, body["error"]["message"].as_str()), (403, Some("a Host header is required")));
    let two =
        Request::get("/x").header("host", "127.0.0.1").header("host", "evil.example").body(Body::empty()).unwrap();
    assert_eq!(refusal(a(), two).await.0, 403);
    // An absolute-form target names the host that counts.
    let absolute = Request::get("http://evil.example/x").header("host", "127.0.0.1").body(Body::empty()).unwrap();
    assert_eq!(refusal(a(), absolute).await.0, 403);
    // A foreign Host with an Origin equal to it is still refused.
    let rebound = Request::get("/x").header("host", "evil.example:8765").header("origin", "http://evil.example:8765");
    assert_eq!(refusal(a(), rebound.body(Body::empty()).unwrap()).await.0, 403);
}
