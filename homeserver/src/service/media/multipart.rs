//! Another server's media answer read as it streams in. The federation download is
//! `multipart/mixed`: a JSON metadata part, then either the file or an empty part with a
//! `Location` header (where to fetch the file instead). ruma's parser wants the whole body
//! in memory; here only part headers (at most [`MAX_HEADER_BYTES`]) and the parts before
//! the file (at most [`MAX_SKIPPED_BYTES`]) are held, and the file is handed on chunk by
//! chunk for the caller to write to disk within its own size limit.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// The most bytes of part headers read for one part.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The most bytes skipped before a part (the preamble, the metadata part's JSON).
pub const MAX_SKIPPED_BYTES: usize = 64 * 1024;

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    #[error("malformed multipart answer: {0}")]
    Malformed(&'static str),
    #[error("the answer broke off: {0}")]
    Body(io::Error),
}

impl From<MultipartError> for io::Error {
    fn from(e: MultipartError) -> Self {
        match e {
            MultipartError::Body(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The boundary of a `multipart/mixed` content type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params
        .find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_owned())
        })
        // RFC 2046: 1 to 70 characters.
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// The headers of one part that matter for media.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartHeaders {
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    pub location: Option<String>,
}

/// Reads parts from a streamed multipart body.
pub struct MultipartReader<S> {
    body: S,
    /// Received and not yet consumed.
    buf: BytesMut,
    /// `CRLF--boundary`: what ends a part's body.
    delimiter: Vec<u8>,
    in_body: bool,
    closed: bool,
}

impl<S> MultipartReader<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    pub fn new(body: S, boundary: &str) -> Self {
        Self {
            body,
            // The first delimiter may open the body without the CRLF before it.
            buf: BytesMut::from(&b"\r\n"[..]),
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            in_body: false,
            closed: false,
        }
    }

    async fn fill(&mut self) -> Result<(), MultipartError> {
        match self.body.next().await {
            Some(Ok(chunk)) => {
                self.buf.extend_from_slice(&chunk);
                Ok(())
            }
            Some(Err(e)) => Err(MultipartError::Body(e)),
            None => Err(MultipartError::Malformed("the answer ends inside a part")),
        }
    }

    /// The next part's headers (skipping what is left of the current part, at most
    /// [`MAX_SKIPPED_BYTES`]), or `None` after the closing delimiter.
    pub async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        if self.closed {
            return Ok(None);
        }
        self.skip_past_delimiter().await?;
        self.in_body = false;
        while self.buf.len() < 2 {
            self.fill().await?;
        }
        if self.buf.starts_with(b"--") {
            self.closed = true;
            return Ok(None);
        }
        let mut read = 0;
        // The rest of the delimiter's line: only transport padding may be there.
        let padding = self.line(&mut read).await?;
        if !padding.iter().all(|b| *b == b' ' || *b == b'\t') {
            return Err(MultipartError::Malformed("text after a boundary"));
        }
        let mut headers = PartHeaders::default();
        loop {
            let line = self.line(&mut read).await?;
            if line.is_empty() {
                break;
            }
            let line =
                std::str::from_utf8(&line).map_err(|_| MultipartError::Malformed("part headers are not UTF-8"))?;
            let (name, value) =
                line.split_once(':').ok_or(MultipartError::Malformed("a part header without a colon"))?;
            let value = Some(value.trim().to_owned());
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => headers.content_type = value,
                "content-disposition" => headers.content_disposition = value,
                "location" => headers.location = value,
                _ => {}
            }
        }
        self.in_body = true;
        Ok(Some(headers))
    }

    /// The next piece of the current part's body; `None` at its end. Only the last
    /// `delimiter - 1` bytes received are held back (they may begin the delimiter).
    pub async fn body_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if !self.in_body {
            return Ok(None);
        }
        loop {
            if let Some(end) = find(&self.buf, &self.delimiter) {
                // The delimiter stays for `next_part`.
                self.in_body = false;
                return Ok((end > 0).then(|| self.buf.split_to(end).freeze()));
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let ready = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(ready).freeze()));
            }
            self.fill().await?;
        }
    }

    /// The body of the current part as a stream of chunks (the file).
    pub fn into_body(self) -> impl Stream<Item = io::Result<Bytes>> + Unpin
    where
        S: 'static,
    {
        Box::pin(futures_util::stream::try_unfold(self, |mut reader| async move {
            Ok::<_, io::Error>(reader.body_chunk().await?.map(|chunk| (chunk, reader)))
        }))
    }

    async fn skip_past_delimiter(&mut self) -> Result<(), MultipartError> {
        let mut skipped = 0;
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                if skipped + at > MAX_SKIPPED_BYTES {
                    break;
                }
                self.buf.advance(at + self.delimiter.len());
                return Ok(());
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let dropped = self.buf.len() - keep;
                skipped += dropped;
                self.buf.advance(dropped);
            }
            if skipped > MAX_SKIPPED_BYTES {
                break;
            }
            self.fill().await?;
        }
        Err(MultipartError::Malformed("a part before the file is too large"))
    }

    /// One header line without its CRLF; `read` counts the header bytes of this part.
    async fn line(&mut self, read: &mut usize) -> Result<Bytes, MultipartError> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                *read += end + 2;
                if *read > MAX_HEADER_BYTES {
                    break;
                }
                let line = self.buf.split_to(end).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            if *read + self.buf.len() > MAX_HEADER_BYTES {
                break;
            }
            self.fill().await?;
        }
        Err(MultipartError::Malformed("part headers too long"))
    }
}

/// Where `needle` first occurs in `haystack`. Looks only at positions where its first byte
/// is, so a file's bytes are scanned about once.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(offset) = haystack[from..].iter().position(|b| *b == first) {
        let at = from + offset;
        let candidate = haystack.get(at..at + needle.len())?;
        if candidate == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const B: &str = "b0undary";

    fn answer(file: &[u8], file_headers: &str) -> Vec<u8> {
        let mut out =
            format!("--{B}\r\nContent-Type: application/json\r\n\r\n{{\"x\": 1}}\r\n--{B}\r\n{file_headers}\r\n")
                .into_bytes();
        out.extend_from_slice(file);
        out.extend_from_slice(format!("\r\n--{B}--\r\n").as_bytes());
        out
    }

    /// Reads the metadata part and the file part from `bytes` sent in pieces of `split`.
    fn read(bytes: Vec<u8>, split: usize) -> Result<(PartHeaders, Vec<u8>), MultipartError> {
        let chunks: Vec<io::Result<Bytes>> =
            bytes.chunks(split.max(1)).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures_executor_block_on(async move {
            let mut reader = MultipartReader::new(futures_util::stream::iter(chunks), B);
            let meta = reader.next_part().await?.ok_or(MultipartError::Malformed("no metadata"))?;
            assert_eq!(meta.content_type.as_deref(), Some("application/json"));
            let headers = reader.next_part().await?.ok_or(MultipartError::Malformed("no file"))?;
            let mut file = Vec::new();
            while let Some(chunk) = reader.body_chunk().await? {
                file.extend_from_slice(&chunk);
            }
            assert_eq!(reader.next_part().await?, None);
            Ok((headers, file))
        })
    }

    fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn boundaries_of_multipart_mixed_only() {
        assert_eq!(boundary("multipart/mixed; boundary=abc").as_deref(), Some("abc"));
        assert_eq!(boundary("Multipart/Mixed;boundary=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(boundary("text/html"), None);
        assert_eq!(boundary("multipart/mixed"), None);
        assert_eq!(boundary("multipart/mixed; boundary="), None);
    }

    #[test]
    fn a_file_and_a_location() {
        let (headers, file) = read(answer(b"hello\r\n--not the boundary", "Content-Type: text/plain\r\n"), 3).unwrap();
        assert_eq!(headers.content_type.as_deref(), Some("text/plain"));
        assert_eq!(file, b"hello\r\n--not the boundary");
        let (headers, file) = read(answer(b"", "Location: https://elsewhere.example/f\r\n"), 5).unwrap();
        assert_eq!(headers.location.as_deref(), Some("https://elsewhere.example/f"));
        assert!(file.is_empty());
    }

    #[test]
    fn truncated_and_oversized_answers_are_errors() {
        let mut cut = answer(b"some file", "Content-Type: text/plain\r\n");
        cut.truncate(cut.len() - 20);
        assert!(matches!(read(cut, 4), Err(MultipartError::Malformed(_))));
        let long_header = format!("X-Long: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
        assert!(matches!(read(answer(b"f", &long_header), 1000), Err(MultipartError::Malformed(_))));
        let mut big_meta = format!("--{B}\r\nContent-Type: application/json\r\n\r\n").into_bytes();
        big_meta.extend(std::iter::repeat_n(b'x', MAX_SKIPPED_BYTES + 10));
        big_meta.extend_from_slice(format!("\r\n--{B}\r\n\r\nf\r\n--{B}--").as_bytes());
        assert!(matches!(read(big_meta, 777), Err(MultipartError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn any_file_in_any_pieces_reads_back(file in proptest::collection::vec(any::<u8>(), 0..3000), split in 1usize..64) {
            let (_, read_back) = read(answer(&file, "Content-Type: application/octet-stream\r\n"), split).unwrap();
            prop_assert_eq!(read_back, file);
        }
    }
}
