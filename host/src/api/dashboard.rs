//! The operator's dashboard at `/`: one page of plain HTML, CSS and an ES module,
//! embedded in the binary (no CDN, no build step), that reads everything through the API with
//! the token the browser keeps. Its pages carry no data, so they are served without a token;
//! a strict Content-Security-Policy keeps them to this origin.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::state::AppState;
use crate::config::AuthMode;

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The dashboard's pages (each the same document; the script routes) and assets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/runs/{id}", get(page))
        .route("/plugins", get(page))
        .route("/schedules", get(page))
        .route("/health", get(page))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

async fn page(State(state): State<AppState>) -> Response {
    let auth = match state.settings.auth {
        AuthMode::Tokens => "tokens",
        AuthMode::None => "none",
    };
    asset("text/html; charset=utf-8", &INDEX.replace("{{auth}}", auth))
}

fn asset(content_type: &'static str, body: &str) -> Response {
    served(POLICY, content_type, body)
}

/// A page or asset of this origin under `policy`, never sniffed, cached or sent a referrer.
pub(super) fn served(policy: &'static str, content_type: &'static str, body: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body.to_owned(),
    )
        .into_response()
}
