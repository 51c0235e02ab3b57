//! `GET /v1/models`, `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, `GET /health`.

use super::chat::messages;
use super::error::ApiError;
use super::extract::AppJson;
use super::AppState;
use crate::keys::AuthorizedKey;
use crate::openai::{
    DetokenizeRequest, DetokenizeResponse, Health, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};

fn card(state: &AppState, id: &str) -> ModelCard {
    ModelCard {
        id: id.to_owned(),
        object: "model".into(),
        created: state.model.created,
        owned_by: "lambda-llm".into(),
    }
}

/// Lists the served model and its aliases (those the key may use).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)), security(("api_key" = [])))]
pub async fn list_models(State(state): State<AppState>, Extension(key): Extension<AuthorizedKey>) -> Json<ModelList> {
    let m = &state.model;
    let data = std::iter::once(&m.id)
        .chain(m.aliases.iter())
        .filter(|name| key.allows_model(name) || key.allows_model(&m.id))
        .map(|name| card(&state, name))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// One model by id or alias; unknown is 404 `model_not_found`.
#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path, description = "Model id or alias")),
    responses((status = 200, body = ModelCard), (status = 404, body = crate::openai::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    Extension(key): Extension<AuthorizedKey>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelCard>, ApiError> {
    // An id that does not percent-decode to UTF-8 names no model: the same 404 envelope, not axum's text reply.
    let Path(id) = id.map_err(|_| ApiError::model_not_found("(undecodable id)"))?;
    let resolved = state.model.resolve(&id).ok_or_else(|| ApiError::model_not_found(&id))?;
    if !(key.allows_model(&id) || key.allows_model(resolved)) {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(card(&state, &id)))
}

/// The model named in the request (default: the served one) must exist and be allowed for the key.
fn check_model(state: &AppState, model: Option<&str>, key: &AuthorizedKey) -> Result<(), ApiError> {
    let model = model.unwrap_or(&state.model.id);
    super::params::resolve_model(state, Some(model), key).map(|_| ())
}

/// Token ids of a prompt, or of chat messages rendered with the chat template.
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = crate::openai::ErrorResponse),
              (status = 404, description = "Unknown model", body = crate::openai::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn tokenize(
    State(state): State<AppState>,
    Extension(key): Extension<AuthorizedKey>,
    AppJson(req): AppJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref(), &key)?;
    let text = match (req.prompt, req.messages) {
        (Some(p), None) => p,
        (None, Some(m)) => {
            let msgs = messages(Some(&m))?;
            let template = state
                .model
                .chat
                .as_ref()
                .ok_or_else(|| ApiError::invalid("messages", "This model has no chat template."))?;
            template
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "Provide exactly one of `prompt` or `messages`.",
            ))
        }
    };
    let tokens = state.model.tokenizer.encode(&text)?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: state.model.context_length,
    }))
}

/// Text of token ids (special tokens included).
#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = crate::openai::ErrorResponse),
              (status = 404, description = "Unknown model", body = crate::openai::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn detokenize(
    State(state): State<AppState>,
    Extension(key): Extension<AuthorizedKey>,
    AppJson(req): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref(), &key)?;
    let vocab = state.model.vocab_size;
    let ids = req
        .tokens
        .ok_or_else(|| ApiError::invalid("tokens", "You must provide `tokens`."))?
        .into_iter()
        .map(|t| {
            u32::try_from(t).ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
                ApiError::invalid("tokens", format!("token id {t} is outside the vocabulary (0..{vocab})"))
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(Json(DetokenizeResponse {
        prompt: state.model.tokenizer.decode_with(&ids, false)?,
    }))
}

/// Liveness without a key: 200 when the model thread runs, 503 otherwise.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let loaded = state.worker.is_alive();
    let status = if loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if loaded { "ok" } else { "unavailable" }.into(),
        model: state.model.id.clone(),
        model_loaded: loaded,
    };
    (status, Json(body))
}
