//! A user's devices.

use super::Hub;
use crate::{
    error::{Error, Result},
    store::DeviceRow,
};

/// A user's devices: listing, renaming and deleting them (their keys are the `keys` domain's).
pub struct Devices {
    hub: Hub,
}

impl Devices {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    pub async fn list(&self, user_id: &str) -> Result<Vec<DeviceRow>> {
        Ok(self.hub.services().store.devices(user_id).await?)
    }

    /// The ids of a user's devices.
    pub async fn ids(&self, user_id: &str) -> Result<Vec<String>> {
        Ok(self.list(user_id).await?.into_iter().map(|d| d.device_id).collect())
    }

    pub async fn get(&self, user_id: &str, device_id: &str) -> Result<DeviceRow> {
        let s = self.hub.services();
        s.store.device(user_id, device_id).await?.ok_or_else(|| Error::NotFound("Unknown device".to_owned()))
    }

    pub async fn rename(&self, user_id: &str, device_id: &str, display_name: Option<&str>) -> Result<()> {
        if display_name.is_some_and(|n| n.len() > 512) {
            return Err(Error::InvalidParam("The device display name is longer than 512 bytes".to_owned()));
        }
        if self.hub.services().store.rename_device(user_id, device_id, display_name).await? {
            Ok(())
        } else {
            Err(Error::NotFound("Unknown device".to_owned()))
        }
    }

    /// Deletes devices (after UIA); unknown ids are ignored, as the spec says for
    /// `/delete_devices`.
    pub async fn delete(&self, user_id: &str, device_ids: &[&str]) -> Result<u64> {
        let s = self.hub.services();
        let before = self.ids(user_id).await?;
        let deleted = s.store.delete_devices(user_id, device_ids).await?;
        self.forget_removed(user_id, before).await?;
        Ok(deleted)
    }

    /// Cleans up after devices that were in `before` and are gone now.
    pub async fn forget_removed(&self, user_id: &str, before: Vec<String>) -> Result<()> {
        let after = self.ids(user_id).await?;
        let removed: Vec<String> = before.into_iter().filter(|d| !after.contains(d)).collect();
        self.hub.services().keys.devices_removed(user_id, &removed).await
    }
}
