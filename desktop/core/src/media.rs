//! Files: encrypted attachments (the `e2ee` crate's streaming AES-256-CTR, the spec's
//! `EncryptedFile`) uploaded through Obmin's resumable upload extension
//! (`/_obmin/media/v1/upload`, docs/media.md) with progress, and downloaded and decrypted
//! into a file. ruma has no types for the extension, and its media download type buffers
//! the whole file, so both directions use reqwest directly here (streamed, fixed memory).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use e2ee::attachments::{DecryptingWriter, EncryptedFileJson, EncryptingWriter};
use futures_util::StreamExt;
use ruma::{OwnedMxcUri, RoomId};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    sync::mpsc::UnboundedSender,
};

use crate::{
    Attachment, Client, Error, ItemContent, Progress, Result, TimelineItem,
    http::{matrix_error, network_error},
    session::Session,
    sync::Backoff,
};

/// Bytes per `PATCH`: small enough for smooth progress and cheap retries.
const CHUNK: usize = 1024 * 1024;
/// Transient failures tolerated in a row before an upload gives up (it can be sent again).
const MAX_RETRIES: u32 = 8;

impl Client {
    /// Sends a file into a room: encrypted with a fresh key when the room is encrypted,
    /// uploaded resumably (a dropped connection continues where it stopped), then queued as
    /// an `m.file` message like [`Client::send_text`]. `progress` receives the uploaded byte
    /// count as it grows; so do subscribers, as [`crate::Update::FileProgress`] under the key
    /// the message's timeline item will have. Returns once the upload is complete and the
    /// message queued.
    pub async fn send_file(
        &self,
        room_id: &RoomId,
        path: &Path,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Result<TimelineItem> {
        let session = self.require_session()?;
        let room = self
            .store()?
            .room(room_id.as_str())
            .await?
            .ok_or_else(|| Error::InvalidInput("You are not in this room.".into()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        let size = tokio::fs::metadata(path).await?.len();
        let mimetype = crate::mime::from_file_name(&name);
        let key = ruma::TransactionId::new().to_string();
        let (progress, reporter) = self.progress_reporter(key.clone(), progress);
        let progress = Some(progress);

        let (content, attachment) = if room.encryption.is_some() {
            // Announce first (the encrypted file's description includes its mxc URI), encrypt
            // into a temporary file, then upload the ciphertext (same length as the file).
            // The server sees ciphertext: its type stays opaque there (the real one is
            // inside the encrypted event).
            let upload = self.announce_upload(&session, size, "application/octet-stream", None).await?;
            let temp = self.inner.data_dir.join("uploads");
            tokio::fs::create_dir_all(&temp).await?;
            let temp = temp.join(format!("{}.enc", rand::random::<u64>()));
            let file = encrypt_to(path, &temp, upload.content_uri.clone()).await?;
            let result = self.upload_from(&session, &upload, &temp, size, progress).await;
            let _ = tokio::fs::remove_file(&temp).await;
            result?;
            let file_json = serde_json::to_value(&file)?;
            let content = json!({"msgtype": "m.file", "body": name, "filename": name,
                "info": {"size": size, "mimetype": mimetype}, "file": file_json});
            (content, Attachment { url: upload.content_uri, encrypted_file: Some(file_json) })
        } else {
            let upload = self.announce_upload(&session, size, mimetype, Some(&name)).await?;
            self.upload_from(&session, &upload, path, size, progress).await?;
            let content = json!({"msgtype": "m.file", "body": name, "filename": name,
                "info": {"size": size, "mimetype": mimetype}, "url": upload.content_uri});
            (content, Attachment { url: upload.content_uri, encrypted_file: None })
        };
        let item = ItemContent::File { name, size: Some(size), mimetype: Some(mimetype.into()), attachment };
        // Every progress report is out before we return (the senders are gone by now).
        let _ = reporter.await;
        self.enqueue_as(key, room_id, "m.room.message", content, item).await
    }

    /// A progress channel that also tells subscribers ([`crate::Update::FileProgress`]).
    /// Ends when every sender of the returned channel is gone.
    fn progress_reporter(
        &self,
        key: String,
        caller: Option<UnboundedSender<Progress>>,
    ) -> (UnboundedSender<Progress>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let client = self.clone();
        let task = tokio::spawn(async move {
            while let Some(progress) = rx.recv().await {
                if let Some(caller) = &caller {
                    let _ = caller.send(progress);
                }
                client.emit(crate::Update::FileProgress { key: key.clone(), progress });
            }
        });
        (tx, task)
    }

    /// Downloads an attachment into `dest`, decrypting it if it is encrypted (the hash is
    /// checked: a damaged or tampered file fails and nothing is left at `dest`). Progress
    /// goes to `progress` and to subscribers as [`crate::Update::FileProgress`] keyed by the
    /// attachment's mxc URI.
    pub async fn download_file(
        &self,
        attachment: &Attachment,
        dest: &Path,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Result<()> {
        let session = self.require_session()?;
        let (server, media_id) = split_mxc(&attachment.url)?;
        let (progress, reporter) = self.progress_reporter(attachment.url.to_string(), progress);
        let progress = Some(progress);
        let url = format!(
            "{}/_matrix/client/v1/media/download/{server}/{media_id}",
            session.server_url.trim_end_matches('/')
        );
        let response = self
            .inner
            .http
            .raw()
            .get(url)
            .bearer_auth(&session.access_token)
            .send()
            .await
            .map_err(|e| network_error(&session.server_url, &e))?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.bytes().await.unwrap_or_default();
            return Err(matrix_error(&session.server_url, status, &body));
        }
        let total = response.content_length().unwrap_or(0);
        let part = dest.with_extension("part");
        let file = std::fs::File::create(&part)?;
        let mut sink: Box<dyn Sink> = match &attachment.encrypted_file {
            Some(file_json) => {
                let info: EncryptedFileJson = serde_json::from_value(file_json.clone())
                    .map_err(|e| Error::Crypto(format!("bad attachment description: {e}")))?;
                Box::new(DecryptingWriter::new(file, &info)?)
            }
            None => Box::new(file),
        };
        let mut stream = response.bytes_stream();
        let mut done = 0u64;
        let result: Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|_| Error::NetworkDropped)?;
                // Small blocking writes of one network chunk: fine on the async thread.
                sink.write_all(&chunk)?;
                done += chunk.len() as u64;
                if let Some(progress) = &progress {
                    let _ = progress.send(Progress { done, total });
                }
            }
            sink.finish()
        }
        .await;
        drop(progress);
        let _ = reporter.await;
        match result {
            Ok(()) => Ok(std::fs::rename(&part, dest)?),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }

    /// Uploads a file unencrypted (avatars are public); returns its mxc URI.
    pub(crate) async fn upload_plain(&self, path: &Path) -> Result<OwnedMxcUri> {
        let session = self.require_session()?;
        let size = tokio::fs::metadata(path).await?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mimetype = crate::mime::from_file_name(name.as_deref().unwrap_or_default());
        let upload = self.announce_upload(&session, size, mimetype, name.as_deref()).await?;
        self.upload_from(&session, &upload, path, size, None).await?;
        Ok(upload.content_uri)
    }

    async fn announce_upload(
        &self,
        session: &Session,
        length: u64,
        content_type: &str,
        filename: Option<&str>,
    ) -> Result<Upload> {
        let mut body = json!({"length": length, "content_type": content_type});
        if let Some(name) = filename {
            body["filename"] = json!(name);
        }
        let answer = self
            .inner
            .http
            .json(
                &session.server_url,
                &session.access_token,
                reqwest::Method::POST,
                "/_obmin/media/v1/upload",
                Some(&body),
            )
            .await?;
        let bad = || Error::NotAMatrixServer { url: format!("{} (no resumable upload)", session.server_url) };
        Ok(Upload {
            content_uri: answer["content_uri"].as_str().ok_or_else(bad)?.into(),
            upload_url: answer["upload_url"].as_str().ok_or_else(bad)?.to_owned(),
        })
    }

    /// Sends the file's bytes in chunks; after a transient failure asks the server for its
    /// offset and continues from there.
    async fn upload_from(
        &self,
        session: &Session,
        upload: &Upload,
        path: &Path,
        total: u64,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Result<()> {
        let url = format!("{}{}", session.server_url.trim_end_matches('/'), upload.upload_url);
        let mut file = tokio::fs::File::open(path).await?;
        let mut offset = 0u64;
        let mut backoff = Backoff::new();
        let mut failures = 0;
        let mut buffer = vec![0u8; CHUNK];
        while offset < total || total == 0 {
            file.seek(std::io::SeekFrom::Start(offset)).await?;
            let n = read_full(&mut file, &mut buffer).await?;
            let sent = self.patch(session, &url, offset, buffer[..n].to_vec()).await;
            match sent {
                Ok(status) => {
                    failures = 0;
                    offset = status["offset"].as_u64().unwrap_or(offset + n as u64);
                    if let Some(progress) = &progress {
                        let _ = progress.send(Progress { done: offset, total });
                    }
                    if status["complete"] == true {
                        return Ok(());
                    }
                    if total == 0 {
                        break;
                    }
                }
                Err(e)
                    if (e.is_transient() || matches!(e, Error::Server { status: 409, .. }))
                        && failures < MAX_RETRIES =>
                {
                    failures += 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                    // Where did the server get to? (It keeps every byte that arrived.)
                    if let Ok(status) = self
                        .inner
                        .http
                        .json(
                            &session.server_url,
                            &session.access_token,
                            reqwest::Method::GET,
                            &upload.upload_url,
                            None,
                        )
                        .await
                    {
                        offset = status["offset"].as_u64().unwrap_or(offset);
                        if status["complete"] == true {
                            return Ok(());
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Server { status: 500, errcode: "M_UNKNOWN".into(), message: "the upload did not complete".into() })
    }

    async fn patch(&self, session: &Session, url: &str, offset: u64, bytes: Vec<u8>) -> Result<Value> {
        let response = self
            .inner
            .http
            .raw()
            .patch(url)
            .bearer_auth(&session.access_token)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(bytes)
            .timeout(std::time::Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| network_error(&session.server_url, &e))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| network_error(&session.server_url, &e))?;
        if status != 200 {
            return Err(matrix_error(&session.server_url, status, &body));
        }
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

struct Upload {
    content_uri: OwnedMxcUri,
    upload_url: String,
}

/// A download destination: a plain file, or a decryptor in front of one.
trait Sink: Write + Send {
    fn finish(self: Box<Self>) -> Result<()>;
}

impl Sink for std::fs::File {
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(self.sync_all()?)
    }
}

impl Sink for DecryptingWriter<std::fs::File> {
    fn finish(self: Box<Self>) -> Result<()> {
        let file = DecryptingWriter::finish(*self)?;
        Ok(file.sync_all()?)
    }
}

/// Encrypts `source` into `dest` (off the async threads: it is blocking file I/O).
async fn encrypt_to(source: &Path, dest: &Path, url: OwnedMxcUri) -> Result<EncryptedFileJson> {
    let (source, dest): (PathBuf, PathBuf) = (source.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || -> Result<EncryptedFileJson> {
        let mut input = std::fs::File::open(source)?;
        let mut writer = EncryptingWriter::new(std::io::BufWriter::new(std::fs::File::create(dest)?));
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = input.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            writer.write_all(&buffer[..n])?;
        }
        let (out, file) = writer.finish(url)?;
        out.into_inner().map_err(|e| Error::File(e.to_string()))?.sync_all()?;
        Ok(file)
    })
    .await
    .map_err(|e| Error::File(e.to_string()))?
}

async fn read_full(file: &mut tokio::fs::File, buffer: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buffer.len() {
        let read = file.read(&mut buffer[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
    }
    Ok(n)
}

fn split_mxc(url: &OwnedMxcUri) -> Result<(String, String)> {
    let (server, id) = url.parts().map_err(|e| Error::InvalidInput(format!("bad media address: {e}")))?;
    Ok((server.to_string(), id.to_owned()))
}
