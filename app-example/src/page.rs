//! The page at `/`: the newest albums with their songs, and a plain HTML form (no
//! JavaScript) that adds one. A good form redirects back to `/` (303, post/redirect/get);
//! a bad one is shown again with the error and what was typed (400).

use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use deadpool_postgres::Pool;
use serde::Deserialize;

use crate::error::ApiError;
use crate::input::AlbumInput;
use crate::store::{self, Album};

/// Albums shown on the page.
const SHOWN: i64 = 50;

#[derive(Debug, Default, Deserialize)]
pub struct NewAlbumForm {
    #[serde(default)]
    title: String,
    /// One song title per line.
    #[serde(default)]
    songs: String,
}

pub async fn show(State(pool): State<Pool>) -> Response {
    render(&pool, StatusCode::OK, None, &NewAlbumForm::default()).await
}

pub async fn add(
    State(pool): State<Pool>,
    form: Result<Form<NewAlbumForm>, FormRejection>,
) -> Response {
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            let err = ApiError::BadRequest(e.body_text());
            return render(&pool, err.status(), Some(&err), &NewAlbumForm::default()).await;
        }
    };
    let result = match AlbumInput::from_form(&form.title, &form.songs) {
        Ok(input) => store::create(&pool, &input).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => {
            if let ApiError::Internal(cause) = &e {
                tracing::error!(error = format!("{cause:#}"), "adding an album failed");
            }
            render(&pool, e.status(), Some(&e), &form).await
        }
    }
}

async fn render(
    pool: &Pool,
    status: StatusCode,
    error: Option<&ApiError>,
    form: &NewAlbumForm,
) -> Response {
    let albums = store::latest(pool, SHOWN).await;
    let (status, list) = match &albums {
        Ok(albums) => (status, album_list(albums)),
        Err(e) => {
            if let ApiError::Internal(cause) = e {
                tracing::error!(error = format!("{cause:#}"), "listing albums failed");
            }
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "<p class=\"error\">The albums could not be read; see the server log.</p>"
                    .to_owned(),
            )
        }
    };
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" role=\"alert\">{}</p>\n",
                escape(&e.message())
            )
        })
        .unwrap_or_default();
    let body = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Albums</title>
<style>
body {{ font-family: sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; }}
label {{ display: block; margin-top: .8em; }}
input, textarea {{ width: 100%; box-sizing: border-box; }}
.error {{ color: #a00; }}
li ol {{ color: #555; }}
</style>
</head>
<body>
<h1>Albums</h1>
{error}<form method="post" action="/">
<label for="title">Title</label>
<input id="title" name="title" required maxlength="{max}" value="{title}">
<label for="songs">Songs, one per line</label>
<textarea id="songs" name="songs" rows="5">{songs}</textarea>
<p><button type="submit">Add album</button></p>
</form>
{list}
<p><small>JSON: <a href="/api/albums">/api/albums</a></small></p>
</body>
</html>
"#,
        max = crate::input::MAX_TITLE_CHARS,
        title = escape(&form.title),
        songs = escape(&form.songs),
    );
    (status, Html(body)).into_response()
}

fn album_list(albums: &[Album]) -> String {
    if albums.is_empty() {
        return "<p id=\"albums\">No albums yet.</p>".to_owned();
    }
    let mut out = String::from("<ul id=\"albums\">\n");
    for a in albums {
        out.push_str(&format!(
            "<li data-id=\"{}\"><a href=\"/api/album/{}\">{}</a>",
            a.id,
            a.id,
            escape(&a.title)
        ));
        if !a.songs.is_empty() {
            out.push_str("<ol>");
            for s in &a.songs {
                out.push_str(&format!("<li>{}</li>", escape(&s.title)));
            }
            out.push_str("</ol>");
        }
        out.push_str("</li>\n");
    }
    out.push_str("</ul>");
    out
}

/// Escape text for HTML element content and double-quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<b>"Tom" & 'Jerry'</b>"#),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn lists_albums_with_songs() {
        let html = album_list(&[Album {
            id: 7,
            title: "A <b>".into(),
            songs: vec![store::Song {
                id: 1,
                title: "x".into(),
                position: 1,
            }],
        }]);
        assert!(html.contains(
            "<li data-id=\"7\"><a href=\"/api/album/7\">A &lt;b&gt;</a><ol><li>x</li></ol></li>"
        ));
    }
}
