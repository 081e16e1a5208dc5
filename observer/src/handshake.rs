//! Recognising the HTTP/1.1 upgrade to WebSocket in the first bytes of a connection.
//!
//! The kernel copies the start of each direction's stream as chunks tagged with their offset;
//! [`Handshake`] reassembles them (segments may split the headers anywhere, arrive twice, or
//! carry the first frame after the headers) and parses each side with `httparse` once its header
//! block is complete. Only the method, the request path, the status code and the negotiated
//! subprotocol and extensions are kept; every other header value is dropped unread.

use observer_common::HEADER_WINDOW;

/// Most header lines accepted in one request or response.
const MAX_HEADERS: usize = 128;

/// The start of one direction's byte stream, reassembled from chunks.
#[derive(Debug, Default)]
struct Stream {
    bytes: Vec<u8>,
    /// A chunk arrived beyond the reassembled end: some bytes were never seen.
    gap: bool,
}

impl Stream {
    fn push(&mut self, offset: u32, data: &[u8]) {
        let offset = offset as usize;
        let have = self.bytes.len();
        if offset > have {
            self.gap = true;
            return;
        }
        let end = offset + data.len();
        if end > have {
            self.bytes.extend_from_slice(&data[have - offset..]);
        }
    }
}

/// What was learnt from a completed upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// Request target, e.g. `/chat?room=1`.
    pub path: String,
    /// `Sec-WebSocket-Protocol` chosen by the server, if any.
    pub subprotocol: Option<String>,
    /// `Sec-WebSocket-Extensions` accepted by the server, if any.
    pub extensions: Option<String>,
}

/// Where the classification of a connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Headers are still incomplete.
    Pending,
    /// A WebSocket upgrade request answered with 101.
    WebSocket(Upgrade),
    /// Anything else, with the reason.
    NotWebSocket(&'static str),
}

/// Parsed request line and headers.
#[derive(Debug)]
struct Request {
    upgrade: bool,
    path: String,
}

/// Reassembles and parses both directions of one connection's start.
#[derive(Debug, Default)]
pub struct Handshake {
    request: Stream,
    response: Stream,
    parsed_request: Option<Request>,
}

impl Handshake {
    /// Adds bytes of the request (client to server) direction.
    pub fn push_request(&mut self, offset: u32, data: &[u8]) {
        self.request.push(offset, data);
    }

    /// Adds bytes of the response (server to client) direction.
    pub fn push_response(&mut self, offset: u32, data: &[u8]) {
        self.response.push(offset, data);
    }

    /// Whether the request asked for a WebSocket upgrade.
    pub fn upgrade_requested(&self) -> bool {
        self.parsed_request.is_some()
    }

    /// Parses what has arrived so far.
    pub fn outcome(&mut self) -> Outcome {
        if self.parsed_request.is_none() {
            match parse_request(&self.request.bytes) {
                Err(reason) => return Outcome::NotWebSocket(reason),
                Ok(None) => {
                    return pending_or(&self.request, "request headers incomplete");
                }
                Ok(Some(request)) => {
                    if !request.upgrade {
                        return Outcome::NotWebSocket("HTTP request without a WebSocket upgrade");
                    }
                    self.parsed_request = Some(request);
                    // The request is all that is needed from that direction.
                    self.request.bytes = Vec::new();
                }
            }
        }
        match parse_response(&self.response.bytes) {
            Err(reason) => Outcome::NotWebSocket(reason),
            Ok(None) => pending_or(&self.response, "response headers incomplete"),
            Ok(Some((101, subprotocol, extensions))) => {
                let path = self.parsed_request.as_ref().map(|r| r.path.clone()).unwrap_or_default();
                Outcome::WebSocket(Upgrade { path, subprotocol, extensions })
            }
            Ok(Some(_)) => Outcome::NotWebSocket("upgrade refused by the server"),
        }
    }
}

/// `Pending`, unless the stream can no longer complete.
fn pending_or(stream: &Stream, what: &'static str) -> Outcome {
    if stream.gap || stream.bytes.len() >= HEADER_WINDOW as usize {
        Outcome::NotWebSocket(what)
    } else {
        Outcome::Pending
    }
}

fn parse_request(bytes: &[u8]) -> Result<Option<Request>, &'static str> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(_)) => {
            let upgrade = request.method == Some("GET")
                && has_token(request.headers, "upgrade", "websocket")
                && has_token(request.headers, "connection", "upgrade");
            let path = request.path.unwrap_or_default().to_owned();
            Ok(Some(Request { upgrade, path }))
        }
        Err(_) => Err("not an HTTP/1.x request"),
    }
}

/// Status code, subprotocol and extensions of a complete response.
type ResponseHead = (u16, Option<String>, Option<String>);

fn parse_response(bytes: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(_)) => {
            let code = response.code.unwrap_or(0);
            let subprotocol = header_value(response.headers, "sec-websocket-protocol");
            let extensions = header_value(response.headers, "sec-websocket-extensions");
            Ok(Some((code, subprotocol, extensions)))
        }
        Err(_) => Err("not an HTTP/1.x response"),
    }
}

/// Whether a comma-separated header (any of its occurrences) lists `token`, ignoring case.
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).any(|h| {
        std::str::from_utf8(h.value)
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn header_value(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    let header = headers.iter().find(|h| h.name.eq_ignore_ascii_case(name))?;
    let value = std::str::from_utf8(header.value).ok()?.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nCookie: session=secret\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
        Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n";

    fn upgrade() -> Upgrade {
        Upgrade {
            path: "/chat?room=1".into(),
            subprotocol: Some("chat".into()),
            extensions: Some("permessage-deflate".into()),
        }
    }

    #[test]
    fn whole_upgrade_is_recognised() {
        let mut h = Handshake::default();
        h.push_request(0, REQUEST);
        assert_eq!(h.outcome(), Outcome::Pending);
        h.push_response(0, RESPONSE);
        assert_eq!(h.outcome(), Outcome::WebSocket(upgrade()));
    }

    #[test]
    fn upgrade_split_one_byte_first_and_resent_is_recognised() {
        let mut h = Handshake::default();
        h.push_request(0, &REQUEST[..1]);
        assert_eq!(h.outcome(), Outcome::Pending);
        h.push_request(1, &REQUEST[1..40]);
        h.push_request(1, &REQUEST[1..20]); // a retransmission
        h.push_request(40, &REQUEST[40..]);
        for (i, byte) in RESPONSE.iter().enumerate() {
            assert_eq!(h.outcome(), Outcome::Pending);
            h.push_response(i as u32, std::slice::from_ref(byte));
        }
        assert_eq!(h.outcome(), Outcome::WebSocket(upgrade()));
    }

    #[test]
    fn first_frame_after_the_headers_does_not_disturb_parsing() {
        let mut h = Handshake::default();
        let mut request = REQUEST.to_vec();
        request.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o']);
        h.push_request(0, &request);
        let mut response = RESPONSE.to_vec();
        response.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        h.push_response(0, &response);
        assert_eq!(h.outcome(), Outcome::WebSocket(upgrade()));
    }

    #[test]
    fn plain_get_is_not_websocket() {
        let mut h = Handshake::default();
        h.push_request(0, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(h.outcome(), Outcome::NotWebSocket(_)));
    }

    #[test]
    fn refused_upgrade_is_not_websocket() {
        let mut h = Handshake::default();
        h.push_request(0, REQUEST);
        h.push_response(0, b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.outcome(), Outcome::NotWebSocket("upgrade refused by the server"));
    }

    #[test]
    fn garbage_and_gaps_are_not_websocket() {
        let mut h = Handshake::default();
        h.push_request(0, b"G\x00\x01 binary");
        assert!(matches!(h.outcome(), Outcome::NotWebSocket(_)));

        let mut h = Handshake::default();
        h.push_request(0, &REQUEST[..10]);
        h.push_request(20, &REQUEST[20..]);
        assert!(matches!(h.outcome(), Outcome::NotWebSocket(_)));
    }

    #[test]
    fn headers_larger_than_the_window_give_up() {
        let mut h = Handshake::default();
        let mut request = b"GET / HTTP/1.1\r\nCookie: ".to_vec();
        request.resize(HEADER_WINDOW as usize, b'a');
        h.push_request(0, &request);
        assert!(matches!(h.outcome(), Outcome::NotWebSocket(_)));
    }

    #[test]
    fn large_cookie_within_the_window_is_fine() {
        let mut h = Handshake::default();
        let cookie = "a".repeat(8 * 1024);
        let request = format!(
            "GET /big HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nCookie: {cookie}\r\n\r\n"
        );
        for (i, chunk) in request.as_bytes().chunks(512).enumerate() {
            h.push_request((i * 512) as u32, chunk);
        }
        h.push_response(0, b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(
            h.outcome(),
            Outcome::WebSocket(Upgrade { path: "/big".into(), ..Upgrade::default() })
        );
    }
}
