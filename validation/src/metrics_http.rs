//! `--metrics-addr`: the governor's Prometheus text over HTTP on a loopback address, served
//! with `tiny_http`, and heap profiles per engine at `/debug/pprof/heap?engine=query` (pprof;
//! `&format=folded` or `&format=svg` for folded stacks or a flame graph; every engine without
//! `engine=`), as `go tool pprof http://ADDR/debug/pprof/heap?engine=query` reads them.

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
                let url = request.url().to_owned();
                let (path, query) = url.split_once('?').unwrap_or((&url, ""));
                let (status, body, kind): (u16, Vec<u8>, &str) = match (request.method(), path) {
                    (Method::Get, "/metrics" | "/") => (
                        200,
                        gov.prometheus().into_bytes(),
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                    (Method::Get, "/debug/pprof/heap") => heap(gov, query),
                    (Method::Get, _) => (
                        404,
                        b"only /metrics and /debug/pprof/heap are served\n".to_vec(),
                        "text/plain; charset=utf-8",
                    ),
                    _ => (
                        405,
                        b"only GET is served\n".to_vec(),
                        "text/plain; charset=utf-8",
                    ),
                };
                let mut response = Response::from_data(body).with_status_code(status);
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

/// `/debug/pprof/heap`: the profile of `engine=NAME` (every engine without it) as pprof,
/// folded stacks (`format=folded`) or a flame graph (`format=svg`).
fn heap(gov: &MemoryGovernor, query: &str) -> (u16, Vec<u8>, &'static str) {
    let text = "text/plain; charset=utf-8";
    let mut engine = None;
    let mut format = "pprof";
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("engine", name)) => match name.parse::<nodedb_mem::EngineId>() {
                Ok(e) => engine = Some(e),
                Err(e) => return (400, format!("engine={name}: {e}\n").into_bytes(), text),
            },
            Some(("format", f @ ("pprof" | "folded" | "svg"))) => format = f,
            _ => {
                return (
                    400,
                    format!("{pair}: expected engine=NAME or format=pprof|folded|svg\n")
                        .into_bytes(),
                    text,
                );
            }
        }
    }
    let profile = gov.heap_profile(engine);
    match format {
        "folded" => (200, profile.to_folded().into_bytes(), text),
        "svg" => match profile.to_flamegraph_svg() {
            Ok(svg) => (200, svg, "image/svg+xml"),
            Err(e) => (500, format!("flame graph: {e}\n").into_bytes(), text),
        },
        _ => (200, profile.to_pprof(), "application/octet-stream"),
    }
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
        let get = |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).expect("connects");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .expect("writes");
            let mut bytes = Vec::new();
            s.read_to_end(&mut bytes).expect("reads");
            bytes
        };
        let pprof = get("/debug/pprof/heap?engine=query");
        let text = String::from_utf8_lossy(&pprof);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: application/octet-stream\r\n"),
            "{text}"
        );
        // The body is gzip.
        let body = pprof
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a body")
            + 4;
        assert_eq!(&pprof[body..body + 2], &[0x1f, 0x8b]);
        let bad = get("/debug/pprof/heap?engine=nosuch");
        let text = String::from_utf8_lossy(&bad);
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("engine=nosuch: "), "{text}");
        let svg = get("/debug/pprof/heap?format=svg");
        let text = String::from_utf8_lossy(&svg);
        assert!(text.contains("Content-Type: image/svg+xml\r\n"), "{text}");
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
