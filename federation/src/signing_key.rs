//! The homeserver's long-lived ed25519 signing key.
//!
//! On disk the key uses Synapse's signing-key format, one line `ed25519 <version> <seed>`
//! with the 32-byte seed in unpadded standard base64, so an operator can move a key between
//! Obmin and Synapse. In memory it is ruma's [`Ed25519KeyPair`], which does the signing.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use ruma::{
    serde::Base64,
    signatures::{Ed25519KeyPair, KeyPair},
};

/// Unpadded standard base64 over a byte vector (ruma's defaults).
type B64 = Base64;

/// Errors while loading or creating a signing key file.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write signing key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("signing key {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// The server's signing key pair and its key id (`ed25519:<version>`).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

/// PKCS#8 v1 prefix for a bare ed25519 private key (RFC 8410 section 7): ruma parses keys from
/// PKCS#8 documents, and Synapse's file holds only the 32-byte seed, so we wrap the seed here.
const PKCS8_ED25519_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

impl SigningKey {
    /// Loads the key at `path`, creating a new random key there first if the file is absent.
    pub fn load_or_generate(path: &Path) -> Result<Self, SigningKeyError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                Self::parse(&text).map_err(|reason| SigningKeyError::Malformed { path: path.to_owned(), reason })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::fill(&mut seed);
                let version = random_version();
                let line = format!("ed25519 {version} {}\n", B64::new(seed.to_vec()).encode());
                write_new_private_file(path, line.as_bytes())
                    .map_err(|source| SigningKeyError::Write { path: path.to_owned(), source })?;
                Self::from_seed(&seed, version)
                    .map_err(|reason| SigningKeyError::Malformed { path: path.to_owned(), reason })
            }
            Err(source) => Err(SigningKeyError::Read { path: path.to_owned(), source }),
        }
    }

    /// Parses Synapse's `ed25519 <version> <base64 seed>` format (first key line only).
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| "the file is empty".to_owned())?;
        let mut parts = line.split_whitespace();
        let (Some(algorithm), Some(version), Some(seed), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected one line `ed25519 <version> <base64 seed>`".to_owned());
        };
        if algorithm != "ed25519" {
            return Err(format!("unsupported algorithm `{algorithm}`"));
        }
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err("the key version may only hold a-z, A-Z, 0-9 and _".to_owned());
        }
        let seed = B64::parse(seed).map_err(|e| format!("the seed is not base64: {e}"))?;
        Self::from_seed(seed.as_bytes(), version.to_owned())
    }

    fn from_seed(seed: &[u8], version: String) -> Result<Self, String> {
        if seed.len() != 32 {
            return Err(format!("the seed has {} bytes, expected 32", seed.len()));
        }
        let mut der = Vec::with_capacity(48);
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(seed);
        let pair = Ed25519KeyPair::from_der(&der, version).map_err(|e| e.to_string())?;
        Ok(Self { pair })
    }

    /// `ed25519:<version>`, as used in `signatures` objects and `/_matrix/key/v2/server`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    /// The public key in unpadded standard base64, as Matrix publishes it.
    pub fn public_key_base64(&self) -> String {
        B64::new(self.pair.public_key().to_vec()).encode()
    }

    /// Signs `message` and returns the signature in unpadded standard base64.
    pub fn sign_base64(&self, message: &[u8]) -> String {
        let signature = self.pair.sign(message);
        B64::new(signature.as_bytes().to_vec()).encode()
    }

    /// The ruma key pair, for ruma's JSON and event signing functions.
    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }
}

/// A short random key version such as `a_Xy3q`, like Synapse generates.
fn random_version() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut bytes = [0u8; 4];
    rand::fill(&mut bytes);
    let suffix: String = bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect();
    format!("a_{suffix}")
}

/// Creates `path` with owner-only permissions, refusing to overwrite an existing file, and
/// syncs it so a crash right after start cannot leave an empty key behind.
fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_reloaded_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let first = SigningKey::load_or_generate(&path).unwrap();
        let second = SigningKey::load_or_generate(&path).unwrap();
        assert_eq!(first.key_id(), second.key_id());
        assert_eq!(first.public_key_base64(), second.public_key_base64());
        assert_eq!(first.sign_base64(b"hello"), second.sign_base64(b"hello"));
    }

    #[test]
    fn parses_synapse_format_known_answer() {
        // RFC 8032 test vector 1: this seed has this public key.
        let seed = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
        let key = SigningKey::parse(&format!("ed25519 a_test {seed}\n")).unwrap();
        assert_eq!(key.key_id(), "ed25519:a_test");
        assert_eq!(key.public_key_base64(), "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo");
    }

    #[test]
    fn refuses_malformed_files() {
        assert!(SigningKey::parse("").is_err());
        assert!(SigningKey::parse("ed25519 a_x").is_err());
        assert!(SigningKey::parse("rsa a_x AAAA").is_err());
        assert!(SigningKey::parse("ed25519 a_x not-base64!").is_err());
        assert!(SigningKey::parse("ed25519 a_x AAAA").is_err());
    }
}
