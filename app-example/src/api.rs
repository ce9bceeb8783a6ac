//! The JSON API.
//!
//! - `POST   /api/album`       `{"title": "...", "songs": [{"title": "..."}]}` → 201 `{"id": N}`
//! - `GET    /api/album/{id}`  → 200 `{"id", "title", "songs": [{"id", "title", "position"}]}`
//! - `GET    /api/albums?page=1&per_page=20` → 200 `{"page", "per_page", "total", "albums"}`
//! - `PUT    /api/album/{id}`  same body as POST → 200 with the album
//! - `DELETE /api/album/{id}`  → 204
//!
//! Errors: 400 (bad input), 404 (no such album), 415 (body not JSON), 500; always with a
//! JSON body `{"error": "..."}`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use deadpool_postgres::Pool;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::input::{AlbumBody, AlbumInput, album_id, paging};
use crate::store;

type Body = Result<Json<Value>, JsonRejection>;

/// The validated album of a JSON body.
fn album_input(body: Body) -> Result<AlbumInput, ApiError> {
    let value = match body {
        Ok(Json(value)) => value,
        Err(JsonRejection::MissingJsonContentType(e)) => {
            return Err(ApiError::UnsupportedMediaType(e.body_text()));
        }
        Err(e) => return Err(ApiError::BadRequest(e.body_text())),
    };
    // serde would also read a struct from a JSON array, by position; the API takes objects.
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object: {\"title\": \"...\", \"songs\": [{\"title\": \"...\"}]}"
                .to_owned(),
        ));
    }
    let body: AlbumBody = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("invalid album: {e}")))?;
    AlbumInput::from_body(body)
}

pub async fn create(State(pool): State<Pool>, body: Body) -> Result<impl IntoResponse, ApiError> {
    let input = album_input(body)?;
    let id = store::create(&pool, &input).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/album/{id}"))],
        Json(json!({ "id": id })),
    ))
}

pub async fn read(
    State(pool): State<Pool>,
    Path(id): Path<String>,
) -> Result<Json<store::Album>, ApiError> {
    let id = album_id(&id)?;
    store::album(&pool, id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound(id))
}

pub async fn list(
    State(pool): State<Pool>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (page, per_page) = paging(
        q.get("page").map(String::as_str),
        q.get("per_page").map(String::as_str),
    )?;
    let (albums, total) = store::page(&pool, page, per_page).await?;
    Ok(Json(json!({
        "page": page,
        "per_page": per_page,
        "total": total,
        "albums": albums,
    })))
}

pub async fn update(
    State(pool): State<Pool>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let id = album_id(&id)?;
    let input = album_input(body)?;
    if !store::update(&pool, id, &input).await? {
        return Err(ApiError::NotFound(id));
    }
    let songs: Vec<Value> = input
        .songs
        .iter()
        .zip(1..)
        .map(|(title, position)| json!({ "title": title, "position": position }))
        .collect();
    Ok(Json(
        json!({ "id": id, "title": input.title, "songs": songs }),
    ))
}

pub async fn delete(
    State(pool): State<Pool>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = album_id(&id)?;
    if store::delete(&pool, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(id))
    }
}
