//! A WebSocket server on tokio-tungstenite whose handler never polls its stream, for observer's
//! tests.
//!
//! ```text
//! tungstenite-peer PORT
//! ```
//!
//! Listens on 127.0.0.1:PORT and prints `ready`, then completes each handshake, prints
//! `upgraded` and never polls that stream again, as a handler blocked elsewhere would.
//! tungstenite answers a ping only while the stream is read, so the peer's pings wait
//! unanswered in the receive queue.

use std::io::Write as _;

use tokio::net::TcpListener;

fn say(word: &str) {
    let mut out = std::io::stdout().lock();
    // The test reads these lines to know where the peer is; a closed stdout only loses them.
    let _ = writeln!(out, "{word}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: Option<u16> = std::env::args().nth(1).and_then(|p| p.parse().ok());
    let Some(port) = port else {
        eprintln!("usage: tungstenite-peer PORT");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {error}");
            std::process::exit(1);
        }
    };
    say("ready");
    let mut held = Vec::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        match tokio_tungstenite::accept_async(tcp).await {
            Ok(ws) => {
                say("upgraded");
                held.push(ws);
            }
            Err(error) => eprintln!("handshake failed: {error}"),
        }
    }
}
