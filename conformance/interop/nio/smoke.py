#!/usr/bin/env python3
"""matrix-nio (the Python library most Matrix bots are built on) against an Obmin homeserver,
the way a bot uses it: register, log in, create and join rooms, send, sync, paginate, upload
and download media, the room directory, typing, receipts and read markers, profile changes.

    python3 smoke.py --url http://127.0.0.1:8008

Exits non-zero at the first step that fails, naming it and what the server answered.
"""

import argparse
import asyncio
import io
import sys
import uuid

import nio

STEP = ["setup"]


def check(response, kind, what):
    """The response must be of the success type `kind`; else the step fails with its error."""
    if not isinstance(response, kind):
        raise SystemExit(f"nio interop, step '{STEP[0]}': {what} failed: {response!r}")
    return response


def step(name):
    STEP[0] = name
    print(f"--- {name}", flush=True)


async def sync_until(client, what, done, since=None, rounds=20):
    """Syncs (long-polling) until `done(response)` holds; returns that response."""
    for _ in range(rounds):
        response = check(await client.sync(timeout=3000, since=since), nio.SyncResponse, "sync")
        since = response.next_batch
        if done(response):
            return response
    raise SystemExit(f"nio interop, step '{STEP[0]}': {what} never arrived")


def timeline_bodies(response, room_id):
    room = response.rooms.join.get(room_id)
    if room is None:
        return []
    return [getattr(e, "body", None) for e in room.timeline.events]


async def main(url):
    stamp = uuid.uuid4().hex[:8]
    alice = nio.AsyncClient(url, f"@nio_alice_{stamp}:localhost")
    bob = nio.AsyncClient(url, f"@nio_bob_{stamp}:localhost")
    try:
        step("register")
        check(await alice.register(f"nio_alice_{stamp}", "password-alice-1", "alice's bot"), nio.RegisterResponse, "register alice")
        check(await bob.register(f"nio_bob_{stamp}", "password-bob-1", "bob's bot"), nio.RegisterResponse, "register bob")

        step("login")
        alice_again = nio.AsyncClient(url, alice.user_id)
        login = check(await alice_again.login("password-alice-1", device_name="second device"), nio.LoginResponse, "login")
        assert login.device_id and login.device_id != alice.device_id, login
        check(await alice_again.logout(), nio.LogoutResponse, "logout")
        await alice_again.close()

        step("profile")
        check(await alice.set_displayname("Alice the bot"), nio.ProfileSetDisplayNameResponse, "set display name")
        profile = check(await bob.get_profile(alice.user_id), nio.ProfileGetResponse, "get profile")
        assert profile.displayname == "Alice the bot", profile

        step("create room")
        created = check(
            await alice.room_create(
                visibility=nio.RoomVisibility.public, name="nio room", topic="bots welcome",
                alias=f"nio{stamp}",
            ),
            nio.RoomCreateResponse, "createRoom",
        )
        room_id = created.room_id
        visibility = check(await alice.room_get_visibility(room_id), nio.RoomGetVisibilityResponse, "visibility")
        assert visibility.visibility == "public", visibility

        step("resolve alias and join")
        resolved = check(await bob.room_resolve_alias(f"#nio{stamp}:localhost"), nio.RoomResolveAliasResponse, "resolve alias")
        assert resolved.room_id == room_id, resolved
        check(await bob.join(room_id), nio.JoinResponse, "join (an empty body)")
        members = check(await alice.joined_members(room_id), nio.JoinedMembersResponse, "joined members")
        assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id}, members

        step("send and sync")
        first = check(await bob.sync(timeout=0), nio.SyncResponse, "first sync")
        sent = check(
            await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hello from nio"}),
            nio.RoomSendResponse, "send",
        )
        got = await sync_until(bob, "alice's message", lambda r: "hello from nio" in timeline_bodies(r, room_id), first.next_batch)

        step("typing, receipts and read markers")
        check(await bob.room_typing(room_id, True, 10000), nio.RoomTypingResponse, "typing")
        check(await bob.update_receipt_marker(room_id, sent.event_id), nio.UpdateReceiptMarkerResponse, "receipt")
        check(await bob.room_read_markers(room_id, sent.event_id, sent.event_id), nio.RoomReadMarkersResponse, "read markers")

        def saw_receipt(response):
            room = response.rooms.join.get(room_id)
            return room is not None and any(
                isinstance(e, nio.ReceiptEvent) and any(r.user_id == bob.user_id for r in e.receipts)
                for e in room.ephemeral
            )

        await sync_until(alice, "bob's receipt", saw_receipt)

        step("paginate")
        for i in range(25):
            check(
                await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"history {i}"}),
                nio.RoomSendResponse, "send history",
            )
        seen = []
        token = got.next_batch
        sync = check(await bob.sync(timeout=0, since=token), nio.SyncResponse, "sync before paging")
        start = sync.rooms.join[room_id].timeline.prev_batch if room_id in sync.rooms.join else sync.next_batch
        for _ in range(10):
            page = check(await bob.room_messages(room_id, start=start, limit=10), nio.RoomMessagesResponse, "messages")
            seen += [getattr(e, "body", None) for e in page.chunk]
            if not page.end or not page.chunk:
                break
            start = page.end
        for i in range(25):
            assert f"history {i}" in seen or f"history {i}" in timeline_bodies(sync, room_id), f"history {i} missing"

        step("media")
        data = b"obmin nio interop " * 1000
        upload, _ = await alice.upload(io.BytesIO(data), content_type="text/plain", filename="note.txt", filesize=len(data))
        upload = check(upload, nio.UploadResponse, "upload")
        download = check(await bob.download(upload.content_uri), nio.MemoryDownloadResponse, "download")
        assert download.body == data, "the downloaded bytes differ"
        check(
            await alice.room_send(room_id, "m.room.message",
                                  {"msgtype": "m.file", "body": "note.txt", "url": upload.content_uri}),
            nio.RoomSendResponse, "send file",
        )

        step("display name in the room")
        check(await bob.set_displayname("Bob the bot"), nio.ProfileSetDisplayNameResponse, "bob's display name")
        state = await alice.room_get_state_event(room_id, "m.room.member", bob.user_id)
        state = check(state, nio.RoomGetStateEventResponse, "bob's member event")
        assert state.content.get("displayname") == "Bob the bot", state.content

        step("leave")
        check(await bob.room_leave(room_id), nio.RoomLeaveResponse, "leave (an empty body)")
        members = check(await alice.joined_members(room_id), nio.JoinedMembersResponse, "joined members after leave")
        assert {m.user_id for m in members.members} == {alice.user_id}, members
        print("nio interop: all steps passed")
    finally:
        await alice.close()
        await bob.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    sys.exit(asyncio.run(main(parser.parse_args().url)))
