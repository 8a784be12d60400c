//! Server-side key backups (`/room_keys`): versions of a user's backup and the encrypted
//! room keys in them. The server never sees a key; it keeps the best copy of each session.

use ruma::{RoomId, UInt, UserId};
use serde_json::Value as JsonValue;

use super::Hub;
use crate::{
    error::{Error, Result},
    store::BackupVersionRow,
};

/// Which keys of a backup version an operation covers.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    All,
    Room(&'a RoomId),
    Session(&'a RoomId, &'a str),
}

impl<'a> Selection<'a> {
    fn room(&self) -> Option<&'a str> {
        match self {
            Selection::All => None,
            Selection::Room(room) | Selection::Session(room, _) => Some(room.as_str()),
        }
    }

    fn session(&self) -> Option<&'a str> {
        match self {
            Selection::Session(_, session) => Some(session),
            _ => None,
        }
    }
}

/// One backed-up session key.
#[derive(Debug)]
pub struct BackedUpKey {
    pub room_id: String,
    pub session_id: String,
    /// The `KeyBackupData` as the client uploaded it.
    pub data: JsonValue,
}

/// What a write to a backup answers: the version's new etag and how many keys it holds.
#[derive(Debug)]
pub struct BackupState {
    pub etag: String,
    pub count: UInt,
}

impl From<&BackupVersionRow> for BackupState {
    fn from(row: &BackupVersionRow) -> Self {
        BackupState { etag: row.etag.to_string(), count: UInt::new(row.count as u64).unwrap_or_default() }
    }
}

/// Key backups of every user.
pub struct KeyBackups {
    hub: Hub,
}

impl KeyBackups {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// `POST /room_keys/version`: a new version, which becomes the current one.
    pub async fn create_version(&self, user: &UserId, algorithm: &str) -> Result<i64> {
        check_algorithm(algorithm)?;
        Ok(self.hub.services().store.create_backup_version(user.as_str(), algorithm).await?)
    }

    /// `GET /room_keys/version`: the current version.
    pub async fn latest_version(&self, user: &UserId) -> Result<BackupVersionRow> {
        self.hub
            .services()
            .store
            .backup_version(user.as_str(), None)
            .await?
            .ok_or_else(|| Error::NotFound("No backup".to_owned()))
    }

    /// A version that exists and is not deleted.
    pub async fn live_version(&self, user: &UserId, version: &str) -> Result<BackupVersionRow> {
        let version = parse_version(version)?;
        self.hub
            .services()
            .store
            .backup_version(user.as_str(), Some(version))
            .await?
            .ok_or_else(|| Error::NotFound("Unknown backup version".to_owned()))
    }

    /// `PUT /room_keys/version/{version}`: new auth data for the same algorithm.
    pub async fn update_version(&self, user: &UserId, version: &str, algorithm: &str) -> Result<()> {
        let current = self.live_version(user, version).await?;
        check_algorithm(algorithm)?;
        let new: JsonValue = serde_json::from_str(algorithm).map_err(|e| Error::BadJson(e.to_string()))?;
        let old: JsonValue = serde_json::from_str(&current.algorithm).unwrap_or_default();
        if new["algorithm"] != old["algorithm"] {
            return Err(Error::InvalidParam("The algorithm of a backup cannot change".to_owned()));
        }
        self.hub.services().store.update_backup_version(user.as_str(), current.version, &new.to_string()).await?;
        Ok(())
    }

    /// `DELETE /room_keys/version/{version}`.
    pub async fn delete_version(&self, user: &UserId, version: &str) -> Result<()> {
        let version = parse_version(version)?;
        if !self.hub.services().store.delete_backup_version(user.as_str(), version).await? {
            return Err(Error::NotFound("Unknown backup version".to_owned()));
        }
        Ok(())
    }

    /// Writes to a version other than the current one are refused (M_WRONG_ROOM_KEYS_VERSION),
    /// so a client with an outdated idea of the backup does not scatter keys.
    async fn writable_version(&self, user: &UserId, version: &str) -> Result<i64> {
        let current = self.hub.services().store.backup_version(user.as_str(), None).await?;
        let requested = parse_version(version)?;
        match current {
            Some(c) if c.version == requested => Ok(requested),
            Some(c) => Err(Error::WrongRoomKeysVersion(c.version.to_string())),
            None => Err(Error::NotFound("Unknown backup version".to_owned())),
        }
    }

    /// `PUT /room_keys/keys...`: stores each key unless the backup holds a better copy.
    pub async fn put_keys(&self, user: &UserId, version: &str, keys: Vec<BackedUpKey>) -> Result<BackupState> {
        let s = self.hub.services();
        let version = self.writable_version(user, version).await?;
        let mut to_store = Vec::new();
        for key in keys {
            let existing =
                s.store.backup_keys(user.as_str(), version, Some(&key.room_id), Some(&key.session_id)).await?;
            let keep_old = existing
                .first()
                .is_some_and(|(_, _, old)| !better(&key.data, &serde_json::from_str(old).unwrap_or_default()));
            if !keep_old {
                to_store.push((key.room_id, key.session_id, key.data.to_string()));
            }
        }
        s.store.put_backup_keys(user.as_str(), version, &to_store).await?;
        self.state_of(user, version).await
    }

    /// `GET /room_keys/keys...`.
    pub async fn keys(&self, user: &UserId, version: &str, which: Selection<'_>) -> Result<Vec<BackedUpKey>> {
        let s = self.hub.services();
        let row = self.live_version(user, version).await?;
        let keys = s.store.backup_keys(user.as_str(), row.version, which.room(), which.session()).await?;
        Ok(keys
            .into_iter()
            .map(|(room_id, session_id, json)| BackedUpKey {
                room_id,
                session_id,
                data: serde_json::from_str(&json).unwrap_or_default(),
            })
            .collect())
    }

    /// `DELETE /room_keys/keys...`.
    pub async fn delete_keys(&self, user: &UserId, version: &str, which: Selection<'_>) -> Result<BackupState> {
        let s = self.hub.services();
        let row = self.live_version(user, version).await?;
        s.store.delete_backup_keys(user.as_str(), row.version, which.room(), which.session()).await?;
        self.state_of(user, row.version).await
    }

    async fn state_of(&self, user: &UserId, version: i64) -> Result<BackupState> {
        let row = self
            .hub
            .services()
            .store
            .backup_version(user.as_str(), Some(version))
            .await?
            .ok_or_else(|| Error::internal("backup vanished"))?;
        Ok(BackupState::from(&row))
    }
}

fn parse_version(version: &str) -> Result<i64> {
    version.parse().map_err(|_| Error::NotFound("Unknown backup version".to_owned()))
}

/// A backup version names its `algorithm` (a string) and its `auth_data` (an object), as the
/// spec's BackupAlgorithm does. The version is stored as given and served back through ruma's
/// types: anything else (`{}`, say) was accepted once and then made every read of the user's
/// backup versions a 500.
fn check_algorithm(algorithm: &str) -> Result<()> {
    let value: JsonValue = serde_json::from_str(algorithm).map_err(|e| Error::BadJson(e.to_string()))?;
    if !value["algorithm"].is_string() || !value["auth_data"].is_object() {
        return Err(Error::BadJson(
            "A backup version needs an `algorithm` string and an `auth_data` object".to_owned(),
        ));
    }
    Ok(())
}

/// Keeps the better of two backed-up copies of a session, as the spec orders them: verified
/// over unverified, then the lower first message index, then fewer forwards.
fn better(new: &JsonValue, old: &JsonValue) -> bool {
    let key = |v: &JsonValue| {
        (
            !v["is_verified"].as_bool().unwrap_or(false),
            v["first_message_index"].as_u64().unwrap_or(u64::MAX),
            v["forwarded_count"].as_u64().unwrap_or(u64::MAX),
        )
    };
    key(new) < key(old)
}
