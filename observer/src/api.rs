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

use tokio::sync::{mpsc, oneshot};

use crate::conntrack::ConnectionView;

/// What the refresh loop publishes for the endpoint at every refresh.
#[derive(Debug)]
pub struct Snapshot {
    pub metrics: String,
    pub taken: Instant,
}

/// A request for the connection ends, answered by the refresh loop with a refresh made for it:
/// the ends' views are built only when asked for.
pub type ViewRequest = oneshot::Sender<Vec<ConnectionView>>;

/// State shared between the refresh loop and the handlers.
#[derive(Debug)]
pub struct Shared {
    /// `None` until the first refresh: every endpoint answers 503 until then.
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// The agent is unhealthy when no refresh happened for this long.
    stale_after: Duration,
    views: mpsc::Sender<ViewRequest>,
}

impl Shared {
    pub fn new(refresh: Duration, views: mpsc::Sender<ViewRequest>) -> Self {
        let stale_after = refresh * 3 + Duration::from_secs(1);
        Self { snapshot: RwLock::new(None), stale_after, views }
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
    if shared.current().is_none() {
        return starting();
    }
    let (reply, answer) = oneshot::channel();
    let answer = match shared.views.send(reply).await {
        Ok(()) => answer.await.ok(),
        Err(_) => None,
    };
    let Some(mut connections) = answer else {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    };
    connections.sort_by(ConnectionView::worst_first);
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
