//! `--metrics-addr`: the governor's Prometheus text over HTTP on a loopback address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use nodedb_mem::MemoryGovernor;

/// Binds `addr` (loopback only) and serves `GET /metrics` from a background thread for the
/// rest of the process. Returns the bound address (useful with port 0).
pub(crate) fn serve(addr: SocketAddr, gov: &'static MemoryGovernor) -> Result<SocketAddr, String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--metrics-addr {addr}: only loopback addresses (127.0.0.1, [::1]) are served"
        ));
    }
    let listener = TcpListener::bind(addr).map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One scrape at a time is plenty for a scraper and curl.
                let _ = answer(stream, gov);
            }
        })
        .map_err(|e| format!("starting the metrics thread: {e}"))?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, gov: &MemoryGovernor) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body, kind) = match (method, path) {
        (b"GET", b"/metrics" | b"/") => (
            "200 OK",
            gov.prometheus(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (b"GET", _) => (
            "404 Not Found",
            "only /metrics is served\n".to_owned(),
            "text/plain; charset=utf-8",
        ),
        _ => (
            "405 Method Not Allowed",
            "only GET is served\n".to_owned(),
            "text/plain; charset=utf-8",
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
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
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("writes");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reads");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("nodedb_mem_ceiling_bytes 1073741824"),
            "{text}"
        );
        let mut s = std::net::TcpStream::connect(addr).expect("connects");
        s.write_all(b"GET /x HTTP/1.1\r\n\r\n").expect("writes");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reads");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
    }
}
