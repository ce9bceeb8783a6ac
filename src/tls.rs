//! TLS with rustls (ring provider): the acceptor clients reach with `sslmode=require` /
//! `verify-full`, the connector towards PostgreSQL (`server_tls`), and socket halves that
//! are plain or encrypted behind one type, so the relay code does not care which.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::config::ServerTls;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// What pgsplit serves clients TLS with.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    /// The `tls-server-end-point` channel binding data of the certificate (RFC 5929: its
    /// hash with its signature's hash function, SHA-256 for MD5 and SHA-1), for
    /// SCRAM-SHA-256-PLUS (RSA-PSS: the hash in its parameters); None for a signature with
    /// no such hash (Ed25519: PostgreSQL offers no binding either) or one ring lacks
    /// (SHA-224, SHA-3: PostgreSQL would bind those).
    pub end_point: Option<Vec<u8>>,
}

/// RFC 5929's `tls-server-end-point` data of a DER certificate.
fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    // A DER element at the start of `b`: (tag, header length, content length).
    fn element(b: &[u8]) -> Option<(u8, usize, usize)> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        if first < 0x80 {
            return Some((tag, 2, first as usize));
        }
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &d| (l << 8) | d as usize);
        Some((tag, 2 + n, len))
    }
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (0x30, header, _) = element(cert)? else {
        return None;
    };
    let body = cert.get(header..)?;
    let (_, tbs_header, tbs_len) = element(body)?;
    let algorithm = body.get(tbs_header + tbs_len..)?;
    let (0x30, alg_header, _) = element(algorithm)? else {
        return None;
    };
    let oid_element = algorithm.get(alg_header..)?;
    let (0x06, oid_header, oid_len) = element(oid_element)? else {
        return None;
    };
    let oid = oid_element.get(oid_header..oid_header + oid_len)?;
    const RSA: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: [u8; 7] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: [u8; 7] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const HASH: [u8; 8] = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
    if let [r @ .., 0x0a] = oid
        && *r == RSA
    {
        // RSASSA-PSS: the hash is a parameter, `[0] hashAlgorithm` (SHA-1 when absent).
        let params = oid_element.get(oid_header + oid_len..)?;
        let (0x30, params_header, _) = element(params)? else {
            return None;
        };
        let hash_oid = match element(params.get(params_header..)?)? {
            (0xa0, explicit_header, _) => {
                let alg = params.get(params_header + explicit_header..)?;
                let (0x30, alg_header, _) = element(alg)? else {
                    return None;
                };
                let (0x06, h, len) = element(alg.get(alg_header..)?)? else {
                    return None;
                };
                alg.get(alg_header + h..alg_header + h + len)?
            }
            _ => &[0x2b, 0x0e, 0x03, 0x02, 0x1a][..],
        };
        let hash = match hash_oid {
            [0x2b, 0x0e, 0x03, 0x02, 0x1a] => &::ring::digest::SHA256,
            [h @ .., 0x01] if *h == HASH => &::ring::digest::SHA256,
            [h @ .., 0x02] if *h == HASH => &::ring::digest::SHA384,
            [h @ .., 0x03] if *h == HASH => &::ring::digest::SHA512,
            _ => return None,
        };
        return Some(::ring::digest::digest(hash, cert).as_ref().to_vec());
    }
    let hash = match oid {
        // md5, sha1, sha256 WithRSAEncryption; ecdsa-with-SHA1, -SHA256
        [r @ .., 0x04 | 0x05 | 0x0b] if *r == RSA => &::ring::digest::SHA256,
        o if o == ECDSA_SHA1 => &::ring::digest::SHA256,
        [e @ .., 0x02] if *e == ECDSA_SHA2 => &::ring::digest::SHA256,
        [r @ .., 0x0c] if *r == RSA => &::ring::digest::SHA384,
        [e @ .., 0x03] if *e == ECDSA_SHA2 => &::ring::digest::SHA384,
        [r @ .., 0x0d] if *r == RSA => &::ring::digest::SHA512,
        [e @ .., 0x04] if *e == ECDSA_SHA2 => &::ring::digest::SHA512,
        _ => return None,
    };
    Some(::ring::digest::digest(hash, cert).as_ref().to_vec())
}

/// The acceptor for a PEM certificate chain and private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<ClientTls, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("proxy.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("proxy.tls_cert {}: no certificate", cert.display()));
    }
    let end_point = end_point(certs[0].as_ref());
    if end_point.is_none() {
        tracing::warn!(
            cert = %cert.display(),
            "the certificate's signature names no hash for channel binding (Ed25519?): SCRAM-SHA-256-PLUS is not offered, and clients with channel_binding=require cannot log in"
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("proxy.tls_key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("proxy.tls_cert / tls_key: {e}"))?;
    Ok(ClientTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        end_point,
    })
}

/// How pgsplit talks TLS to PostgreSQL.
#[derive(Clone)]
pub struct ServerTlsPolicy {
    pub mode: ServerTls,
    connector: Option<TlsConnector>,
    /// The roots trusted (`verify-full`), DER bytes: a reload that changes the CA file's
    /// content, at the same path, must not keep connections pooled under the old roots.
    pub roots: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ServerTlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTlsPolicy({:?})", self.mode)
    }
}

impl ServerTlsPolicy {
    pub fn disabled() -> ServerTlsPolicy {
        ServerTlsPolicy {
            mode: ServerTls::Disable,
            connector: None,
            roots: Vec::new(),
        }
    }

    /// `verify-ca` and `verify-full` need `ca` (the PEM roots the servers' certificates
    /// chain to); `prefer` and `require` encrypt without checking the certificate, as libpq
    /// does, except that `require` with a `ca` checks the chain (libpq's `require` with a
    /// root certificate file is `verify-ca`).
    pub fn new(mode: ServerTls, ca: Option<&Path>) -> Result<ServerTlsPolicy, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut trusted = Vec::new();
        let mode = match (mode, ca) {
            (ServerTls::Require, Some(_)) => ServerTls::VerifyCa,
            _ => mode,
        };
        let config = match mode {
            ServerTls::Disable => return Ok(ServerTlsPolicy::disabled()),
            ServerTls::VerifyCa | ServerTls::VerifyFull => {
                let ca =
                    ca.ok_or("server_tls = \"verify-ca\" / \"verify-full\" need server_tls_ca")?;
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("proxy.server_tls_ca {}: {e}", ca.display()))?;
                for c in certs {
                    trusted.push(c.as_ref().to_vec());
                    roots
                        .add(c)
                        .map_err(|e| format!("proxy.server_tls_ca {}: {e}", ca.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "proxy.server_tls_ca {}: no certificate",
                        ca.display()
                    ));
                }
                if mode == ServerTls::VerifyFull {
                    builder.with_root_certificates(roots).with_no_client_auth()
                } else {
                    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider(),
                    )
                    .build()
                    .map_err(|e| format!("proxy.server_tls_ca {}: {e}", ca.display()))?;
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(WithoutName {
                            provider: provider(),
                            chain: Some(chain),
                        }))
                        .with_no_client_auth()
                }
            }
            ServerTls::Prefer | ServerTls::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(WithoutName {
                    provider: provider(),
                    chain: None,
                }))
                .with_no_client_auth(),
        };
        Ok(ServerTlsPolicy {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            roots: trusted,
        })
    }

    /// Encrypt `stream` to `host` (after the server answered 'S' to SSLRequest).
    pub async fn connect(&self, host: &str, stream: TcpStream) -> io::Result<(Reader, Writer)> {
        let connector = self
            .connector
            .as_ref()
            .ok_or_else(|| io::Error::other("TLS towards servers is disabled"))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = connector.connect(name, stream).await?;
        Ok(split_tls(TlsStream::Client(tls)))
    }
}

/// The certificate check of `require` (`chain` None: encryption against passive
/// eavesdroppers, no identity check) and of `verify-ca` (the certificate must chain to the
/// trusted roots, whatever host name it holds: servers reached by an address their
/// certificate does not name).
#[derive(Debug)]
struct WithoutName {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for WithoutName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name: a name mismatch means the chain held.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The reading half of a socket, plain or TLS.
pub enum Reader {
    Plain(OwnedReadHalf),
    /// A server's Unix-domain socket (`host = "/run/postgresql"`).
    Unix(tokio::net::unix::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
    /// Between taking the halves apart and putting them back (a TLS upgrade).
    Detached,
}

/// The writing half of a socket, plain or TLS.
pub enum Writer {
    Plain(OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
    Detached,
}

impl Writer {
    /// Let go of the socket without a shutdown(2) of its own: a socket half's drop would
    /// make one, and closing the socket when its reader goes sends the FIN anyway. One
    /// system call less per connection.
    pub fn let_go(&mut self) {
        match std::mem::replace(self, Writer::Detached) {
            Writer::Plain(w) => w.forget(),
            Writer::Unix(w) => w.forget(),
            Writer::Tls(_) | Writer::Detached => {}
        }
    }
}

pub fn split_plain(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Reader::Plain(r), Writer::Plain(w))
}

pub fn split_unix(stream: tokio::net::UnixStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Reader::Unix(r), Writer::Unix(w))
}

pub fn split_tls(stream: TlsStream<TcpStream>) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Reader::Tls(r), Writer::Tls(w))
}

/// The plain socket back from its halves, for a TLS handshake on it.
pub fn reunite(r: Reader, w: Writer) -> io::Result<TcpStream> {
    match (r, w) {
        (Reader::Plain(r), Writer::Plain(w)) => r
            .reunite(w)
            .map_err(|_| io::Error::other("socket halves do not match")),
        _ => Err(io::Error::other("the connection is already encrypted")),
    }
}

/// Accept a client's TLS handshake on `stream`.
pub async fn accept(acceptor: &TlsAcceptor, stream: TcpStream) -> io::Result<(Reader, Writer)> {
    let tls = acceptor.accept(stream).await?;
    Ok(split_tls(TlsStream::Server(tls)))
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket detached")
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Reader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Unix(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Unix(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Tls(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Writer::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Writer::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Writer::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Writer::Plain(w) => w.is_write_vectored(),
            Writer::Unix(w) => w.is_write_vectored(),
            Writer::Tls(w) => w.is_write_vectored(),
            Writer::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_flush(cx),
            Writer::Unix(w) => Pin::new(w).poll_flush(cx),
            Writer::Tls(w) => Pin::new(w).poll_flush(cx),
            Writer::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Unix(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Tls(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Detached => Poll::Ready(Ok(())),
        }
    }
}

impl Writer {
    /// A write that does not wait, on a plain socket: how much it took (`None`: nothing, it
    /// would block or failed, or the writer is TLS; the caller then writes the usual way,
    /// which meets the same error).
    pub fn try_write_plain(&mut self, buf: &[u8]) -> Option<usize> {
        let n = match self {
            Writer::Plain(w) => w.try_write(buf),
            Writer::Unix(w) => w.try_write(buf),
            _ => return None,
        };
        n.ok().filter(|&n| n > 0)
    }

    /// Write all of `buf` and push it out: a TLS writer may otherwise keep the last record
    /// buffered.
    pub async fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write_all(buf).await?;
        if matches!(self, Writer::Tls(_)) {
            self.flush().await?;
        }
        Ok(())
    }
}

impl Reader {
    /// A non-blocking read into `buf`: `WouldBlock` when nothing is there. For a liveness
    /// check of an idle connection.
    pub fn try_read_buf(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        match self {
            Reader::Plain(r) => return r.try_read_buf(buf),
            Reader::Unix(r) => return r.try_read_buf(buf),
            _ => {}
        }
        let mut tmp = [0u8; 1024];
        let mut rb = ReadBuf::new(&mut tmp);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(self).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(rb.filled());
                Ok(rb.filled().len())
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

    fn pem(name: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(format!("{FIXTURES}/{name}"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn webpki(ca: &str) -> Arc<rustls::client::WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        for c in pem(ca) {
            roots.add(c).unwrap();
        }
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap()
    }

    /// db-internal.crt is signed by ca.crt and names only db.internal.example.
    fn check(verifier: &dyn ServerCertVerifier, host: &str) -> Result<(), rustls::Error> {
        let cert = pem("db-internal.crt").remove(0);
        let name = ServerName::try_from(host.to_owned()).unwrap();
        // Within the fixtures' ten years (2026-11-30 to 2036-11-27).
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_830_000_000));
        verifier
            .verify_server_cert(&cert, &[], &name, &[], now)
            .map(|_| ())
    }

    #[test]
    fn verify_ca_checks_the_chain_but_not_the_name() {
        let full = webpki("ca.crt");
        assert!(check(full.as_ref(), "db.internal.example").is_ok());
        assert!(
            check(full.as_ref(), "127.0.0.1").is_err(),
            "verify-full checks the name"
        );
        let chain_only = |ca| WithoutName {
            provider: provider(),
            chain: Some(webpki(ca)),
        };
        assert!(check(&chain_only("ca.crt"), "127.0.0.1").is_ok());
        let untrusted = chain_only("other-ca.crt");
        assert!(matches!(
            check(&untrusted, "db.internal.example"),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn the_end_point_is_the_certificates_hash_by_its_signature() {
        // ecdsa-with-SHA256 (as scripts/gen-cert makes them), and RSA-PSS, whose hash is in
        // its parameters (PostgreSQL binds these too).
        for (file, hash) in [
            ("db-internal.crt", &::ring::digest::SHA256),
            ("rsa-pss-sha384.crt", &::ring::digest::SHA384),
        ] {
            let cert = pem(file).remove(0);
            let expected = ::ring::digest::digest(hash, cert.as_ref())
                .as_ref()
                .to_vec();
            assert_eq!(end_point(cert.as_ref()), Some(expected), "{file}");
        }
        // Ed25519 signs without a separate hash: no binding.
        assert_eq!(end_point(pem("ed25519.crt")[0].as_ref()), None);
        assert_eq!(end_point(b"not DER"), None);
        assert_eq!(end_point(&[0x30, 0x82, 0xff]), None);
    }

    #[test]
    fn require_with_a_ca_is_verify_ca() {
        let ca = Path::new(FIXTURES).join("ca.crt");
        let policy = ServerTlsPolicy::new(ServerTls::Require, Some(&ca)).unwrap();
        assert_eq!(policy.mode, ServerTls::VerifyCa);
        assert!(!policy.roots.is_empty());
        let policy = ServerTlsPolicy::new(ServerTls::Require, None).unwrap();
        assert_eq!(policy.mode, ServerTls::Require);
    }
}
