//! axum on Floodgate (feature `axum`): `axum::serve` over the tokio
//! listeners answers real HTTP/1.1 requests, written by hand on a std
//! `TcpStream` and parsed here.

use std::io::{Read, Write};
use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use floodgate::tokio::{DrivenListener, TcpListener};
use floodgate::Listener;
use floodgate_tests::{connect, serial, wait_for, FdTable};

fn addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("loopback")
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello from floodgate\n" }))
}

/// One GET on a new connection; the status line and the body.
fn get_root(addr: SocketAddr) -> (String, String) {
    let mut s = connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("bound");
    s.write_all(b"GET / HTTP/1.1\r\nHost: floodgate\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

#[test]
fn axum_on_the_threaded_listener_answers_http_requests() {
    let _serial = serial();
    let fds = FdTable::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let requests = 50;
    let stats = rt.block_on(async {
        let listener = TcpListener::from_builder(Listener::builder(addr()).shards(2).pin(false))
            .expect("listener");
        let local = listener.local_addr();
        let engine = listener.listener().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app())
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        let answers = tokio::task::spawn_blocking(move || {
            (0..requests).map(|_| get_root(local)).collect::<Vec<_>>()
        })
        .await
        .expect("client");
        for (status, body) in &answers {
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert_eq!(body, "hello from floodgate\n");
        }
        let _ = stop.send(());
        server.await.expect("server task").expect("serve");
        // The listener went down with serve's end.
        engine.shutdown();
        engine.stats()
    });
    drop(rt);
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(stats.total().delivered, requests);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn axum_on_a_driven_shard_answers_http_requests() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, mut shards) = Listener::builder(addr())
        .shards(1)
        .nonblocking(true)
        .build_driven()
        .expect("build driven");
    let shard = shards.pop().expect("one shard");
    let local = listener.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let driven = DrivenListener::new(shard).expect("driven listener");
            assert_eq!(
                axum::serve::Listener::local_addr(&driven).expect("addr"),
                local
            );
            axum::serve(driven, app())
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        })
    });
    let requests = 20;
    for _ in 0..requests {
        let (status, body) = get_root(local);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "hello from floodgate\n");
    }
    wait_for("every request delivered", || {
        listener.stats().total().delivered == requests
    });
    let _ = stop.send(());
    server.join().expect("server thread").expect("serve");
    listener.shutdown();
    let stats = listener.stats();
    assert!(stats.conserved(), "{stats:?}");
    drop(listener);
    fds.assert_back("fd table back to baseline");
}
