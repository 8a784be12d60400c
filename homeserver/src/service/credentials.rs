//! Secrets: argon2id password hashes, access tokens and device ids.

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Longest password accepted: argon2 hashes any length, but a megabyte password is a
/// denial-of-service, not a password.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Bounds how many argon2 hashes run at once. Each takes 19 MiB for its duration; without a
/// bound, a burst of logins (or a login flood) multiplies that by the burst size.
pub struct Hashing {
    permits: tokio::sync::Semaphore,
}

impl Hashing {
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self { permits: tokio::sync::Semaphore::new(cores) }
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.permits.acquire().await.map_err(|_| Error::internal("hashing closed"))
    }
}

impl Default for Hashing {
    fn default() -> Self {
        Self::new()
    }
}

/// Hashes a password with argon2id (the crate's defaults: 19 MiB, 2 passes), off the
/// async runtime because it deliberately takes tens of milliseconds.
pub async fn hash_password(hashing: &Hashing, password: String) -> Result<String> {
    check_password_shape(&password)?;
    let _permit = hashing.permit().await?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::internal(format!("argon2: {e}")))
    })
    .await
    .map_err(|e| Error::internal(format!("hashing task: {e}")))?
}

/// Checks `password` against a stored hash. With no stored hash (unknown user, deactivated
/// account) a dummy hash is checked instead so the answer takes as long either way.
pub async fn verify_password(hashing: &Hashing, password: String, stored: Option<String>) -> Result<bool> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Ok(false);
    }
    let _permit = hashing.permit().await?;
    tokio::task::spawn_blocking(move || {
        const DUMMY: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2B9YPbRZV2q3x6m1bNdPfmzhF7y2XKp4h7JfQ5lVh4s";
        let (hash, real) = match &stored {
            Some(h) => (h.as_str(), true),
            None => (DUMMY, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return Ok(false);
        };
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok() && real)
    })
    .await
    .map_err(|e| Error::internal(format!("hashing task: {e}")))?
}

fn check_password_shape(password: &str) -> Result<()> {
    if password.is_empty() {
        return Err(Error::WeakPassword("The password must not be empty".to_owned()));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::InvalidParam(format!("The password is longer than {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

/// A new access token: a prefix that makes leaked tokens easy to recognise, then 256
/// random bits.
pub fn new_access_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("obm_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// What the database keeps of a token: its SHA-256, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new device id: ten upper-case letters, as Synapse makes them.
pub fn new_device_id() -> String {
    random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 10)
}

/// A random string over `alphabet`, without modulo bias.
pub fn random_string(alphabet: &[u8], len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_reject() {
        let hashing = Hashing::new();
        let hash = hash_password(&hashing, "correct horse".to_owned()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hashing, "correct horse".to_owned(), Some(hash.clone())).await.unwrap());
        assert!(!verify_password(&hashing, "wrong".to_owned(), Some(hash)).await.unwrap());
        assert!(!verify_password(&hashing, "anything".to_owned(), None).await.unwrap());
    }

    #[test]
    fn tokens_are_unique_and_hashed() {
        let (a, b) = (new_access_token(), new_access_token());
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
