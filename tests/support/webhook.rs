//! fledge's real webhook, served in-process over TLS for the API server stand-in to call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::apiserver::WebhookConfig;

/// A running webhook; dropping it stops the server and removes its certificates.
pub struct FledgeWebhook {
    /// How the stand-in calls it: the chart's MutatingWebhookConfiguration, at `fledge.fledge.svc`
    /// with the CA from `fledge certs`.
    pub config: WebhookConfig,
    /// Every entry of the chart's configuration (the label's and the namespace opt-in's), as the
    /// stand-in calls them: for a server that knows namespaces' labels (policies from a watch).
    pub entries: Vec<WebhookConfig>,
    task: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl Drop for FledgeWebhook {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA and a serving certificate for `fledge.fledge.svc`, as `fledge certs` makes them, written
/// to `dir` as `fledge certs --out` writes them.
pub fn serving_certs(dir: &Path) -> fledge::runtime::certs::GeneratedCerts {
    let certs = fledge::runtime::certs::generate(&fledge::runtime::certs::CertRequest {
        service: "fledge".into(),
        namespace: "fledge".into(),
        dns: vec![],
        ips: vec![],
        validity_days: 1,
    })
    .expect("certificates");
    fledge::runtime::certs::write_to_dir(&certs, dir).expect("writing certificates");
    certs
}

/// Starts the webhook on 127.0.0.1 with a serving certificate for `fledge.fledge.svc`, without
/// policies or opted-in namespaces.
pub fn start() -> FledgeWebhook {
    start_with(fledge::runtime::server::AppState::default())
}

/// [`start`] with this state: policies from a watch on the stand-in, for instance.
pub fn start_with(state: fledge::runtime::server::AppState) -> FledgeWebhook {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fledge-test-webhook-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let certs = serving_certs(&dir);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    listener.set_nonblocking(true).expect("non-blocking");
    let addr = listener.local_addr().expect("its address");
    // `fledge serve --webhook-only`, wired as the binary wires it.
    let options = fledge::runtime::serve::ServeOptions {
        listener,
        cert: fledge::runtime::server::tls::CertFiles {
            cert: dir.join(fledge::runtime::certs::CERT_FILE),
            key: dir.join(fledge::runtime::certs::KEY_FILE),
        },
        tls_reload_interval: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(1),
        controller: None,
    };
    let task = tokio::spawn(async move {
        let _ = fledge::runtime::serve::run(options, state, std::future::pending()).await;
    });
    // The chart's webhook configuration, at this server with this CA.
    let entries: Vec<WebhookConfig> = super::chart::webhook_configs(
        super::chart::default_render(),
        addr.port(),
        Some(&certs.ca_cert_pem),
    )
    .into_iter()
    .map(|mut entry| {
        entry.connect_to = Some(addr);
        entry
    })
    .collect();
    let config = entries
        .iter()
        .find(|w| w.name == "deployments.fledge.dev")
        .cloned()
        .expect("the chart's webhook deployments.fledge.dev");
    FledgeWebhook {
        config,
        entries,
        task,
        dir,
    }
}
