//! A user's devices.

use super::Services;
use crate::{
    error::{Error, Result},
    store::DeviceRow,
};

impl Services {
    pub async fn devices(&self, user_id: &str) -> Result<Vec<DeviceRow>> {
        Ok(self.store.devices(user_id).await?)
    }

    pub async fn device(&self, user_id: &str, device_id: &str) -> Result<DeviceRow> {
        self.store.device(user_id, device_id).await?.ok_or_else(|| Error::NotFound("Unknown device".to_owned()))
    }

    pub async fn rename_device(&self, user_id: &str, device_id: &str, display_name: Option<&str>) -> Result<()> {
        if display_name.is_some_and(|n| n.len() > 512) {
            return Err(Error::InvalidParam("The device display name is longer than 512 bytes".to_owned()));
        }
        if self.store.rename_device(user_id, device_id, display_name).await? {
            Ok(())
        } else {
            Err(Error::NotFound("Unknown device".to_owned()))
        }
    }

    /// Deletes devices (after UIA); unknown ids are ignored, as the spec says for
    /// `/delete_devices`.
    pub async fn delete_devices(&self, user_id: &str, device_ids: &[&str]) -> Result<u64> {
        let before = self.device_ids(user_id).await?;
        let deleted = self.store.delete_devices(user_id, device_ids).await?;
        self.forget_removed_devices(user_id, before).await?;
        Ok(deleted)
    }
}
