-- Other servers' media, fetched over federation (`/_matrix/federation/v1/media/download`)
-- the first time a local client downloads it, then served from our own copy. The content
-- shares the content-addressed files of local media (see 20261126000010_media.sql).
CREATE TABLE remote_media (
    origin            TEXT NOT NULL,
    media_id          TEXT NOT NULL,
    content_type      TEXT,
    filename          TEXT,
    sha256            TEXT NOT NULL,
    size              BIGINT NOT NULL,
    fetched_ts        BIGINT NOT NULL,
    PRIMARY KEY (origin, media_id)
);
CREATE INDEX remote_media_by_sha256 ON remote_media (sha256);
