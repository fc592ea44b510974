//! `flood serve --metrics ADDR`: the listener's stats as Prometheus text
//! (`GET /metrics`), written by the engine's [`ListenerCollector`] at each
//! scrape and served by axum on a thread of its own (a current-thread
//! tokio runtime, not on a shard's core).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use floodgate::metrics::ListenerCollector;
use floodgate::Listener;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

/// The running metrics endpoint; [`MetricsServer::stop`] ends it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (so that a taken port is refused here, before serving)
    /// and serves `GET /metrics` for `listener` from a thread of its own.
    pub fn start(addr: SocketAddr, listener: Arc<Listener>) -> Result<MetricsServer, String> {
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen on {addr} for --metrics: {e}"))?;
        let local = bound
            .local_addr()
            .map_err(|e| format!("--metrics {addr}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| format!("cannot start the --metrics runtime: {e}"))?;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ListenerCollector::new(listener)));
        let app = Router::new()
            .route("/metrics", get(scrape))
            .with_state(Arc::new(registry));
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("flood-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let served = match tokio::net::TcpListener::from_std(bound) {
                        Ok(l) => {
                            axum::serve(l, app)
                                .with_graceful_shutdown(async move {
                                    let _ = stopped.await;
                                })
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = served {
                        crate::emit_err(&format!("flood serve: --metrics {local}: {e}"));
                    }
                });
            })
            .map_err(|e| format!("cannot start the --metrics thread: {e}"))?;
        Ok(MetricsServer {
            addr: local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it serves on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (a scrape under way is answered first) and waits for
    /// the thread.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET /metrics`: the Prometheus text format (0.0.4) of the registry.
async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    let mut body = String::new();
    match prometheus_text::encode(&mut body, &registry) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        )
            .into_response(),
    }
}
