//! Rooms: the room list from the cache, direct chats and groups (always created
//! end-to-end encrypted), invites, leaving.

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UserId,
    api::client::{
        config::{get_global_account_data, set_global_account_data},
        membership::{
            get_member_events,
            invite_user::{self, v3::InvitationRecipient},
            join_room_by_id, leave_room,
        },
        room::{Visibility, create_room},
    },
    events::GlobalAccountDataEventType,
    serde::Raw,
};
use serde_json::{Value, json};

use crate::{
    Client, Error, Membership, Result, RoomSummary, Update, UserSummary,
    http::REQUEST_TIMEOUT,
    session::Session,
    store::{RoomRow, Store},
};

/// The encryption every room we create gets.
fn encryption_content() -> Value {
    json!({"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 604_800_000u64, "rotation_period_msgs": 100})
}

impl Client {
    /// The room list from the local cache (works offline): joined rooms and invites, the
    /// most recently active first.
    pub async fn rooms(&self) -> Result<Vec<RoomSummary>> {
        let session = self.require_session()?;
        let mut rooms = Vec::new();
        for row in self.store()?.rooms().await? {
            rooms.push(self.summary(&session.user_id, row).await?);
        }
        rooms.sort_by_key(|r| std::cmp::Reverse(r.last_message.as_ref().map_or(0, |m| m.timestamp)));
        Ok(rooms)
    }

    /// One room's summary from the cache.
    pub async fn room(&self, room_id: &RoomId) -> Result<Option<RoomSummary>> {
        let session = self.require_session()?;
        match self.store()?.room(room_id.as_str()).await? {
            Some(row) => Ok(Some(self.summary(&session.user_id, row).await?)),
            None => Ok(None),
        }
    }

    /// Joined and invited members of a room, from the cache.
    pub async fn members(&self, room_id: &RoomId) -> Result<Vec<UserSummary>> {
        let mut members = Vec::new();
        for (user_id, name) in self.store()?.members(room_id.as_str(), &["join", "invite"]).await? {
            members.push(self.cached_user(&user_id, name).await?);
        }
        Ok(members)
    }

    async fn summary(&self, me: &UserId, row: RoomRow) -> Result<RoomSummary> {
        let room_id: OwnedRoomId = row.room_id.as_str().try_into().map_err(|_| Error::Store("bad room id".into()))?;
        let members = self.store()?.members(&row.room_id, &["join", "invite"]).await?;
        let others: Vec<_> = members.iter().filter(|(u, _)| u != me.as_str()).collect();
        let dm_peer = match (row.is_direct, others.as_slice()) {
            (true, [(user, name)]) => Some(self.cached_user(user, name.clone()).await?),
            // An invite to a direct chat: the peer is whoever invited us.
            (true, []) => match &row.inviter {
                Some(inviter) => Some(self.cached_user(inviter, None).await?),
                None => None,
            },
            _ => None,
        };
        let name = row
            .name
            .clone()
            .or_else(|| dm_peer.as_ref().map(|p| p.display_name.clone().unwrap_or_else(|| p.user_id.to_string())))
            .or_else(|| {
                (!others.is_empty()).then(|| {
                    others.iter().map(|(u, n)| n.clone().unwrap_or_else(|| u.clone())).collect::<Vec<_>>().join(", ")
                })
            })
            .unwrap_or_else(|| row.room_id.clone());
        let last_message = self.store()?.timeline(&row.room_id, 1).await?.pop();
        Ok(RoomSummary {
            unread: self.store()?.unread_count(&row.room_id, me.as_str(), row.read_seq).await?,
            room_id,
            name,
            membership: row.membership,
            dm_peer,
            inviter: row.inviter.as_deref().and_then(|i| i.try_into().ok()),
            encrypted: row.encryption.is_some(),
            last_message,
            member_count: members.len() as u64,
        })
    }

    /// A user as cached (profile, presence); `room_name` is their name in a room if known.
    pub(crate) async fn cached_user(&self, user_id: &str, room_name: Option<String>) -> Result<UserSummary> {
        let user_id: OwnedUserId = user_id.try_into().map_err(|_| Error::Store("bad user id".into()))?;
        let mut user = self.store()?.user(user_id.as_str()).await?.unwrap_or(UserSummary {
            user_id,
            display_name: None,
            avatar_url: None,
            avatar_colour: None,
            presence: Default::default(),
        });
        if user.display_name.is_none() {
            user.display_name = room_name;
        }
        Ok(user)
    }

    /// Starts an encrypted direct chat with `user_id` (an invite they accept); returns the
    /// room. The room is usable at once: messages sent before they join are readable by them.
    pub async fn create_dm(&self, user_id: &UserId) -> Result<OwnedRoomId> {
        let room_id = self.create_encrypted_room(None, &[user_id.to_owned()], true).await?;
        self.add_direct_room(user_id, &room_id).await?;
        Ok(room_id)
    }

    /// Creates an encrypted group chat named `name` and invites `invitees`.
    pub async fn create_group(&self, name: &str, invitees: &[OwnedUserId]) -> Result<OwnedRoomId> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("A group needs a name.".into()));
        }
        self.create_encrypted_room(Some(name), invitees, false).await
    }

    async fn create_encrypted_room(
        &self,
        name: Option<&str>,
        invitees: &[OwnedUserId],
        direct: bool,
    ) -> Result<OwnedRoomId> {
        let session = self.require_session()?;
        let mut request = create_room::v3::Request::new();
        request.name = name.map(str::to_owned);
        request.invite = invitees.to_vec();
        request.is_direct = direct;
        request.visibility = Visibility::Private;
        request.preset = Some(if direct {
            create_room::v3::RoomPreset::TrustedPrivateChat
        } else {
            create_room::v3::RoomPreset::PrivateChat
        });
        let encryption = encryption_content();
        let initial = json!({"type": "m.room.encryption", "state_key": "", "content": encryption});
        request.initial_state =
            vec![Raw::<Value>::from_json(serde_json::value::to_raw_value(&initial)?).cast_unchecked()];
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let room_id = response.room_id;

        // Into the cache now, so the room can be used before the next sync brings it.
        let mut tx = self.store()?.begin().await?;
        Store::upsert_room(&mut tx, room_id.as_str(), Membership::Joined, None).await?;
        Store::set_room_encryption(&mut tx, room_id.as_str(), &encryption).await?;
        Store::set_room_direct(&mut tx, room_id.as_str(), direct).await?;
        Store::set_room_name(&mut tx, room_id.as_str(), name).await?;
        Store::set_member(&mut tx, room_id.as_str(), session.user_id.as_str(), "join", None).await?;
        for invitee in invitees {
            Store::set_member(&mut tx, room_id.as_str(), invitee.as_str(), "invite", None).await?;
        }
        tx.commit().await?;
        self.emit(Update::RoomsChanged);
        Ok(room_id)
    }

    /// Reloads the room's member list from the server. Encryption needs the complete list
    /// (a member missing from it would not get the room key), and right after a join the
    /// cache may only have what the invite showed.
    pub(crate) async fn refresh_members(&self, session: &Session, room_id: &RoomId) -> Result<()> {
        let request = get_member_events::v3::Request::new(room_id.to_owned());
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let mut tx = self.store()?.begin().await?;
        for event in &response.chunk {
            let event: Value = event.deserialize_as_unchecked().unwrap_or(Value::Null);
            if let (Some(user), Some(membership)) =
                (event["state_key"].as_str(), event["content"]["membership"].as_str())
            {
                Store::set_member(
                    &mut tx,
                    room_id.as_str(),
                    user,
                    membership,
                    event["content"]["displayname"].as_str(),
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Invites someone into a room we are in.
    pub async fn invite(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let session = self.require_session()?;
        let request = invite_user::v3::Request::new(
            room_id.to_owned(),
            InvitationRecipient::UserId(invite_user::v3::InviteUserId::new(user_id.to_owned())),
        );
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let mut tx = self.store()?.begin().await?;
        Store::set_member(&mut tx, room_id.as_str(), user_id.as_str(), "invite", None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Accepts an invite: joins the room (a direct chat is remembered as one).
    pub async fn accept_invite(&self, room_id: &RoomId) -> Result<()> {
        let session = self.require_session()?;
        let request = join_room_by_id::v3::Request::new(room_id.to_owned());
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let room = self.store()?.room(room_id.as_str()).await?;
        let mut tx = self.store()?.begin().await?;
        Store::upsert_room(&mut tx, room_id.as_str(), Membership::Joined, None).await?;
        Store::set_member(&mut tx, room_id.as_str(), session.user_id.as_str(), "join", None).await?;
        tx.commit().await?;
        if let Some(room) = room
            && room.is_direct
            && let Some(inviter) = room.inviter.as_deref().and_then(|i| UserId::parse(i).ok())
        {
            self.add_direct_room(&inviter, room_id).await?;
        }
        self.emit(Update::RoomsChanged);
        Ok(())
    }

    /// Declines an invite.
    pub async fn decline_invite(&self, room_id: &RoomId) -> Result<()> {
        self.leave(room_id).await
    }

    /// Leaves a room (or declines its invite); it disappears from the room list.
    pub async fn leave(&self, room_id: &RoomId) -> Result<()> {
        let session = self.require_session()?;
        let request = leave_room::v3::Request::new(room_id.to_owned());
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let mut tx = self.store()?.begin().await?;
        Store::upsert_room(&mut tx, room_id.as_str(), Membership::Left, None).await?;
        tx.commit().await?;
        self.emit(Update::RoomsChanged);
        Ok(())
    }

    /// Adds the room to our `m.direct` account data (the spec's record of direct chats, which
    /// other clients of ours read too).
    async fn add_direct_room(&self, peer: &UserId, room_id: &RoomId) -> Result<()> {
        let session = self.require_session()?;
        let get =
            get_global_account_data::v3::Request::new(session.user_id.clone(), GlobalAccountDataEventType::Direct);
        let mut direct: Value =
            match self.inner.http.send(&session.server_url, Some(&session.access_token), get, REQUEST_TIMEOUT).await {
                Ok(response) => response.account_data.deserialize_as_unchecked().unwrap_or_else(|_| json!({})),
                Err(Error::NotFound { .. }) => json!({}),
                Err(e) => return Err(e),
            };
        if !direct.is_object() {
            direct = json!({});
        }
        let rooms = direct.as_object_mut().expect("object").entry(peer.as_str()).or_insert_with(|| json!([]));
        if !rooms.is_array() {
            *rooms = json!([]);
        }
        let list = rooms.as_array_mut().expect("array");
        if !list.iter().any(|r| r == room_id.as_str()) {
            list.push(json!(room_id));
        }
        let set = set_global_account_data::v3::Request::new_raw(
            session.user_id.clone(),
            GlobalAccountDataEventType::Direct,
            Raw::<Value>::from_json(serde_json::value::to_raw_value(&direct)?).cast_unchecked(),
        );
        self.inner.http.send(&session.server_url, Some(&session.access_token), set, REQUEST_TIMEOUT).await?;
        Ok(())
    }
}
