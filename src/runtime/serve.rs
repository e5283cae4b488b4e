//! `fledge serve`, wired: the webhook over HTTPS with certificate reload, and the controller
//! under the Lease. The binary only maps its flags to [`ServeOptions`]; tests and benchmarks run
//! this very wiring.

use std::future::Future;
use std::time::Duration;

use crate::runtime::controller::{self, ControllerConfig};
use crate::runtime::lease::{self, LeaseConfig};
use crate::runtime::policies::PolicyWatch;
use crate::runtime::server::{self, AppState, ServeError, tls};

/// Everything `fledge serve` runs with.
pub struct ServeOptions {
    pub listener: std::net::TcpListener,
    pub cert: tls::CertFiles,
    /// How often the certificate files are looked at for a rotation.
    pub tls_reload_interval: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// The controller and its Lease; `None` serves the webhook alone.
    pub controller: Option<ControllerOptions>,
}

/// The controller half: what it runs with, and the Lease that elects the one replica running it.
pub struct ControllerOptions {
    pub client: kube::Client,
    pub lease: LeaseConfig,
    pub namespace: Option<String>,
    pub split_api: crate::core::objects::SplitApi,
    /// Prometheus for checks that name no `address`.
    pub prometheus_address: Option<String>,
}

/// Serves until `shutdown` resolves, then drains in-flight requests, stops the controller (which
/// releases the Lease) and returns.
pub async fn run(
    options: ServeOptions,
    mut state: AppState,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // Every replica decides with the policies, leader or not; without the API (webhook only) there
    // are none.
    if let Some(c) = &options.controller {
        state.policies = PolicyWatch::spawn(c.client.clone(), c.namespace.clone());
    }
    let cert = tls::ReloadingCert::load(options.cert)?;
    let reloader = tls::spawn_reloader(cert.clone(), options.tls_reload_interval);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let controller = options.controller.map(|c| {
        let config = ControllerConfig {
            namespace: c.namespace,
            split_api: c.split_api,
            metrics: state.metrics.controller.clone(),
            prometheus_address: c.prometheus_address,
            policies: state.policies.clone(),
            clock: crate::runtime::clock::Clock::system(),
        };
        tracing::info!(
            namespace = config.namespace.as_deref().unwrap_or("(all)"),
            lease = %format!("{}/{}", c.lease.namespace, c.lease.name),
            identity = %c.lease.identity,
            "controller runs while this replica holds the Lease"
        );
        let client = c.client.clone();
        let lead = move || controller::run(client.clone(), config.clone(), std::future::pending());
        let mut stopped = stopped.clone();
        tokio::spawn(lease::run_while_leader(
            c.client,
            c.lease,
            lead,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ))
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    // The webhook on a runtime of its own: the controller's work can never queue it.
    let served = server::serve_isolated(
        options.listener,
        cert,
        state,
        shutdown,
        options.drain_timeout,
    )
    .await;
    if let Some(controller) = controller {
        let _ = controller.await;
    }
    reloader.abort();
    served
}
