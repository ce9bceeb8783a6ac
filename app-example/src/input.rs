//! Validation shared by the JSON API and the HTML form. Nothing reaches the database
//! before the whole input passed, so a rejected request writes nothing.

use serde::Deserialize;

use crate::error::ApiError;

/// Longest album or song title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Most songs one album may have.
pub const MAX_SONGS: usize = 100;
/// Largest `per_page` of `GET /api/albums`.
pub const MAX_PER_PAGE: i64 = 100;
/// `per_page` when the request names none.
pub const DEFAULT_PER_PAGE: i64 = 20;
/// Largest `page`: keeps `OFFSET` small enough that a deep page stays a cheap query.
pub const MAX_PAGE: i64 = 10_000;

/// A validated album: trimmed title, 0 to [`MAX_SONGS`] trimmed song titles in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlbumInput {
    pub title: String,
    pub songs: Vec<String>,
}

/// The JSON body of `POST /api/album` and `PUT /api/album/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlbumBody {
    pub title: Option<String>,
    #[serde(default)]
    pub songs: Vec<SongBody>,
}

/// A song: `{"title": "..."}` as the API documents, or a bare string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SongBody {
    Object { title: String },
    Title(String),
}

impl SongBody {
    fn into_title(self) -> String {
        match self {
            SongBody::Object { title } | SongBody::Title(title) => title,
        }
    }
}

impl AlbumInput {
    /// Check an API body.
    pub fn from_body(body: AlbumBody) -> Result<AlbumInput, ApiError> {
        let title = body
            .title
            .ok_or_else(|| bad("title is required".to_owned()))?;
        Self::new(&title, body.songs.into_iter().map(SongBody::into_title))
    }

    /// Check the form: songs come one per line; blank lines are skipped.
    pub fn from_form(title: &str, songs: &str) -> Result<AlbumInput, ApiError> {
        Self::new(
            title,
            songs
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned),
        )
    }

    fn new(title: &str, songs: impl Iterator<Item = String>) -> Result<AlbumInput, ApiError> {
        let title = check_title("title", title)?;
        let songs: Vec<String> = songs.collect();
        if songs.len() > MAX_SONGS {
            return Err(bad(format!(
                "an album has at most {MAX_SONGS} songs (got {})",
                songs.len()
            )));
        }
        let songs = songs
            .iter()
            .enumerate()
            .map(|(i, s)| check_title(&format!("songs[{i}].title"), s))
            .collect::<Result<_, _>>()?;
        Ok(AlbumInput { title, songs })
    }
}

fn check_title(what: &str, raw: &str) -> Result<String, ApiError> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(bad(format!("{what} must not be empty")));
    }
    let chars = t.chars().count();
    if chars > MAX_TITLE_CHARS {
        return Err(bad(format!(
            "{what} is longer than {MAX_TITLE_CHARS} characters ({chars})"
        )));
    }
    if t.chars().any(char::is_control) {
        return Err(bad(format!("{what} must not contain control characters")));
    }
    Ok(t.to_owned())
}

/// An album id from the path: a positive integer.
pub fn album_id(raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(bad(format!(
            "album id must be a positive integer (got {raw:?})"
        ))),
    }
}

/// `page` and `per_page` of a listing: defaults 1 and [`DEFAULT_PER_PAGE`].
pub fn paging(page: Option<&str>, per_page: Option<&str>) -> Result<(i64, i64), ApiError> {
    let page = bounded("page", page, 1, 1, MAX_PAGE)?;
    let per_page = bounded("per_page", per_page, DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)?;
    Ok((page, per_page))
}

fn bounded(
    name: &str,
    raw: Option<&str>,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match raw.trim().parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(format!(
            "{name} must be an integer from {min} to {max} (got {raw:?})"
        ))),
    }
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        r.unwrap_err().message()
    }

    #[test]
    fn titles_are_trimmed_and_bounded() {
        let a = AlbumInput::from_form("  Kind of Blue ", "So What\n\n  Freddie Freeloader\r\n")
            .unwrap();
        assert_eq!(a.title, "Kind of Blue");
        assert_eq!(a.songs, ["So What", "Freddie Freeloader"]);
        assert!(msg(AlbumInput::from_form("   ", "")).contains("title must not be empty"));
        let long = "x".repeat(MAX_TITLE_CHARS + 1);
        assert!(msg(AlbumInput::from_form(&long, "")).contains("longer than 200"));
        assert!(AlbumInput::from_form(&"é".repeat(MAX_TITLE_CHARS), "").is_ok());
        assert!(msg(AlbumInput::from_form("a\u{7}b", "")).contains("control"));
    }

    #[test]
    fn api_bodies() {
        let body: AlbumBody =
            serde_json::from_str(r#"{"title":"T","songs":[{"title":"a"},"b"]}"#).unwrap();
        let a = AlbumInput::from_body(body).unwrap();
        assert_eq!(a.songs, ["a", "b"]);
        let body: AlbumBody = serde_json::from_str(r#"{"songs":[]}"#).unwrap();
        assert!(msg(AlbumInput::from_body(body)).contains("title is required"));
        let body: AlbumBody =
            serde_json::from_str(r#"{"title":"T","songs":[{"title":" "}]}"#).unwrap();
        assert!(msg(AlbumInput::from_body(body)).contains("songs[0].title must not be empty"));
        assert!(serde_json::from_str::<AlbumBody>(r#"{"title":"T","colour":1}"#).is_err());
        let many: Vec<String> = (0..=MAX_SONGS).map(|i| format!("s{i}")).collect();
        let body = AlbumBody {
            title: Some("T".into()),
            songs: many.into_iter().map(SongBody::Title).collect(),
        };
        assert!(msg(AlbumInput::from_body(body)).contains("at most 100 songs"));
    }

    #[test]
    fn ids_and_paging() {
        assert_eq!(album_id("42").unwrap(), 42);
        for bad in ["0", "-1", "x", "", "99999999999999999999"] {
            assert!(album_id(bad).is_err(), "{bad}");
        }
        assert_eq!(paging(None, None).unwrap(), (1, DEFAULT_PER_PAGE));
        assert_eq!(paging(Some("3"), Some("100")).unwrap(), (3, 100));
        assert!(msg(paging(Some("0"), None)).contains("page must be an integer from 1"));
        assert!(msg(paging(None, Some("101"))).contains("per_page"));
        assert!(paging(Some("abc"), None).is_err());
    }
}
