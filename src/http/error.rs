//! One error type for the whole API, rendered once: as a JSON response or as an SSE `data:` event.

use crate::core::{ModelError, ValidationError};
use crate::keys::AuthError;
use crate::openai::{ErrorBody, ErrorResponse};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An API failure with OpenAI's status, type, param and code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI error type (`invalid_request_error`, …).
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<String>,
    /// Seconds to wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e
    }

    /// 400 about the request as a whole (malformed JSON, …).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found".into());
        e
    }

    /// 404 for an unknown route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown route: {method} {path}"),
        );
        e.code = Some("unknown_url".into());
        e
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed for {path}"),
        );
        e.code = Some("method_not_allowed".into());
        e
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the limit of {limit} bytes."),
        )
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.code = Some("rate_limit_exceeded".into());
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// 503 with `Retry-After` (overloaded, or keys not loaded).
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// 500: something failed inside; the message is safe to show (no internals beyond the error text).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The OpenAI envelope.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }

    /// The envelope as one SSE data line (`data: {"error":…}\n\n`), for errors after a stream started.
    pub fn sse_data(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| r#"{"error":{"message":"error"}}"#.to_owned())
    }
}

impl From<ValidationError> for ApiError {
    fn from(v: ValidationError) -> Self {
        let mut e = ApiError::invalid(v.param, v.message);
        e.code = v.code.map(str::to_owned);
        e
    }
}

impl From<ModelError> for ApiError {
    fn from(m: ModelError) -> Self {
        match m {
            ModelError::CapacityExceeded { .. } => {
                let mut e = ApiError::invalid("messages", m.to_string());
                e.code = Some("context_length_exceeded".into());
                e
            }
            ModelError::InvalidInput(msg) => ApiError::invalid("prompt", msg),
            ModelError::Backend(msg) => ApiError::internal(format!("The model failed: {msg}")),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(a: AuthError) -> Self {
        match a {
            AuthError::Missing => {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.",
                );
                e.code = Some("invalid_api_key".into());
                e
            }
            AuthError::Invalid => {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "Incorrect API key provided.",
                );
                e.code = Some("invalid_api_key".into());
                e
            }
            AuthError::ModelNotAllowed { model } => {
                let mut e = ApiError::new(
                    StatusCode::FORBIDDEN,
                    "invalid_request_error",
                    format!("This API key is not allowed to use the model `{model}`."),
                );
                e.param = Some("model".into());
                e.code = Some("model_not_allowed".into());
                e
            }
            AuthError::Unavailable => {
                ApiError::unavailable("API keys are not available right now; try again shortly.", 5)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
