-- The media repository. One row per mxc:// URI this server hands out. The content lives in
-- content-addressed files (<data_dir>/media/<sha256[0..2]>/<sha256>), so identical uploads
-- share one file; `sha256` is NULL while an asynchronous or resumable upload is unfinished.
CREATE TABLE media (
    media_id          TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    content_type      TEXT,
    filename          TEXT,
    sha256            TEXT,
    size              BIGINT NOT NULL DEFAULT 0,
    created_ts        BIGINT NOT NULL,
    uploaded_ts       BIGINT,
    last_access_ts    BIGINT,
    -- Resumable uploads (the Obmin extension): announced length, bytes durably received,
    -- the whole file's expected sha256 (hex) if the client gave one, last progress.
    upload_length     BIGINT,
    upload_offset     BIGINT NOT NULL DEFAULT 0,
    expected_sha256   TEXT,
    updated_ts        BIGINT NOT NULL
);
CREATE INDEX media_by_user ON media (user_id);
CREATE INDEX media_by_sha256 ON media (sha256);

-- Generated thumbnails, cached: one per (media, size, method), stored content-addressed too.
CREATE TABLE media_thumbnails (
    media_id          TEXT NOT NULL,
    width             BIGINT NOT NULL,
    height            BIGINT NOT NULL,
    method            TEXT NOT NULL,
    content_type      TEXT NOT NULL,
    sha256            TEXT NOT NULL,
    size              BIGINT NOT NULL,
    PRIMARY KEY (media_id, width, height, method)
);
CREATE INDEX media_thumbnails_by_sha256 ON media_thumbnails (sha256);
