//! Encrypted attachments (the spec's "Sending encrypted attachments"): AES-256-CTR with a
//! random key and a 64-bit random IV prefix (the counter half starts at zero), and a SHA-256
//! of the ciphertext, described by an `EncryptedFile` (ruma's type, which also checks the JSON
//! Web Key fields when parsing).
//!
//! Both directions come as `Read` adapters (pull: wrap the file in an [`EncryptingReader`]
//! and stream it as the upload body) and `Write` adapters (push: feed download chunks into a
//! [`DecryptingWriter`] over the destination file), so a file of any size streams through a
//! fixed-size buffer. Decryption checks the hash when the ciphertext ends (the final read,
//! or [`DecryptingWriter::finish`]) and fails if it does not match, so a caller that writes
//! to a temporary file and keeps it only when that succeeded never keeps tampered plaintext.

use std::io::{self, Read, Write};

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher};
use rand::RngCore;
use ruma::{
    OwnedMxcUri,
    events::room::{
        EncryptedFile, EncryptedFileHash, EncryptedFileHashAlgorithm, EncryptedFileHashes, EncryptedFileInfo,
        V2EncryptedFileInfo,
    },
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The spec's `EncryptedFile` (ruma's type), re-exported for callers.
pub use ruma::events::room::EncryptedFile as EncryptedFileJson;

use crate::error::{AttachmentError, Error, Result};

/// The spec's counter: a big-endian 128-bit block counter over the IV (whose low 64 bits start
/// at zero, so no realistic file reaches the wrap-around).
type Aes256Ctr = ctr::Ctr128BE<Aes256>;

/// Encrypts everything read through it.
pub struct EncryptingReader<R> {
    inner: R,
    cipher: Aes256Ctr,
    hasher: Sha256,
    key: Zeroizing<[u8; 32]>,
    iv: [u8; 16],
    finished: bool,
}

impl<R: Read> EncryptingReader<R> {
    /// A fresh random key and IV.
    pub fn new(inner: R) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut iv = [0u8; 16];
        let mut rng = rand::rng();
        rng.fill_bytes(key.as_mut());
        // Only the high 64 bits are random: the low 64 are the block counter (the spec's
        // rule, so that other clients' 64-bit counters never wrap).
        rng.fill_bytes(&mut iv[..8]);
        Self::with_key(inner, *key, iv)
    }

    fn with_key(inner: R, key: [u8; 32], iv: [u8; 16]) -> Self {
        Self {
            inner,
            cipher: Aes256Ctr::new(&key.into(), &iv.into()),
            hasher: Sha256::new(),
            key: Zeroizing::new(key),
            iv,
            finished: false,
        }
    }

    /// The `EncryptedFile` for the uploaded ciphertext at `url`. Only valid after the reader
    /// returned end-of-file (the hash covers everything read).
    pub fn finish(self, url: OwnedMxcUri) -> Result<EncryptedFile> {
        if !self.finished {
            return Err(AttachmentError::NotFinished.into());
        }
        let hash: [u8; 32] = self.hasher.finalize().into();
        let info: EncryptedFileInfo = V2EncryptedFileInfo::encode(*self.key, self.iv).into();
        Ok(EncryptedFile::new(url, info, EncryptedFileHashes::with_sha256(hash)))
    }
}

impl<R: Read> Read for EncryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.finished = true;
        }
        self.cipher.apply_keystream(&mut buf[..n]);
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Decrypts everything read through it and checks the ciphertext's SHA-256 at the end.
pub struct DecryptingReader<R> {
    inner: R,
    cipher: Aes256Ctr,
    hasher: Option<Sha256>,
    expected: [u8; 32],
}

impl<R: Read> DecryptingReader<R> {
    /// Checks that `file` is a v2 AES-CTR file with a SHA-256 hash.
    pub fn new(inner: R, file: &EncryptedFile) -> Result<Self> {
        let (key, iv, expected) = file_parameters(file)?;
        Ok(Self { inner, cipher: Aes256Ctr::new(&(*key).into(), &iv.into()), hasher: Some(Sha256::new()), expected })
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(hasher) = self.hasher.take() {
                let actual: [u8; 32] = hasher.finalize().into();
                if actual != self.expected {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, AttachmentError::HashMismatch));
                }
            }
            return Ok(0);
        }
        match &mut self.hasher {
            Some(hasher) => hasher.update(&buf[..n]),
            None => return Err(io::Error::other("read after the end of the attachment")),
        }
        self.cipher.apply_keystream(&mut buf[..n]);
        Ok(n)
    }
}

/// Encrypts everything written through it into `inner`.
pub struct EncryptingWriter<W> {
    inner: W,
    cipher: Aes256Ctr,
    hasher: Sha256,
    key: Zeroizing<[u8; 32]>,
    iv: [u8; 16],
    buf: Vec<u8>,
}

impl<W: Write> EncryptingWriter<W> {
    /// A fresh random key and IV (see [`EncryptingReader::new`]).
    pub fn new(inner: W) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut iv = [0u8; 16];
        let mut rng = rand::rng();
        rng.fill_bytes(key.as_mut());
        rng.fill_bytes(&mut iv[..8]);
        Self {
            inner,
            cipher: Aes256Ctr::new(&(*key).into(), &iv.into()),
            hasher: Sha256::new(),
            key,
            iv,
            buf: Vec::new(),
        }
    }

    /// Flushes and returns the inner writer with the `EncryptedFile` for the ciphertext once
    /// it is uploaded at `url`.
    pub fn finish(mut self, url: OwnedMxcUri) -> Result<(W, EncryptedFile)> {
        self.inner.flush().map_err(|e| Error::from(AttachmentError::Io(e)))?;
        let hash: [u8; 32] = self.hasher.finalize().into();
        let info: EncryptedFileInfo = V2EncryptedFileInfo::encode(*self.key, self.iv).into();
        Ok((self.inner, EncryptedFile::new(url, info, EncryptedFileHashes::with_sha256(hash))))
    }
}

impl<W: Write> Write for EncryptingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Encrypt a copy: the caller's buffer is not ours to change.
        self.buf.clear();
        self.buf.extend_from_slice(data);
        self.cipher.apply_keystream(&mut self.buf);
        self.inner.write_all(&self.buf)?;
        self.hasher.update(&self.buf);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts everything written through it into `inner`; [`DecryptingWriter::finish`] checks
/// the ciphertext's SHA-256.
pub struct DecryptingWriter<W> {
    inner: W,
    cipher: Aes256Ctr,
    hasher: Sha256,
    expected: [u8; 32],
    buf: Vec<u8>,
}

impl<W: Write> DecryptingWriter<W> {
    pub fn new(inner: W, file: &EncryptedFile) -> Result<Self> {
        let (key, iv, expected) = file_parameters(file)?;
        Ok(Self {
            inner,
            cipher: Aes256Ctr::new(&(*key).into(), &iv.into()),
            hasher: Sha256::new(),
            expected,
            buf: Vec::new(),
        })
    }

    /// All ciphertext was written: checks the hash and returns the inner writer (flushed).
    /// On a mismatch the plaintext written so far must be thrown away.
    pub fn finish(mut self) -> Result<W> {
        let actual: [u8; 32] = self.hasher.finalize().into();
        if actual != self.expected {
            return Err(AttachmentError::HashMismatch.into());
        }
        self.inner.flush().map_err(|e| Error::from(AttachmentError::Io(e)))?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for DecryptingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.buf.clear();
        self.buf.extend_from_slice(data);
        self.cipher.apply_keystream(&mut self.buf);
        self.inner.write_all(&self.buf)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Key, IV and expected ciphertext hash.
type FileParameters = (Zeroizing<[u8; 32]>, [u8; 16], [u8; 32]);

/// The parameters of a v2 AES-CTR file with a SHA-256 hash.
fn file_parameters(file: &EncryptedFile) -> Result<FileParameters> {
    let EncryptedFileInfo::V2(info) = &file.info else {
        return Err(AttachmentError::UnsupportedVersion(file.info.version().to_owned()).into());
    };
    let Some(EncryptedFileHash::Sha256(hash)) = file.hashes.get(&EncryptedFileHashAlgorithm::Sha256) else {
        return Err(AttachmentError::NoHash.into());
    };
    Ok((Zeroizing::new(*info.k.as_inner()), *info.iv.as_inner(), *hash.as_inner()))
}

/// Convenience for small files: encrypt a whole buffer.
pub fn encrypt_bytes(plaintext: &[u8]) -> (Vec<u8>, impl FnOnce(OwnedMxcUri) -> Result<EncryptedFile>) {
    let mut reader = EncryptingReader::new(plaintext);
    let mut ciphertext = Vec::with_capacity(plaintext.len());
    reader.read_to_end(&mut ciphertext).expect("reading from memory cannot fail");
    (ciphertext, move |url| reader.finish(url))
}

/// Convenience for small files: decrypt and check a whole buffer.
pub fn decrypt_bytes(ciphertext: &[u8], file: &EncryptedFile) -> Result<Vec<u8>> {
    let mut plaintext = Vec::with_capacity(ciphertext.len());
    DecryptingReader::new(ciphertext, file)?
        .read_to_end(&mut plaintext)
        .map_err(|e| Error::from(attachment_error(e)))?;
    Ok(plaintext)
}

/// The attachment error a reader's I/O error carries (a hash mismatch), or the I/O error.
fn attachment_error(error: io::Error) -> AttachmentError {
    match error.get_ref().is_some_and(|inner| inner.is::<AttachmentError>()) {
        true => *error.into_inner().expect("checked above").downcast::<AttachmentError>().expect("checked above"),
        false => AttachmentError::Io(error),
    }
}

#[cfg(test)]
mod tests {
    use ruma::mxc_uri;
    use serde_json::json;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// NIST SP 800-38A F.5.5 (CTR-AES256.Encrypt): the cipher itself.
    #[test]
    fn nist_aes256_ctr_vector() {
        let key: [u8; 32] = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").try_into().unwrap();
        let iv: [u8; 16] = hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap();
        let plaintext = hex(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ));
        let expected = hex(concat!(
            "601ec313775789a5b7a7f504bbf3d228",
            "f443e3ca4d62b59aca84e990cacaf5c5",
            "2b0930daa23de94ce87017ba2d84988d",
            "dfc9c58db67aada613c2dd08457941a6"
        ));
        // Odd read sizes: the keystream must continue across reads.
        let mut reader = EncryptingReader::with_key(&plaintext[..], key, iv);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn round_trip_json_shape_and_tamper_detection() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (ciphertext, finish) = encrypt_bytes(&data);
        assert_ne!(ciphertext, data);
        let file = finish(mxc_uri!("mxc://localhost/abc").to_owned()).unwrap();
        let json = serde_json::to_value(&file).unwrap();
        assert_eq!(json["v"], "v2");
        assert_eq!(json["key"]["alg"], "A256CTR");
        assert_eq!(json["key"]["kty"], "oct");
        assert_eq!(json["key"]["ext"], true);
        assert_eq!(json["key"]["key_ops"], json!(["decrypt", "encrypt"]));
        let iv = vodozemac::base64_decode(json["iv"].as_str().unwrap()).unwrap();
        assert_eq!(&iv[8..], &[0u8; 8], "the counter half of the IV starts at zero");
        assert!(json["hashes"]["sha256"].is_string());

        // Parsed back from JSON, as a receiving client does.
        let parsed: EncryptedFile = serde_json::from_value(json).unwrap();
        assert_eq!(decrypt_bytes(&ciphertext, &parsed).unwrap(), data);

        let mut tampered = ciphertext.clone();
        tampered[500] ^= 1;
        assert!(matches!(decrypt_bytes(&tampered, &parsed), Err(Error::Attachment(AttachmentError::HashMismatch))));
        assert!(decrypt_bytes(&ciphertext[..ciphertext.len() - 1], &parsed).is_err());
    }

    #[test]
    fn writers_interoperate_with_readers() {
        let data: Vec<u8> = (0..70_001u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut writer = EncryptingWriter::new(Vec::new());
        for chunk in data.chunks(999) {
            writer.write_all(chunk).unwrap();
        }
        let (ciphertext, file) = writer.finish(mxc_uri!("mxc://localhost/w").to_owned()).unwrap();
        assert_eq!(decrypt_bytes(&ciphertext, &file).unwrap(), data);

        let mut decryptor = DecryptingWriter::new(Vec::new(), &file).unwrap();
        for chunk in ciphertext.chunks(4096) {
            decryptor.write_all(chunk).unwrap();
        }
        assert_eq!(decryptor.finish().unwrap(), data);

        let mut tampered = DecryptingWriter::new(Vec::new(), &file).unwrap();
        tampered.write_all(&ciphertext[..ciphertext.len() - 1]).unwrap();
        tampered.write_all(&[ciphertext[ciphertext.len() - 1] ^ 0x80]).unwrap();
        assert!(matches!(tampered.finish(), Err(Error::Attachment(AttachmentError::HashMismatch))));
    }

    #[test]
    fn finish_before_eof_is_refused() {
        let reader = EncryptingReader::new(&b"abc"[..]);
        assert!(reader.finish(mxc_uri!("mxc://localhost/abc").to_owned()).is_err());
    }
}
