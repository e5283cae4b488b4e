//! Webhook certificates: a private CA plus a serving certificate for the webhook Service.
//!
//! The API server calls the webhook at `https://<service>.<namespace>.svc`, so the serving
//! certificate names that host (and its shorter and longer spellings), and the webhook
//! configuration's `caBundle` carries the CA. Generation is pure; [`write_to_dir`] is the only IO.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

/// Common name of the generated CA.
pub const CA_COMMON_NAME: &str = "fledge-webhook-ca";

/// Longest validity accepted; also keeps the end date far inside what X.509 time can encode.
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

/// Backdating of `not_before`, so nodes whose clocks run a little behind accept a fresh cert.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// File names inside the output directory, as a Kubernetes TLS Secret / cert-manager lays them out.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// What to generate a serving certificate for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRequest {
    /// Name of the webhook's Service.
    pub service: String,
    /// Namespace of the webhook's Service.
    pub namespace: String,
    /// Extra DNS names for the serving certificate.
    pub dns: Vec<String>,
    /// Extra IP addresses for the serving certificate (e.g. 127.0.0.1 for local tests).
    pub ips: Vec<IpAddr>,
    /// Validity of both certificates, counted from now.
    pub validity_days: u32,
}

/// PEM-encoded CA and serving certificate with their keys.
#[derive(Clone)]
pub struct GeneratedCerts {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl GeneratedCerts {
    /// The CA certificate as a webhook configuration's `caBundle` takes it: base64 of the PEM.
    pub fn ca_bundle_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.ca_cert_pem.as_bytes())
    }
}

// Hand-written so that private keys never end up in logs or panic messages.
impl fmt::Debug for GeneratedCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCerts")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &"<redacted>")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A user-supplied value is unusable; `flag` is the command-line flag it came from.
    #[error("{flag} {value:?}: {reason}")]
    InvalidInput {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Generates a fresh CA and a serving certificate signed by it.
pub fn generate(req: &CertRequest) -> Result<GeneratedCerts, CertError> {
    // Service names are DNS-1035 labels: stricter than namespaces (they start with a letter).
    crate::core::spec::check_dns1035(&req.service)
        .map_err(|why| invalid("--service", req.service.clone(), why))?;
    validate_label("--namespace", &req.namespace)?;
    for name in &req.dns {
        validate_dns_name("--dns", name)?;
    }
    if req.validity_days == 0 || req.validity_days > MAX_VALIDITY_DAYS {
        return Err(invalid(
            "--validity-days",
            req.validity_days.to_string(),
            format!("must be between 1 and {MAX_VALIDITY_DAYS}"),
        ));
    }

    let now = SystemTime::now();
    let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
    let validity = Duration::from_secs(u64::from(req.validity_days) * 86_400);
    // Cannot overflow given MAX_VALIDITY_DAYS, but stay total rather than panic.
    let not_after = now.checked_add(validity).ok_or_else(|| {
        invalid(
            "--validity-days",
            req.validity_days.to_string(),
            "end date out of range".to_string(),
        )
    })?;

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = common_name(CA_COMMON_NAME);
    // Path length 0: this CA signs leaf certificates only, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before.into();
    ca_params.not_after = not_after.into();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let host = format!("{}.{}.svc", req.service, req.namespace);
    let mut names = vec![
        req.service.clone(),
        format!("{}.{}", req.service, req.namespace),
        host.clone(),
        format!("{host}.cluster.local"),
    ];
    for name in &req.dns {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let mut sans = Vec::with_capacity(names.len() + req.ips.len());
    for name in names {
        let ia5 = Ia5String::try_from(name.as_str())
            .map_err(|e| invalid("--dns", name.clone(), e.to_string()))?;
        sans.push(SanType::DnsName(ia5));
    }
    for ip in &req.ips {
        if !sans.contains(&SanType::IpAddress(*ip)) {
            sans.push(SanType::IpAddress(*ip));
        }
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&host);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;

    Ok(GeneratedCerts {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: issuer.key().serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `ca.pem`, `ca-key.pem`, `tls.crt` and `tls.key` into `dir` (created if missing) and
/// returns their paths in that order. Each file is replaced atomically; keys are mode 0600 on unix.
pub fn write_to_dir(certs: &GeneratedCerts, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = [
        (CA_CERT_FILE, &certs.ca_cert_pem, false),
        (CA_KEY_FILE, &certs.ca_key_pem, true),
        (CERT_FILE, &certs.cert_pem, false),
        (KEY_FILE, &certs.key_pem, true),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_atomically(&path, contents.as_bytes(), secret).map_err(|source| CertError::Io {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// Writes to a temporary sibling and renames it over `path`, so readers see the old or the new
/// contents, never a partial file.
fn write_atomically(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        // create_new: never write through a file (or symlink) that someone else left there.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Set at creation, so a key is never readable by others, not even briefly.
            options.mode(if secret { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn invalid(flag: &'static str, value: String, reason: String) -> CertError {
    CertError::InvalidInput {
        flag,
        value,
        reason,
    }
}

const LABEL_RULE: &str = "must be a DNS-1123 label (lowercase letters, digits, '-')";

/// Kubernetes' DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
fn label_problem(label: &str) -> Option<String> {
    if label.is_empty() {
        return Some(format!("{LABEL_RULE}; it is empty"));
    }
    if label.len() > 63 {
        return Some(format!(
            "{LABEL_RULE}; it is {} characters, at most 63 allowed",
            label.len()
        ));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(LABEL_RULE.to_string());
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some(format!(
            "{LABEL_RULE}; it must start and end with a letter or digit"
        ));
    }
    None
}

fn validate_label(flag: &'static str, value: &str) -> Result<(), CertError> {
    match label_problem(value) {
        Some(reason) => Err(invalid(flag, value.to_string(), reason)),
        None => Ok(()),
    }
}

/// A DNS-1123 subdomain (dot-separated labels, at most 253 characters), optionally a `*.` wildcard.
fn validate_dns_name(flag: &'static str, value: &str) -> Result<(), CertError> {
    const RULE: &str = "must be a DNS name: dot-separated DNS-1123 labels (lowercase letters, digits, '-'), optionally starting with '*.'";
    if value.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            flag,
            value.to_string(),
            "is an IP address; pass it with --ip".to_string(),
        ));
    }
    let rest = value.strip_prefix("*.").unwrap_or(value);
    if value.len() > 253 {
        return Err(invalid(
            flag,
            value.to_string(),
            format!("{RULE}; at most 253 characters"),
        ));
    }
    if let Some(problem) = rest.split('.').find_map(label_problem) {
        let detail = problem.strip_prefix(LABEL_RULE).unwrap_or("");
        return Err(invalid(flag, value.to_string(), format!("{RULE}{detail}")));
    }
    Ok(())
}

/// Test helpers shared with other modules' tests (e.g. `server::tls`).
#[cfg(test)]
mod tests {
    use super::*;
    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn req() -> CertRequest {
        CertRequest {
            service: "fledge".into(),
            namespace: "fledge".into(),
            dns: vec!["fledge.example.com".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            validity_days: 30,
        }
    }

    fn verifier(ca_pem: &str) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
    }

    fn verify(certs: &GeneratedCerts, name: &str) -> Result<(), rustls::Error> {
        let leaf = CertificateDer::from_pem_slice(certs.cert_pem.as_bytes()).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier(&certs.ca_cert_pem)
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn serving_cert_verifies_for_service_names_and_extras() {
        let certs = generate(&req()).unwrap();
        for name in [
            "fledge",
            "fledge.fledge",
            "fledge.fledge.svc",
            "fledge.fledge.svc.cluster.local",
            "fledge.example.com",
            "127.0.0.1",
        ] {
            verify(&certs, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn serving_cert_does_not_verify_for_other_names() {
        let certs = generate(&req()).unwrap();
        for name in ["other.fledge.svc", "fledge.other.svc", "127.0.0.2"] {
            let err = verify(&certs, name).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                        | rustls::Error::InvalidCertificate(
                            rustls::CertificateError::NotValidForNameContext { .. }
                        )
                ),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn serving_cert_does_not_verify_against_another_ca() {
        let certs = generate(&req()).unwrap();
        let other = generate(&req()).unwrap();
        let leaf = CertificateDer::from_pem_slice(certs.cert_pem.as_bytes()).unwrap();
        let name = ServerName::try_from("fledge.fledge.svc").unwrap();
        assert!(
            verifier(&other.ca_cert_pem)
                .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn pems_parse_and_keys_match() {
        let certs = generate(&req()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        for (cert, key) in [
            (&certs.cert_pem, &certs.key_pem),
            (&certs.ca_cert_pem, &certs.ca_key_pem),
        ] {
            let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
            let signer = provider.key_provider.load_private_key(key).unwrap();
            rustls::sign::CertifiedKey::new(vec![cert], signer)
                .keys_match()
                .unwrap();
        }
    }

    #[test]
    fn ca_bundle_is_base64_of_ca_pem() {
        let certs = generate(&req()).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(certs.ca_bundle_base64())
            .unwrap();
        assert_eq!(decoded, certs.ca_cert_pem.as_bytes());
        assert!(certs.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn debug_redacts_keys() {
        let certs = generate(&req()).unwrap();
        let debug = format!("{certs:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn bad_service_is_rejected_with_flag_and_reason() {
        let err = generate(&CertRequest {
            service: "Web".into(),
            ..req()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"--service "Web": is not a valid Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)"#
        );
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let cases: Vec<(CertRequest, &str)> = vec![
            (
                CertRequest {
                    service: "".into(),
                    ..req()
                },
                r#"--service "": is empty"#,
            ),
            (
                CertRequest {
                    service: "web.x".into(),
                    ..req()
                },
                r#"--service "web.x": is not a valid Service name"#,
            ),
            (
                CertRequest {
                    service: "1web".into(),
                    ..req()
                },
                r#"--service "1web": is not a valid Service name"#,
            ),
            (
                CertRequest {
                    service: "a".repeat(64),
                    ..req()
                },
                "is 64 characters long; Service names have at most 63",
            ),
            (
                CertRequest {
                    namespace: "kube_system".into(),
                    ..req()
                },
                r#"--namespace "kube_system": must be a DNS-1123 label"#,
            ),
            (
                CertRequest {
                    dns: vec!["bad..name".into()],
                    ..req()
                },
                r#"--dns "bad..name": must be a DNS name"#,
            ),
            (
                CertRequest {
                    dns: vec!["10.0.0.1".into()],
                    ..req()
                },
                r#"--dns "10.0.0.1": is an IP address; pass it with --ip"#,
            ),
            (
                CertRequest {
                    validity_days: 0,
                    ..req()
                },
                r#"--validity-days "0": must be between 1 and 36500"#,
            ),
            (
                CertRequest {
                    validity_days: u32::MAX,
                    ..req()
                },
                "--validity-days",
            ),
        ];
        for (request, expected) in cases {
            let err = generate(&request).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn accepts_wildcard_and_63_char_labels() {
        let certs = generate(&CertRequest {
            service: "a".repeat(63),
            dns: vec!["*.example.com".into()],
            ..req()
        })
        .unwrap();
        verify(&certs, "x.example.com").unwrap();
    }

    #[test]
    fn write_to_dir_writes_all_files_atomically_with_private_keys() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("nested/out");
        let certs = generate(&req()).unwrap();
        let paths = write_to_dir(&certs, &dir).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["ca.pem", "ca-key.pem", "tls.crt", "tls.key"]);
        assert_eq!(fs::read_to_string(&paths[0]).unwrap(), certs.ca_cert_pem);
        assert_eq!(fs::read_to_string(&paths[1]).unwrap(), certs.ca_key_pem);
        assert_eq!(fs::read_to_string(&paths[2]).unwrap(), certs.cert_pem);
        assert_eq!(fs::read_to_string(&paths[3]).unwrap(), certs.key_pem);

        // Overwriting works, and no temporary files are left behind.
        let again = generate(&req()).unwrap();
        write_to_dir(&again, &dir).unwrap();
        assert_eq!(fs::read_to_string(&paths[2]).unwrap(), again.cert_pem);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 4);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&paths[1]), 0o600);
            assert_eq!(mode(&paths[3]), 0o600);
            // Certificates are public; their exact mode depends on the umask.
            assert_eq!(mode(&paths[2]) & 0o600, 0o600);
        }
    }

    #[test]
    fn write_to_dir_names_the_failing_path() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = write_to_dir(&generate(&req()).unwrap(), &file).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
