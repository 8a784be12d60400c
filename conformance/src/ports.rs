//! Loopback ports for the listeners tests must know in advance (a federating server's
//! federation port is part of its server name, so a restarted server binds the same one).
//!
//! Why not "bind port 0, read the port, let it go": the kernel hands ports out of the
//! ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 here) to every
//! `bind(0)` and outgoing connection on the machine, so between a server's stop and its
//! restart another test's listener or client could take the port ("Address already in use").
//! These ports come from below that range, where the kernel never picks, and each is
//! reserved across processes (nextest runs every test in its own process, and several test
//! runs may share the machine) with a lock file held until this process exits.

use std::{
    fs::{File, OpenOptions},
    net::TcpListener,
    path::PathBuf,
    sync::Mutex,
};

/// Below the kernel's default ephemeral range, above the well-known and common service ports.
const FIRST: u16 = 20_000;
const LAST: u16 = 32_000;

/// Locks held for this process's lifetime: a reserved port stays ours until the test ends.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("obmin-conformance-ports");
    std::fs::create_dir_all(&dir).expect("create the port lock directory");
    dir
}

/// A loopback port nothing listens on, reserved for this process until it exits.
pub fn free_port() -> u16 {
    let dir = lock_dir();
    let span = u32::from(LAST - FIRST);
    // Start somewhere different in each process so concurrent tests rarely contend.
    let start = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos()) % span;
    for i in 0..span {
        let port = FIRST + ((start + i) % span) as u16;
        let Ok(file) =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // another process holds it
        }
        // Reserved against other test processes; also free of anything else on the machine?
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
        return port;
    }
    panic!("no free port in {FIRST}..{LAST}");
}

fn nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_outside_the_ephemeral_range_and_bindable() {
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "each reservation is a new port: {ports:?}");
        for port in ports {
            assert!((FIRST..LAST).contains(&port));
            TcpListener::bind(("127.0.0.1", port)).expect("a reserved port is free to bind");
        }
    }
}
