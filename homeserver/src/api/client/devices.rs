//! `/devices` and `/delete_devices`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::device::{Device, delete_device, delete_devices, get_device, get_devices, update_device},
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::{Services, uiaa::UiaaAction},
    store::DeviceRow,
};

fn to_device(row: DeviceRow) -> Device {
    let mut device = Device::new(row.device_id.into());
    device.display_name = row.display_name;
    device.last_seen_ip = row.last_seen_ip;
    device.last_seen_ts = row.last_seen_ts.and_then(|ts| UInt::try_from(ts).ok()).map(MilliSecondsSinceUnixEpoch);
    device
}

/// `GET /_matrix/client/v3/devices`
pub async fn list(
    State(services): State<Arc<Services>>,
    req: Ruma<get_devices::v3::Request>,
) -> Result<RumaResponse<get_devices::v3::Response>> {
    let user = req.user()?;
    let devices = services.devices.list(user.user_id.as_str()).await?.into_iter().map(to_device).collect();
    Ok(RumaResponse(get_devices::v3::Response::new(devices)))
}

/// `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_device::v3::Request>,
) -> Result<RumaResponse<get_device::v3::Response>> {
    let user = req.user()?;
    let device = services.devices.get(user.user_id.as_str(), req.body.device_id.as_str()).await?;
    Ok(RumaResponse(get_device::v3::Response::new(to_device(device))))
}

/// `PUT /_matrix/client/v3/devices/{deviceId}`
pub async fn update(
    State(services): State<Arc<Services>>,
    req: Ruma<update_device::v3::Request>,
) -> Result<RumaResponse<update_device::v3::Response>> {
    let user = req.user()?;
    services
        .devices
        .rename(user.user_id.as_str(), req.body.device_id.as_str(), req.body.display_name.as_deref())
        .await?;
    Ok(RumaResponse(update_device::v3::Response::new()))
}

/// `DELETE /_matrix/client/v3/devices/{deviceId}`
pub async fn delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_device::v3::Request>,
) -> Result<RumaResponse<delete_device::v3::Response>> {
    let user = req.user()?;
    // An unknown device is a 404 before any authentication is asked for.
    services.devices.get(user.user_id.as_str(), req.body.device_id.as_str()).await?;
    let uiaa = services.uiaa.check(UiaaAction::DeleteDevices, Some(&user.user_id), req.body.auth.as_ref()).await?;
    services.devices.delete(user.user_id.as_str(), &[req.body.device_id.as_str()]).await?;
    services.uiaa.finish(uiaa).await;
    Ok(RumaResponse(delete_device::v3::Response::new()))
}

/// `POST /_matrix/client/v3/delete_devices`
pub async fn delete_many(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_devices::v3::Request>,
) -> Result<RumaResponse<delete_devices::v3::Response>> {
    let user = req.user()?;
    let uiaa = services.uiaa.check(UiaaAction::DeleteDevices, Some(&user.user_id), req.body.auth.as_ref()).await?;
    let ids: Vec<&str> = req.body.devices.iter().map(|d| d.as_str()).collect();
    services.devices.delete(user.user_id.as_str(), &ids).await?;
    services.uiaa.finish(uiaa).await;
    Ok(RumaResponse(delete_devices::v3::Response::new()))
}
