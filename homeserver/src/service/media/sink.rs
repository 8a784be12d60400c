//! Writing an upload to disk off the async runtime.
//!
//! An upload's bytes are hashed and written on a blocking thread of their own, fed the body's
//! chunks through a short channel: the request task only moves `Bytes` handles, so the data
//! is never copied in user space (a `BufWriter` over `tokio::fs::File` copied every byte twice:
//! into the buffer and into tokio's own write buffer), and receiving the next chunks overlaps
//! with hashing and with the kernel throttling page-cache writes. Measured on a 500 MiB upload
//! pinned to one core: sha256 is about 40 % of the server's CPU, the copies were another 8 %.
//!
//! Large files are written back while they arrive (an `fdatasync` on a second handle every
//! [`WRITE_BEHIND_BYTES`], one at a time), so the fsync that makes the upload durable before
//! it is acknowledged has little left to do.

use std::{fs::File, io::Write};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// Chunks queued between the request task and the writer thread (hyper's chunks are up to a
/// few hundred KiB, so this bounds the memory of one upload to a few MiB).
const QUEUE: usize = 16;

/// Bytes written between two background flushes of a large upload.
const WRITE_BEHIND_BYTES: u64 = 64 * 1024 * 1024;

enum Op {
    Data(Bytes),
    /// Make everything written so far durable, then answer.
    Sync(oneshot::Sender<std::io::Result<()>>),
    /// The body is complete: make it durable and end.
    Finish,
}

/// A file being written by a blocking thread. Dropped without [`FileSink::finish`] (a failed
/// or cancelled upload), the thread stops without syncing what it wrote.
pub struct FileSink {
    ops: mpsc::Sender<Op>,
    writer: JoinHandle<std::io::Result<Option<Sha256>>>,
}

impl FileSink {
    /// Starts writing at the file's current position; hashes what is written when `hash`.
    pub fn start(file: File, hash: bool) -> Self {
        let (ops, rx) = mpsc::channel(QUEUE);
        let writer = tokio::task::spawn_blocking(move || write_loop(file, rx, hash.then(Sha256::new)));
        Self { ops, writer }
    }

    /// Queues a chunk. An error means the writer failed; it is the writer's error.
    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        if self.ops.send(Op::Data(chunk)).await.is_err() {
            return Err(self.writer_error().await);
        }
        Ok(())
    }

    /// Waits until everything queued so far is on disk.
    pub async fn sync(&mut self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Sync(tx)).await.is_err() {
            return Err(self.writer_error().await);
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.writer_error().await),
        }
    }

    /// Makes the file durable and returns the hash of what was written (when asked for).
    pub async fn finish(self) -> std::io::Result<Option<Sha256>> {
        // If the writer already failed the send fails too; its result below says why.
        let _ = self.ops.send(Op::Finish).await;
        self.writer.await.map_err(std::io::Error::other)?
    }

    /// The writer stopped early; wait for it and return why.
    async fn writer_error(&mut self) -> std::io::Error {
        match (&mut self.writer).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => std::io::Error::other("the media writer stopped early"),
            Err(e) => std::io::Error::other(e),
        }
    }
}

fn write_loop(
    mut file: File,
    mut ops: mpsc::Receiver<Op>,
    mut hasher: Option<Sha256>,
) -> std::io::Result<Option<Sha256>> {
    let mut behind = WriteBehind::default();
    while let Some(op) = ops.blocking_recv() {
        match op {
            Op::Data(chunk) => {
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
                file.write_all(&chunk)?;
                behind.wrote(&file, chunk.len() as u64)?;
            }
            Op::Sync(done) => match behind.wait().and_then(|()| file.sync_data()) {
                Ok(()) => {
                    let _ = done.send(Ok(()));
                }
                Err(e) => {
                    let _ = done.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            },
            Op::Finish => {
                behind.wait()?;
                file.sync_all()?;
                return Ok(hasher);
            }
        }
    }
    // The sender went away without Finish: the upload was abandoned; nothing to make durable.
    Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "the upload was abandoned"))
}

/// At most one background `fdatasync` at a time, on a second handle of the file.
#[derive(Default)]
struct WriteBehind {
    unflushed: u64,
    running: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl WriteBehind {
    fn wrote(&mut self, file: &File, bytes: u64) -> std::io::Result<()> {
        self.unflushed += bytes;
        if self.unflushed < WRITE_BEHIND_BYTES || self.running.as_ref().is_some_and(|r| !r.is_finished()) {
            return Ok(());
        }
        self.wait()?;
        let handle = file.try_clone()?;
        self.running = Some(std::thread::spawn(move || handle.sync_data()));
        self.unflushed = 0;
        Ok(())
    }

    /// Waits for the background flush, if any, and reports its error.
    fn wait(&mut self) -> std::io::Result<()> {
        match self.running.take() {
            Some(running) => running.join().map_err(|_| std::io::Error::other("the write-behind flush panicked"))?,
            None => Ok(()),
        }
    }
}
