//! Every SQL statement the app runs. Reads are single statements with a fixed text, run
//! outside transactions and without volatile functions, so that pgsplit can send them to a
//! replica and cache them (proxy.toml whitelists the `albums` and `songs` tables). Writes
//! run in one transaction each, so they reach the primary and commit together.

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;

use crate::error::ApiError;
use crate::input::AlbumInput;

/// Key of the transaction-level advisory lock that serializes migrations of several
/// instances starting at once (`CREATE TABLE IF NOT EXISTS` alone can race).
const MIGRATION_LOCK: i64 = 0x616c_6275_6d73; // "albums"

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS albums (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title text NOT NULL
);
CREATE TABLE IF NOT EXISTS songs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    album_id bigint NOT NULL REFERENCES albums (id) ON DELETE CASCADE,
    position int NOT NULL,
    title text NOT NULL,
    UNIQUE (album_id, position)
);";

pub const SELECT_ALBUM: &str = "SELECT id, title FROM albums WHERE id = $1";
pub const SELECT_SONGS: &str =
    "SELECT id, album_id, title, position FROM songs WHERE album_id = $1 ORDER BY position";
pub const SELECT_PAGE: &str = "SELECT id, title FROM albums ORDER BY id LIMIT $1 OFFSET $2";
pub const COUNT_ALBUMS: &str = "SELECT count(*) FROM albums";
pub const SELECT_LATEST: &str = "SELECT id, title FROM albums ORDER BY id DESC LIMIT $1";
pub const SELECT_SONGS_OF_ALBUMS: &str = "SELECT id, album_id, title, position FROM songs \
     WHERE album_id = ANY($1) ORDER BY album_id, position";
const INSERT_ALBUM: &str = "INSERT INTO albums (title) VALUES ($1) RETURNING id";
const INSERT_SONGS: &str = "INSERT INTO songs (album_id, position, title) \
     SELECT $1, s.position::int, s.title FROM unnest($2::text[]) WITH ORDINALITY AS s (title, position)";
const UPDATE_ALBUM: &str = "UPDATE albums SET title = $2 WHERE id = $1";
// Songs are deleted explicitly, though pgsplit follows ON DELETE CASCADE too (it asks the
// primary at commit which tables a write reached): the statements say what they change, for
// any proxy or cache in front of the database.
const DELETE_SONGS: &str = "DELETE FROM songs WHERE album_id = $1";
const DELETE_ALBUM: &str = "DELETE FROM albums WHERE id = $1";

#[derive(Debug, Clone, Serialize)]
pub struct Song {
    pub id: i64,
    pub title: String,
    pub position: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Album {
    pub id: i64,
    pub title: String,
    pub songs: Vec<Song>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlbumSummary {
    pub id: i64,
    pub title: String,
}

/// A row of [`SELECT_SONGS`] or [`SELECT_SONGS_OF_ALBUMS`].
fn song(r: &tokio_postgres::Row) -> Song {
    Song {
        id: r.get("id"),
        title: r.get("title"),
        position: r.get("position"),
    }
}

/// Create the tables if they do not exist. Idempotent, and safe when several instances
/// start at once: they take turns on an advisory lock inside one transaction.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}

/// One album with its songs, or None.
pub async fn album(pool: &Pool, id: i64) -> Result<Option<Album>, ApiError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SELECT_ALBUM).await?;
    let Some(row) = client.query_opt(&stmt, &[&id]).await? else {
        return Ok(None);
    };
    let stmt = client.prepare_cached(SELECT_SONGS).await?;
    let songs = client
        .query(&stmt, &[&id])
        .await?
        .iter()
        .map(song)
        .collect();
    Ok(Some(Album {
        id: row.get("id"),
        title: row.get("title"),
        songs,
    }))
}

/// One page of albums in id order, and the number of albums.
pub async fn page(
    pool: &Pool,
    page: i64,
    per_page: i64,
) -> Result<(Vec<AlbumSummary>, i64), ApiError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SELECT_PAGE).await?;
    let offset = (page - 1) * per_page;
    let albums = client
        .query(&stmt, &[&per_page, &offset])
        .await?
        .iter()
        .map(|r| AlbumSummary {
            id: r.get("id"),
            title: r.get("title"),
        })
        .collect();
    let stmt = client.prepare_cached(COUNT_ALBUMS).await?;
    let total: i64 = client.query_one(&stmt, &[]).await?.get(0);
    Ok((albums, total))
}

/// The newest `limit` albums with their songs, newest first (for the page).
pub async fn latest(pool: &Pool, limit: i64) -> Result<Vec<Album>, ApiError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SELECT_LATEST).await?;
    let mut albums: Vec<Album> = client
        .query(&stmt, &[&limit])
        .await?
        .iter()
        .map(|r| Album {
            id: r.get("id"),
            title: r.get("title"),
            songs: Vec::new(),
        })
        .collect();
    if albums.is_empty() {
        return Ok(albums);
    }
    let ids: Vec<i64> = albums.iter().map(|a| a.id).collect();
    let stmt = client.prepare_cached(SELECT_SONGS_OF_ALBUMS).await?;
    for r in client.query(&stmt, &[&ids]).await? {
        let album_id: i64 = r.get("album_id");
        if let Some(a) = albums.iter_mut().find(|a| a.id == album_id) {
            a.songs.push(song(&r));
        }
    }
    Ok(albums)
}

/// Insert an album and its songs in one transaction; its id.
pub async fn create(pool: &Pool, input: &AlbumInput) -> Result<i64, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(INSERT_ALBUM).await?;
    let id: i64 = tx.query_one(&stmt, &[&input.title]).await?.get(0);
    insert_songs(&tx, id, &input.songs).await?;
    tx.commit().await?;
    Ok(id)
}

/// Replace an album's title and songs in one transaction; false if there is no such album.
pub async fn update(pool: &Pool, id: i64, input: &AlbumInput) -> Result<bool, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(UPDATE_ALBUM).await?;
    if tx.execute(&stmt, &[&id, &input.title]).await? == 0 {
        // Dropping the transaction rolls it back.
        return Ok(false);
    }
    let stmt = tx.prepare_cached(DELETE_SONGS).await?;
    tx.execute(&stmt, &[&id]).await?;
    insert_songs(&tx, id, &input.songs).await?;
    tx.commit().await?;
    Ok(true)
}

/// Delete an album and its songs in one transaction; false if there is no such album.
pub async fn delete(pool: &Pool, id: i64) -> Result<bool, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(DELETE_SONGS).await?;
    tx.execute(&stmt, &[&id]).await?;
    let stmt = tx.prepare_cached(DELETE_ALBUM).await?;
    let deleted = tx.execute(&stmt, &[&id]).await? == 1;
    tx.commit().await?;
    Ok(deleted)
}

async fn insert_songs(
    tx: &deadpool_postgres::Transaction<'_>,
    album_id: i64,
    songs: &[String],
) -> Result<(), ApiError> {
    if songs.is_empty() {
        return Ok(());
    }
    let stmt = tx.prepare_cached(INSERT_SONGS).await?;
    tx.execute(&stmt, &[&album_id, &songs]).await?;
    Ok(())
}
