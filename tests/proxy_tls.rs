//! TLS on both sides: h2 via ALPN to the client, https upstream verified against a configured CA.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/localhost.crt");
const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ca.crt");
const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/localhost.key");

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS upstream (h2 and http/1.1 via ALPN) answering with the protocol version it saw.
async fn tls_upstream() -> std::net::SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(CERT)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(KEY).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(full(
                            200,
                            "text/plain",
                            format!("upstream saw {:?}", req.version()),
                        ))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tls_listener_negotiates_h2_and_https_upstream_is_verified() {
    let up = tls_upstream().await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = {CERT:?}, key = {KEY:?} }}\n\
         [pools.up]\nendpoints = [\"https://localhost:{}\"]\nca_file = {CA:?}\n[[routes]]\npool = \"up\"\n",
        up.port()
    );
    let proxy = Proxy::start(&toml).await;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(CA).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .build();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, Full<Bytes>>(https);
    let resp = within(
        "https request",
        client.request(
            Request::get(format!("https://localhost:{}/v1/models", proxy.addr.port()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.version(),
        http::Version::HTTP_2,
        "ALPN picks h2 on the TLS listener"
    );
    assert_eq!(resp.status(), 200);
    // The upstream was reached over TLS and, with protocol = auto, ALPN chose h2 there too.
    assert_eq!(body_string(resp).await, "upstream saw HTTP/2.0");
}

#[tokio::test]
async fn https_upstream_with_untrusted_certificate_is_502() {
    let up = tls_upstream().await;
    // No ca_file: the self-signed certificate is not trusted.
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.up]\nendpoints = [\"https://localhost:{}\"]\n[[routes]]\npool = \"up\"\n",
        up.port()
    );
    let proxy = Proxy::start(&toml).await;
    let resp = within(
        "request",
        client(false).request(
            Request::get(format!("http://{}/", proxy.addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    let body = body_string(resp).await;
    assert!(body.contains("upstream_unreachable"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("certificate"),
        "the reason names the certificate: {body}"
    );
}
