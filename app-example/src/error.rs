//! The app's error type: what the client did wrong (400, 404, 415) or what failed on the
//! way to the database (500, logged). Every error answers with a JSON body
//! `{"error": "..."}`; the page renders its own errors as HTML.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed or fails validation.
    BadRequest(String),
    /// The request body is not JSON (missing or wrong Content-Type).
    UnsupportedMediaType(String),
    /// No album with this id.
    NotFound(i64),
    /// The database or the pool failed; the details go to the log, not to the client.
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message shown to the client.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m) | ApiError::UnsupportedMediaType(m) => m.clone(),
            ApiError::NotFound(id) => format!("album {id} not found"),
            ApiError::Internal(_) => "internal error; see the server log".to_owned(),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        (self.status(), Json(json!({ "error": self.message() }))).into_response()
    }
}
