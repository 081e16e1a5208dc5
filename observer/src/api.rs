//! The HTTP endpoint: `/metrics`, `/connections`, `/healthz`.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::conntrack::ConnectionView;

/// What the refresh loop publishes for the endpoint.
#[derive(Debug)]
pub struct Snapshot {
    pub connections: Vec<ConnectionView>,
    pub metrics: String,
    pub taken: Instant,
}

/// State shared between the refresh loop and the handlers.
#[derive(Debug)]
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    /// The agent is unhealthy when no refresh happened for this long.
    stale_after: Duration,
}

impl Shared {
    pub fn new(refresh: Duration) -> Self {
        let empty =
            Snapshot { connections: Vec::new(), metrics: String::new(), taken: Instant::now() };
        Self {
            snapshot: RwLock::new(Arc::new(empty)),
            stale_after: refresh * 3 + Duration::from_secs(1),
        }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/connections", get(connections))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let snapshot = shared.current();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], snapshot.metrics.clone())
}

async fn connections(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.current().connections.clone())
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let age = shared.current().taken.elapsed();
    if age <= shared.stale_after {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("last refresh {:.1}s ago\n", age.as_secs_f64()))
    }
}
