//! Request extractors whose rejections are our error envelope: JSON bodies (any content type) and the API key.

use super::error::ApiError;
use super::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// A JSON body parsed with the failing field named in `param`.
///
/// The content type is not checked: `curl -d` sends form-encoded headers with JSON bodies, and OpenAI accepts them.
pub struct AppJson<T>(pub T);

/// A rejected body: 413 closes the connection (the rest of the body was never read).
pub struct BodyRejection(ApiError);

impl axum::response::IntoResponse for BodyRejection {
    fn into_response(self) -> axum::response::Response {
        if self.0.status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            super::auth::unread_body(self.0)
        } else {
            self.0.into_response()
        }
    }
}

impl From<ApiError> for BodyRejection {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for AppJson<T> {
    type Rejection = BodyRejection;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(ref inner) if is_length_limit(inner) => {
                ApiError::too_large(state.limits.max_body_bytes)
            }
            other => ApiError::bad_request(format!("Could not read the request body: {other}")),
        })?;
        Ok(AppJson(parse_json(&bytes)?))
    }
}

fn is_length_limit(e: &dyn std::error::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("length limit exceeded") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Parses `bytes` as `T`, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "The request body is empty; expected a JSON object.",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::bad_request(format!("We could not parse the JSON body of your request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::CompletionRequest;

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse_json::<CompletionRequest>(br#"{"model":"m","temperature":"hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("temperature"), "{}", e.message);
        let e = parse_json::<CompletionRequest>(br#"{"stop":[1,2]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
    }

    #[test]
    fn malformed_and_empty_bodies_are_400s_without_param() {
        for body in [&b"{\"model\": "[..], b"not json", b"", b"  ", b"[1,2]"] {
            let e = parse_json::<CompletionRequest>(body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
