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
    /// `None` until the first refresh: every endpoint answers 503 until then.
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// The agent is unhealthy when no refresh happened for this long.
    stale_after: Duration,
}

impl Shared {
    pub fn new(refresh: Duration) -> Self {
        Self { snapshot: RwLock::new(None), stale_after: refresh * 3 + Duration::from_secs(1) }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snapshot));
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The answer of every endpoint before the first refresh.
fn starting() -> axum::response::Response {
    (StatusCode::SERVICE_UNAVAILABLE, "starting: no refresh yet\n").into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/connections", get(connections))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let Some(snapshot) = shared.current() else {
        return starting();
    };
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")];
    (content_type, snapshot.metrics.clone()).into_response()
}

async fn connections(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let Some(snapshot) = shared.current() else {
        return starting();
    };
    let mut connections: Vec<&ConnectionView> = snapshot.connections.iter().collect();
    connections.sort_by(|a, b| ConnectionView::worst_first(a, b));
    Json(connections).into_response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let Some(snapshot) = shared.current() else {
        return starting();
    };
    let age = snapshot.taken.elapsed();
    if age <= shared.stale_after {
        (StatusCode::OK, "ok\n".to_owned()).into_response()
    } else {
        let message = format!("last refresh {:.1}s ago\n", age.as_secs_f64());
        (StatusCode::SERVICE_UNAVAILABLE, message).into_response()
    }
}
