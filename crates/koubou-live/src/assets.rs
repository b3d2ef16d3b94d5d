//! Files embedded in the binary: the dashboard's and GraphiQL's (vendored by
//! `scripts/vendor-graphiql.sh`, with their licenses).

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// One embedded file.
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ty:literal, $path:literal) => {
        Asset { name: $name, content_type: $ty, body: include_bytes!($path) }
    };
}

pub const DASHBOARD: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8", "../assets/dashboard/index.html"),
    asset!("app.js", "text/javascript; charset=utf-8", "../assets/dashboard/app.js"),
    asset!("charts.js", "text/javascript; charset=utf-8", "../assets/dashboard/charts.js"),
    asset!("app.css", "text/css; charset=utf-8", "../assets/dashboard/app.css"),
    asset!("favicon.svg", "image/svg+xml", "../assets/dashboard/favicon.svg"),
];

pub const GRAPHIQL: &[Asset] = &[
    asset!("graphiql.html", "text/html; charset=utf-8", "../assets/graphiql.html"),
    asset!("graphiql-init.js", "text/javascript; charset=utf-8", "../assets/graphiql-init.js"),
    asset!("graphiql.min.js", "text/javascript; charset=utf-8", "../assets/vendor/graphiql.min.js"),
    asset!("graphiql.min.css", "text/css; charset=utf-8", "../assets/vendor/graphiql.min.css"),
    asset!("react.production.min.js", "text/javascript; charset=utf-8", "../assets/vendor/react.production.min.js"),
    asset!(
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        "../assets/vendor/react-dom.production.min.js"
    ),
    asset!("LICENSE.graphiql", "text/plain; charset=utf-8", "../assets/vendor/LICENSE.graphiql"),
    asset!("LICENSE.react", "text/plain; charset=utf-8", "../assets/vendor/LICENSE.react"),
    asset!("LICENSE.react-dom", "text/plain; charset=utf-8", "../assets/vendor/LICENSE.react-dom"),
    asset!("VERSIONS", "text/plain; charset=utf-8", "../assets/vendor/VERSIONS"),
];

/// Serves `name` from `set`, or 404.
pub fn serve(set: &[Asset], name: &str) -> Response {
    match set.iter().find(|a| a.name == name) {
        Some(a) => {
            let cache = if name.ends_with(".html") { "no-cache" } else { "public, max-age=3600" };
            (
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static(a.content_type)),
                    (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
                    (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                ],
                a.body,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

/// A content security policy that keeps pages to their own origin.
pub const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                       font-src 'self' data:; connect-src 'self'; script-src 'self'; \
                       object-src 'none'; base-uri 'none'; frame-ancestors 'none'";
