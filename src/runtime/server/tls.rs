//! The webhook's serving certificate, reloaded from disk while the server runs.
//!
//! cert-manager (or `fledge certs`) rotates `tls.crt`/`tls.key` in place. The server keeps one
//! [`ReloadingCert`] as its rustls cert resolver; each new handshake picks up the current key, and
//! connections already established keep the key they were made with, so rotation drops nothing.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where the serving certificate chain and its private key live (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: file not found", path.display())]
    Missing { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in PEM (expected a 'BEGIN CERTIFICATE' block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate cannot be parsed: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{}: no private key in PEM (expected a 'BEGIN PRIVATE KEY', 'BEGIN EC PRIVATE KEY' or 'BEGIN RSA PRIVATE KEY' block)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error("{}: unsupported private key (ECDSA P-256/P-384, RSA or Ed25519 expected): {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("building the TLS server configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// A server certificate that can be swapped while the server runs.
pub struct ReloadingCert {
    files: CertFiles,
    current: ArcSwap<CertifiedKey>,
    /// PEM bytes of (cert, key) behind `current`. The mutex also serialises reloads, so two
    /// concurrent reloads cannot swap in an older pair after a newer one.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Loads the certificate and key now; fails if either is missing, unparsable or mismatched.
    pub fn load(files: CertFiles) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = read_pair(&files)?;
        let key = parse_pair(&files, &cert_pem, &key_pem)?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::from_pointee(key),
            loaded: Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Re-reads both files and swaps in the new key if their contents changed and they form a
    /// valid pair. On error the previous certificate stays in service. Returns whether it swapped.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        // The guarded data is two byte buffers that are only ever replaced whole, so a poisoned
        // lock still holds a consistent value.
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let (cert_pem, key_pem) = read_pair(&self.files)?;
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        // A writer that replaces the two files one at a time can be caught halfway; that shows up
        // as a mismatch here and resolves on a later poll, since `loaded` is left untouched.
        let key = parse_pair(&self.files, &cert_pem, &key_pem)?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// The leaf certificate currently served.
    pub fn current_cert_der(&self) -> CertificateDer<'static> {
        // `parse_pair` never stores an empty chain, so the fallback is unreachable.
        self.current
            .load()
            .cert
            .first()
            .cloned()
            .unwrap_or_else(|| CertificateDer::from(Vec::new()))
    }

    /// The files this certificate is loaded from.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Polls `cert`'s files every `interval` and swaps in changed certificates, logging the outcome.
///
/// Contents are compared rather than mtimes because Kubernetes Secret volumes update by swapping
/// a symlink, which leaves the files' mtimes unreliable. The task runs until aborted.
pub fn spawn_reloader(cert: Arc<ReloadingCert>, interval: Duration) -> tokio::task::JoinHandle<()> {
    // tokio's interval panics on zero; a floor also keeps a misconfiguration from spinning.
    let interval = interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        // The first tick would fire at once; the cert was just loaded, so start one period later.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let worker = Arc::clone(&cert);
            // File reads block; keep them off the async workers in case the volume is slow.
            let outcome = tokio::task::spawn_blocking(move || worker.reload_if_changed()).await;
            let files = cert.files();
            match outcome {
                Ok(Ok(true)) => tracing::info!(
                    cert = %files.cert.display(),
                    key = %files.key.display(),
                    "reloaded the serving certificate"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(
                    %error,
                    "cannot reload the serving certificate; still serving the previous one"
                ),
                Err(error) => tracing::warn!(%error, "certificate reload task failed"),
            }
        }
    })
}

/// A rustls server configuration serving `cert`: TLS 1.3 and 1.2 with the ring provider,
/// no client authentication, ALPN `h2` then `http/1.1`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn read_pair(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read(&files.cert)?, read(&files.key)?))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing {
            path: path.to_path_buf(),
        },
        _ => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn parse_pair(
    files: &CertFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |path: &Path, source| TlsError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&files.cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: files.key.clone(),
            });
        }
        Err(e) => return Err(pem_error(&files.key, e)),
    };
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            path: files.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signer);
    // Strict: every ring signing key reports its public key, so "unknown" cannot hide a mismatch.
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            key: files.key.clone(),
            cert: files.cert.clone(),
        }),
        Err(source) => Err(TlsError::BadCertificate {
            path: files.cert.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::certs::{CertRequest, GeneratedCerts, generate, write_to_dir};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn certs() -> GeneratedCerts {
        generate(&CertRequest {
            service: "fledge".into(),
            namespace: "fledge".into(),
            dns: vec![],
            ips: vec!["127.0.0.1".parse().unwrap()],
            validity_days: 1,
        })
        .unwrap()
    }

    fn files_in(dir: &Path) -> CertFiles {
        CertFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    fn leaf_of(certs: &GeneratedCerts) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(certs.cert_pem.as_bytes()).unwrap()
    }

    #[test]
    fn load_serves_the_files_leaf() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let generated = certs();
        write_to_dir(&generated, tmp.path()).unwrap();
        let cert = ReloadingCert::load(files_in(tmp.path())).unwrap();
        assert_eq!(cert.current_cert_der(), leaf_of(&generated));
        assert!(format!("{cert:?}").contains("tls.crt"));
    }

    #[test]
    fn load_rejects_mismatched_key_naming_the_paths() {
        let tmp = tempfile::tempdir().expect("temp dir");
        write_to_dir(&certs(), tmp.path()).unwrap();
        std::fs::write(tmp.path().join("tls.key"), certs().key_pem).unwrap();
        let err = ReloadingCert::load(files_in(tmp.path())).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&tmp.path().join("tls.key").display().to_string())
                && message.contains("does not match"),
            "{message}"
        );
    }

    #[test]
    fn load_errors_name_the_file_and_problem() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let generated = certs();
        write_to_dir(&generated, tmp.path()).unwrap();
        let files = files_in(tmp.path());
        let path = |p: &PathBuf| p.display().to_string();

        let missing = CertFiles {
            cert: tmp.path().join("nope.crt"),
            ..files.clone()
        };
        let err = ReloadingCert::load(missing.clone())
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("{}: file not found", path(&missing.cert)));

        // A key where the certificate should be: PEM, but no certificate in it.
        let swapped = CertFiles {
            cert: files.key.clone(),
            key: files.cert.clone(),
        };
        let err = ReloadingCert::load(swapped).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&path(&files.key)), "{err}");

        std::fs::write(&files.key, b"not pem at all").unwrap();
        let err = ReloadingCert::load(files.clone()).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&path(&files.key)), "{err}");

        std::fs::write(
            &files.key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = ReloadingCert::load(files.clone()).unwrap_err();
        assert!(matches!(err, TlsError::UnsupportedKey { .. }), "{err:?}");

        std::fs::write(&files.key, &generated.key_pem).unwrap();
        std::fs::write(
            &files.cert,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = ReloadingCert::load(files.clone()).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&path(&files.cert)), "{err}");
    }

    #[test]
    fn reload_swaps_only_on_valid_changes() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let first = certs();
        write_to_dir(&first, tmp.path()).unwrap();
        let cert = ReloadingCert::load(files_in(tmp.path())).unwrap();

        assert!(!cert.reload_if_changed().unwrap());
        // Rewriting identical contents (new inode, new mtime) is not a change.
        write_to_dir(&first, tmp.path()).unwrap();
        assert!(!cert.reload_if_changed().unwrap());

        let second = certs();
        write_to_dir(&second, tmp.path()).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        assert_eq!(cert.current_cert_der(), leaf_of(&second));
        assert!(!cert.reload_if_changed().unwrap());

        // Garbage: keep serving the second cert, report the error, and do so on every poll.
        std::fs::write(tmp.path().join("tls.crt"), b"garbage").unwrap();
        assert!(cert.reload_if_changed().is_err());
        assert!(cert.reload_if_changed().is_err());
        assert_eq!(cert.current_cert_der(), leaf_of(&second));

        // Half-rotated pair (new cert, old key): mismatch, old cert kept; completes later.
        let third = certs();
        std::fs::write(tmp.path().join("tls.crt"), &third.cert_pem).unwrap();
        assert!(matches!(
            cert.reload_if_changed(),
            Err(TlsError::KeyMismatch { .. })
        ));
        assert_eq!(cert.current_cert_der(), leaf_of(&second));
        std::fs::write(tmp.path().join("tls.key"), &third.key_pem).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        assert_eq!(cert.current_cert_der(), leaf_of(&third));

        // Files gone: error, old cert kept.
        std::fs::remove_file(tmp.path().join("tls.key")).unwrap();
        assert!(matches!(
            cert.reload_if_changed(),
            Err(TlsError::Missing { .. })
        ));
        assert_eq!(cert.current_cert_der(), leaf_of(&third));
    }

    fn client_config(
        ca_pem: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// An echo server over TLS: each line received is sent back.
    async fn serve(cert: Arc<ReloadingCert>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(cert).unwrap()));
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (read, mut write) = tokio::io::split(tls);
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if write
                            .write_all(format!("{line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    type ClientStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn connect(addr: std::net::SocketAddr, config: ClientConfig, name: &str) -> ClientStream {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
            .await
            .unwrap()
    }

    fn peer_leaf(stream: &ClientStream) -> CertificateDer<'static> {
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    async fn echo(stream: &mut ClientStream, text: &str) -> String {
        stream
            .write_all(format!("{text}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        line
    }

    #[tokio::test]
    async fn handshake_serves_rotated_cert_without_dropping_connections() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let first = certs();
        write_to_dir(&first, tmp.path()).unwrap();
        let cert = ReloadingCert::load(files_in(tmp.path())).unwrap();
        let addr = serve(Arc::clone(&cert)).await;

        let tls13 = [&rustls::version::TLS13, &rustls::version::TLS12];
        let mut old = connect(
            addr,
            client_config(&first.ca_cert_pem, &tls13),
            "fledge.fledge.svc",
        )
        .await;
        assert_eq!(peer_leaf(&old), leaf_of(&first));
        assert_eq!(peer_leaf(&old), cert.current_cert_der());
        assert_eq!(
            old.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        assert_eq!(old.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(echo(&mut old, "one").await, "one\n");

        // The IP SAN works for a real handshake too.
        let by_ip = connect(addr, client_config(&first.ca_cert_pem, &tls13), "127.0.0.1").await;
        assert_eq!(peer_leaf(&by_ip), leaf_of(&first));

        // Rotate to a certificate from a new CA, as a fresh `fledge certs` run would.
        let second = certs();
        write_to_dir(&second, tmp.path()).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        let new = connect(
            addr,
            client_config(&second.ca_cert_pem, &tls13),
            "fledge.fledge.svc",
        )
        .await;
        assert_eq!(peer_leaf(&new), leaf_of(&second));

        // The connection made before the rotation still works.
        assert_eq!(echo(&mut old, "two").await, "two\n");

        // A client that only trusts the old CA now fails the handshake.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stale = TlsConnector::from(Arc::new(client_config(&first.ca_cert_pem, &tls13)))
            .connect(ServerName::try_from("fledge.fledge.svc").unwrap(), tcp)
            .await;
        assert!(stale.is_err());
    }

    #[tokio::test]
    async fn tls12_only_client_connects() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let generated = certs();
        write_to_dir(&generated, tmp.path()).unwrap();
        let cert = ReloadingCert::load(files_in(tmp.path())).unwrap();
        let addr = serve(cert).await;

        let mut config = client_config(&generated.ca_cert_pem, &[&rustls::version::TLS12]);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut stream = connect(addr, config, "fledge.fledge.svc").await;
        let version = stream.get_ref().1.protocol_version();
        assert!(
            matches!(
                version,
                Some(ProtocolVersion::TLSv1_2 | ProtocolVersion::TLSv1_3)
            ),
            "{version:?}"
        );
        // The client allowed nothing newer, so it must be 1.2.
        assert_eq!(version, Some(ProtocolVersion::TLSv1_2));
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(peer_leaf(&stream), leaf_of(&generated));
        assert_eq!(echo(&mut stream, "hello").await, "hello\n");
    }

    #[tokio::test]
    async fn reloader_picks_up_rotation() {
        let tmp = tempfile::tempdir().expect("temp dir");
        write_to_dir(&certs(), tmp.path()).unwrap();
        let cert = ReloadingCert::load(files_in(tmp.path())).unwrap();
        let task = spawn_reloader(Arc::clone(&cert), Duration::from_millis(100));

        let second = certs();
        write_to_dir(&second, tmp.path()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cert.current_cert_der() != leaf_of(&second) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reloader did not swap in the rotated certificate"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
