//! The AWS Lambda adapter: the same router behind the Runtime API, with stage prefixes stripped and the
//! invocation's deadline passed to generation.

use crate::http::{router, AppState, Deadline};
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use lambda_http::request::RequestContext;
use lambda_http::RequestExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time kept back from the invocation's deadline to finish the response (flush the stream, log, return).
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(1500);

/// The router as the Lambda function serves it.
///
/// The Lambda middleware must run before routing (it rewrites the path), and `Router::layer` runs after it, so the
/// API router is nested as the fallback service of an outer router that carries the layer.
pub fn app(state: AppState) -> Router {
    Router::new()
        .fallback_service(router(state))
        .layer(middleware::from_fn(lambda_request))
}

/// Strips an API Gateway stage prefix (`/prod/v1/...` → `/v1/...`) and turns the invocation deadline into a
/// [`Deadline`]. Requests that did not come through the Runtime API pass unchanged.
async fn lambda_request(mut req: Request, next: Next) -> Response {
    if let Some(stage) = stage(req.request_context_ref()) {
        let prefix = format!("/{stage}");
        let path = req.uri().path();
        if path == prefix || path.starts_with(&format!("{prefix}/")) {
            let rest = &path[prefix.len()..];
            let rest = if rest.is_empty() { "/" } else { rest };
            let pq = match req.uri().query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            };
            if let Ok(uri) = pq.parse() {
                *req.uri_mut() = uri;
            }
        }
    }
    if let Some(deadline) = req
        .lambda_context_ref()
        .and_then(|c| deadline(c.deadline, SystemTime::now()))
    {
        req.extensions_mut().insert(Deadline(deadline));
    }
    let mut resp = next.run(req).await;
    // Hop-by-hop headers mean nothing through the Runtime API, and `connection: close` on a streamed response makes
    // the runtime's own connection to the Runtime API end early.
    resp.headers_mut().remove(axum::http::header::CONNECTION);
    resp
}

/// The stage that lambda_http put in front of the path, if any (`$default` never is).
fn stage(ctx: Option<&RequestContext>) -> Option<String> {
    let stage = match ctx? {
        RequestContext::ApiGatewayV1(c) => c.stage.clone(),
        RequestContext::ApiGatewayV2(c) => c.stage.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    }?;
    (!stage.is_empty() && stage != "$default").then_some(stage)
}

/// Deadlines below this many epoch milliseconds (September 2001) cannot be absolute: they are a time budget.
const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;

/// The instant to stop generating, from the invocation deadline (0 = unknown).
///
/// Lambda sends epoch milliseconds; `cargo lambda watch`'s emulator sends the remaining budget in milliseconds
/// (e.g. `600000`), so small values are read as a duration from now.
pub fn deadline(deadline_ms: u64, now: SystemTime) -> Option<Instant> {
    if deadline_ms == 0 {
        return None;
    }
    let left = if deadline_ms < EPOCH_MS_FLOOR {
        Duration::from_millis(deadline_ms)
    } else {
        let now_ms = now.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64;
        Duration::from_millis(deadline_ms.saturating_sub(now_ms))
    };
    Some(Instant::now() + left.saturating_sub(DEADLINE_MARGIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(d: Option<Instant>) -> Duration {
        d.unwrap().saturating_duration_since(Instant::now())
    }

    #[test]
    fn epoch_deadlines_keep_a_margin_and_unknown_is_none() {
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        assert_eq!(deadline(0, now), None);
        let l = left(deadline(1_800_000_010_000, now));
        assert!(
            l <= Duration::from_millis(8_500) && l > Duration::from_millis(8_000),
            "{l:?}"
        );
        // Already past: stop at once.
        assert_eq!(left(deadline(1_799_999_999_000, now)), Duration::ZERO);
    }

    #[test]
    fn small_deadlines_are_a_budget_as_the_emulator_sends_them() {
        let l = left(deadline(600_000, SystemTime::now()));
        assert!(
            l <= Duration::from_millis(598_500) && l > Duration::from_millis(598_000),
            "{l:?}"
        );
    }
}
