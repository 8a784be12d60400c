//! The MIME type of a file from its name, for the `info.mimetype` of file messages (so the
//! other side can show images as images, open PDFs with the right program, ...).
//!
//! A small table instead of a crate (`mime_guess` is not in the workspace): these are the
//! types people send in a chat; anything else is `application/octet-stream`, which is
//! what the spec says to assume when the type is unknown.

const TABLE: &[(&str, &str)] = &[
    ("7z", "application/x-7z-compressed"),
    ("avif", "image/avif"),
    ("bmp", "image/bmp"),
    ("csv", "text/csv"),
    ("doc", "application/msword"),
    ("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    ("flac", "audio/flac"),
    ("gif", "image/gif"),
    ("gz", "application/gzip"),
    ("heic", "image/heic"),
    ("htm", "text/html"),
    ("html", "text/html"),
    ("ics", "text/calendar"),
    ("jpeg", "image/jpeg"),
    ("jpg", "image/jpeg"),
    ("json", "application/json"),
    ("log", "text/plain"),
    ("m4a", "audio/mp4"),
    ("md", "text/markdown"),
    ("mkv", "video/x-matroska"),
    ("mov", "video/quicktime"),
    ("mp3", "audio/mpeg"),
    ("mp4", "video/mp4"),
    ("odp", "application/vnd.oasis.opendocument.presentation"),
    ("ods", "application/vnd.oasis.opendocument.spreadsheet"),
    ("odt", "application/vnd.oasis.opendocument.text"),
    ("oga", "audio/ogg"),
    ("ogg", "audio/ogg"),
    ("ogv", "video/ogg"),
    ("opus", "audio/opus"),
    ("pdf", "application/pdf"),
    ("png", "image/png"),
    ("ppt", "application/vnd.ms-powerpoint"),
    ("pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
    ("rtf", "application/rtf"),
    ("svg", "image/svg+xml"),
    ("tar", "application/x-tar"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("txt", "text/plain"),
    ("wav", "audio/wav"),
    ("webm", "video/webm"),
    ("webp", "image/webp"),
    ("xls", "application/vnd.ms-excel"),
    ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    ("xml", "application/xml"),
    ("zip", "application/zip"),
];

/// The type for a file name by its extension (case-insensitive).
pub(crate) fn from_file_name(name: &str) -> &'static str {
    let extension = match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => extension.to_ascii_lowercase(),
        _ => return "application/octet-stream",
    };
    TABLE
        .binary_search_by(|(known, _)| (*known).cmp(extension.as_str()))
        .map_or("application/octet-stream", |i| TABLE[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_by_extension() {
        assert!(TABLE.windows(2).all(|w| w[0].0 < w[1].0), "the table is sorted (binary search)");
        assert_eq!(from_file_name("Holiday.JPG"), "image/jpeg");
        assert_eq!(from_file_name("report.final.pdf"), "application/pdf");
        assert_eq!(from_file_name("notes.txt"), "text/plain");
        assert_eq!(from_file_name("archive.tar.gz"), "application/gzip");
        assert_eq!(from_file_name("README"), "application/octet-stream");
        assert_eq!(from_file_name(".bashrc"), "application/octet-stream");
        assert_eq!(from_file_name("data.bin"), "application/octet-stream");
    }
}
