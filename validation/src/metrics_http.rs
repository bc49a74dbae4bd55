//! `--metrics-addr`: the governor's Prometheus text over HTTP on a loopback address, served
//! with `tiny_http`.

use std::net::SocketAddr;

use nodedb_mem::MemoryGovernor;
use tiny_http::{Header, Method, Response, Server};

/// Binds `addr` (loopback only) and serves `GET /metrics` from a background thread for the
/// rest of the process. Returns the bound address (useful with port 0).
pub(crate) fn serve(addr: SocketAddr, gov: &'static MemoryGovernor) -> Result<SocketAddr, String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--metrics-addr {addr}: only loopback addresses (127.0.0.1, [::1]) are served"
        ));
    }
    let server = Server::http(addr).map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("--metrics-addr {addr}: not bound to an IP address"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            // One scrape at a time is plenty for a scraper and curl.
            for request in server.incoming_requests() {
                let (status, body, kind) = match (request.method(), request.url()) {
                    (Method::Get, "/metrics" | "/") => (
                        200,
                        gov.prometheus(),
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                    (Method::Get, _) => (
                        404,
                        "only /metrics is served\n".to_owned(),
                        "text/plain; charset=utf-8",
                    ),
                    _ => (
                        405,
                        "only GET is served\n".to_owned(),
                        "text/plain; charset=utf-8",
                    ),
                };
                let mut response = Response::from_string(body).with_status_code(status);
                if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], kind.as_bytes()) {
                    response = response.with_header(h);
                }
                // A client that went away is not the server's problem.
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("starting the metrics thread: {e}"))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    fn governor() -> &'static nodedb_mem::MemoryGovernor {
        Box::leak(Box::new(
            nodedb_mem::MemoryGovernor::builder()
                .global_ceiling(1 << 30)
                .build()
                .expect("a governor"),
        ))
    }

    #[test]
    fn non_loopback_addresses_are_refused_before_binding() {
        let gov = governor();
        let err = super::serve("0.0.0.0:0".parse().expect("an address"), gov).unwrap_err();
        assert_eq!(
            err,
            "--metrics-addr 0.0.0.0:0: only loopback addresses (127.0.0.1, [::1]) are served"
        );
    }

    #[test]
    fn a_scrape_gets_the_prometheus_text() {
        use std::io::{Read, Write};
        let gov = governor();
        let addr = super::serve("127.0.0.1:0".parse().expect("an address"), gov).expect("binds");
        let mut s = std::net::TcpStream::connect(addr).expect("connects");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("writes");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reads");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{text}"
        );
        assert!(
            text.contains("nodedb_mem_ceiling_bytes 1073741824"),
            "{text}"
        );
        let mut s = std::net::TcpStream::connect(addr).expect("connects");
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("writes");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reads");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        let mut s = std::net::TcpStream::connect(addr).expect("connects");
        s.write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .expect("writes");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reads");
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
    }
}
