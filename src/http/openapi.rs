//! `GET /openapi.json`: the OpenAPI document, generated from the handlers' annotations and the wire types.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "lambda-llm", description = "OpenAI-compatible LLM API on a quantized ONNX model"),
    paths(
        super::completions::create,
        super::chat::create,
        super::info::list_models,
        super::info::get_model,
        super::info::tokenize,
        super::info::detokenize,
        super::info::health,
    ),
    modifiers(&BearerKey, &KeyedErrors)
)]
pub struct ApiDoc;

/// The errors every keyed route can answer, declared once: 401 (no or bad key), 429 (the key's rate limit), 503 (keys
/// unavailable, queue full); and 413 (body over `MAX_BODY_BYTES`) on those that take a body.
struct KeyedErrors;

impl Modify for KeyedErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorResponse")))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            for (op, takes_body) in [(&mut item.get, false), (&mut item.post, true)] {
                let Some(op) = op.as_mut().filter(|op| op.security.is_some()) else {
                    continue;
                };
                let mut add = |code: &str, what: &str| {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| error(what).into());
                };
                add("401", "Missing or invalid API key");
                add("429", "The key's rate limit; see Retry-After");
                add("503", "Keys unavailable or the model queue full; see Retry-After");
                if takes_body {
                    add("413", "Body larger than MAX_BODY_BYTES");
                }
            }
        }
    }
}

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = doc.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// Serves the document.
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
