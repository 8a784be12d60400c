#!/usr/bin/env node
// The matrix-js-sdk side (its Rust crypto) of the e2ee interop test in
// conformance/tests/it/e2ee_client.rs. It talks to the Rust test over stdin/stdout, one line
// each way per step, each of its lines prefixed "PEER " (the SDK logs to the console too;
// console output is sent to stderr, but the prefix keeps the protocol unambiguous):
//
//   -> READY {"user_id", "device_id"}     registered, crypto up, syncing
//   <- (the test invites us to ROOM)
//   -> JOINED                             joined, the room is encrypted for our crypto
//   -> GOT <body>                         decrypted the first m.room.message from RUST_USER
//   -> SENT <event_id>                    sent an encrypted reply
//   (the Rust client asks to verify our device: we accept, it starts SAS)
//   -> SAS <emoji names, comma-separated> the SAS we show; we confirm it
//   -> VERIFIED                           the verification finished on our side
//   <- DONE (or stdin closes)             stop
//
// Run from a directory whose node_modules holds matrix-js-sdk (the test links the shared
// interop install). Loopback only: the URL is the test's own server.
//   node e2ee_peer.mjs --url URL --room ROOM --rust-user USER --reply TEXT

import { parseArgs } from "node:util";
import { createInterface } from "node:readline";

// matrix-js-sdk 43 wants Promise.withResolvers (Node 22); Node 20 lacks only that.
if (typeof Promise.withResolvers !== "function") {
    Promise.withResolvers = function withResolvers() {
        let resolve;
        let reject;
        const promise = new this((res, rej) => {
            resolve = res;
            reject = rej;
        });
        return { promise, resolve, reject };
    };
}

const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel?.("silent");
for (const m of ["trace", "debug", "info", "warn", "log"]) {
    if (typeof logger[m] === "function") logger[m] = () => {};
}
const { createClient, RoomEvent, RoomMemberEvent } = sdk;
const { CryptoEvent } = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { VerifierEvent } = await import("matrix-js-sdk/lib/crypto-api/verification.js");

const { values: args } = parseArgs({
    options: {
        url: { type: "string" },
        room: { type: "string" },
        "rust-user": { type: "string" },
        reply: { type: "string" },
    },
});
const say = (line) => process.stdout.write(`PEER ${line}\n`);
for (const m of ["log", "info", "debug", "warn", "trace"]) {
    console[m] = (...parts) => process.stderr.write(`${parts.join(" ")}\n`);
}
const fail = (message) => {
    process.stderr.write(`e2ee_peer: ${message}\n`);
    process.exit(1);
};
// Never hang the test: the Rust side has its own timeouts, this is the backstop.
setTimeout(() => fail("timed out"), 120_000).unref();

async function register() {
    const url = `${args.url}/_matrix/client/v3/register`;
    const username = `js${Math.random().toString(36).slice(2, 10)}`;
    const body = { username, password: "js-secret-pass", initial_device_display_name: "matrix-js-sdk peer" };
    let res = await fetch(url, { method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json" } });
    let json = await res.json();
    if (res.status === 401) {
        body.auth = { type: "m.login.dummy", session: json.session };
        res = await fetch(url, { method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json" } });
        json = await res.json();
    }
    if (!res.ok) fail(`register: ${res.status} ${JSON.stringify(json)}`);
    return json;
}

const waitFor = (what, predicate, timeoutMs = 60_000) =>
    new Promise((resolve, reject) => {
        const started = Date.now();
        const tick = async () => {
            try {
                const value = await predicate();
                if (value) return resolve(value);
            } catch (e) {
                return reject(e);
            }
            if (Date.now() - started > timeoutMs) return reject(new Error(`timed out waiting for ${what}`));
            setTimeout(tick, 200);
        };
        tick();
    });

const creds = await register();
const client = createClient({
    baseUrl: args.url,
    userId: creds.user_id,
    accessToken: creds.access_token,
    deviceId: creds.device_id,
    logger,
});
await client.initRustCrypto({ useIndexedDB: false });
client.on(RoomMemberEvent.Membership, (_event, member) => {
    if (member.userId === creds.user_id && member.membership === "invite" && member.roomId === args.room) {
        client.joinRoom(args.room).catch((e) => fail(`join: ${e.message}`));
    }
});
const fromRust = [];
client.on(RoomEvent.Timeline, (event, room) => {
    if (room?.roomId === args.room && event.getSender() === args["rust-user"]) fromRust.push(event);
});
const verificationRequests = [];
client.on(CryptoEvent.VerificationRequestReceived, (request) => verificationRequests.push(request));
await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: false, pollTimeout: 5_000 });
// Our device keys must be on the server before the Rust side queries them.
await waitFor("our device keys on the server", async () => {
    const keys = await client.downloadKeysForUsers([creds.user_id]);
    return keys?.device_keys?.[creds.user_id]?.[creds.device_id];
});
say(`READY ${JSON.stringify({ user_id: creds.user_id, device_id: creds.device_id })}`);

try {
    await waitFor("joining the room", () => client.getRoom(args.room)?.getMyMembership() === "join");
    await waitFor("the room to be encrypted", () => client.getCrypto().isEncryptionEnabledInRoom(args.room));
    say("JOINED");

    const message = await waitFor("a decrypted message from the Rust client", () =>
        fromRust.find((e) => !e.isBeingDecrypted() && !e.isDecryptionFailure() && e.getType() === "m.room.message"),
    );
    if (message.getWireType() !== "m.room.encrypted") fail(`the Rust client's message was not encrypted: ${message.getWireType()}`);
    say(`GOT ${message.getContent().body}`);

    const { event_id: eventId } = await client.sendMessage(args.room, { msgtype: "m.text", body: args.reply });
    say(`SENT ${eventId}`);

    // SAS verification, requested by the Rust client.
    const request = await waitFor("a verification request", () =>
        verificationRequests.find((r) => r.otherUserId === args["rust-user"]),
    );
    await request.accept();
    const verifier = await waitFor("the Rust client to start SAS", () => request.verifier);
    verifier.on(VerifierEvent.ShowSas, (sas) => {
        say(`SAS ${sas.sas.emoji.map(([, name]) => name).join(",")}`);
        sas.confirm().catch((e) => fail(`confirm: ${e.message}`));
    });
    await verifier.verify();
    say("VERIFIED");
} catch (e) {
    fail(e.message);
}

const stdin = createInterface({ input: process.stdin });
for await (const line of stdin) {
    if (line.trim() === "DONE") break;
}
client.stopClient();
process.exit(0);
