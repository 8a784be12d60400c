//! Listener limits against clients that hold connections without finishing their requests
//! (slowloris) or open too many: each attacker is cut off while others are served.

use std::{net::SocketAddr, time::Duration};

use conformance::{Backend, Server, ServerOptions, backend_tests};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

backend_tests!(
    slow_headers_are_cut_off_while_others_are_served,
    a_stalled_body_is_cut_off,
    one_address_cannot_hold_every_connection
);

/// The server's client listener address.
fn address(server: &Server) -> SocketAddr {
    server.base_url.trim_start_matches("http://").parse().expect("base URL is http://IP:PORT")
}

/// Waits (at most `within`) for the server to close `stream`: a read returns end-of-file or
/// an error. Whatever the server answered before closing is returned.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

async fn slow_headers_are_cut_off_while_others_are_served(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_HTTP_HEADER_TIMEOUT_SECS", "2").start().await;
    let addr = address(&server);
    // Ten connections that start a request and never finish its headers, and one that
    // trickles a header byte every 300 ms (each byte would reset a per-read timeout).
    let mut silent = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
        silent.push(stream);
    }
    let mut trickle = TcpStream::connect(addr).await.unwrap();
    trickle.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\n").await.unwrap();
    let trickler = tokio::spawn(async move {
        for byte in b"X-Slow: ".iter().cycle().take(200) {
            if trickle.write_all(&[*byte]).await.is_err() {
                // The server closed the connection: what we wanted.
                return true;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        false
    });
    // Meanwhile a well-behaved client is answered.
    let versions = server.get("/_matrix/client/versions", None).await;
    versions.assert_ok();
    for stream in &mut silent {
        let answer = closed_by_server(stream, Duration::from_secs(30)).await;
        assert!(answer.is_some(), "a connection that never finished its headers is still open");
    }
    assert!(trickler.await.unwrap(), "a connection trickling its headers was never closed");
    // A kept-alive connection that goes quiet after a request is closed the same way.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let answer = closed_by_server(&mut idle, Duration::from_secs(30)).await.expect("an idle connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "the request itself was answered: {answer}");
    server.get("/_matrix/client/versions", None).await.assert_ok();
}

async fn a_stalled_body_is_cut_off(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_HTTP_BODY_TIMEOUT_SECS", "2").start().await;
    let addr = address(&server);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A login whose body announces 1000 bytes and sends 20.
    stream
        .write_all(
            b"POST /_matrix/client/v3/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"type\": \"m.login.pa",
        )
        .await
        .unwrap();
    let answer = closed_by_server(&mut stream, Duration::from_secs(30)).await.expect("a stalled body is cut off");
    // Whatever was answered, it was not a success and not a server error.
    if let Some(status) = answer.strip_prefix("HTTP/1.1 ") {
        assert!(status.starts_with('4'), "{answer}");
    }
    server.get("/_matrix/client/versions", None).await.assert_ok();
}

async fn one_address_cannot_hold_every_connection(backend: Backend) {
    let server = ServerOptions::new(backend)
        .env("OBMIN_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "5")
        // Nothing exempt: the attacker comes from 127.0.0.2, this test's client from 127.0.0.1.
        .env("OBMIN_HTTP_CONNECTION_LIMIT_EXEMPT", "")
        .start()
        .await;
    let addr = address(&server);
    let connect_from = |source: &str| {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr)
    };
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from("127.0.0.2").await.unwrap());
    }
    // Each of the five is served.
    for stream in &mut held {
        stream.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    // The sixth is closed at once, without an answer.
    let mut sixth = connect_from("127.0.0.2").await.unwrap();
    let _ = sixth.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let answer = closed_by_server(&mut sixth, Duration::from_secs(30)).await.expect("the sixth connection is closed");
    assert!(answer.is_empty(), "the sixth connection was served: {answer}");
    // Another address is served meanwhile.
    server.get("/_matrix/client/versions", None).await.assert_ok();
    // Once one of the five goes, the address may connect again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut stream = connect_from("127.0.0.2").await.unwrap();
        stream.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        if stream.read_exact(&mut buf).await.is_ok() {
            again = Some(buf);
            break;
        }
        // The server may not have seen the close yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again.as_ref().map(|b| &b[..]), Some(&b"HTTP/1.1 200"[..]));
}
