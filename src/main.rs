//! The `fledge` command line: the edge where errors become messages and exit codes.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio::signal::{self, unix::SignalKind};

use fledge::core::admission::AdmissionOutcome;
use fledge::core::objects::SplitApi;
use fledge::core::plan::{self, Manifest};
use fledge::core::policy::{self, PolicySnapshot};
use fledge::core::rollout::machine::Command as RolloutCommand;
use fledge::core::spec;
use fledge::runtime::certs;
use fledge::runtime::commands::{
    self,
    watch::{self, Ending, Style},
};
use fledge::runtime::lease::LeaseConfig;
use fledge::runtime::serve::{self, ControllerOptions, ServeOptions};
use fledge::runtime::server::{AppState, tls};

/// The shell's exit code for a command ended by Ctrl-C (128 + SIGINT).
const INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "fledge",
    version,
    about = "Progressive canary delivery for plain Kubernetes Deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mutating admission webhook over HTTPS and run the controller.
    Serve(ServeArgs),
    /// Show offline what the webhook decides for a change from one manifest to another.
    Plan(PlanArgs),
    /// Make a CA and a serving certificate for the webhook, and print the caBundle.
    Certs(CertsArgs),
    /// Show the rollout of one Deployment, or of every opted-in one in the namespace.
    Status(StatusArgs),
    /// End the current pause of a canary.
    Promote(TargetArgs),
    /// Send all traffic back to stable and remove the canary; its template stays aborted.
    Abort(TargetArgs),
    /// Start an aborted canary again from step 1.
    Retry(TargetArgs),
    /// List the rollout policies and the Deployments each one governs.
    Policies(PoliciesArgs),
    /// Print the CustomResourceDefinitions of RolloutPolicy and ClusterRolloutPolicy.
    Crds,
}

#[derive(clap::Args)]
struct PoliciesArgs {
    /// The namespace (default: the kubeconfig's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// Output: a table, or JSON.
    #[arg(short = 'o', long, value_enum, default_value_t = StatusOutput::Text)]
    output: StatusOutput,
}

#[derive(clap::Args)]
struct TargetArgs {
    /// The Deployment.
    name: String,
    /// Its namespace (default: the kubeconfig's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The Deployment (default: every opted-in Deployment in the namespace).
    name: Option<String>,
    /// The namespace (default: the kubeconfig's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Output: one line per Deployment, or JSON.
    #[arg(short = 'o', long, value_enum, default_value_t = StatusOutput::Text)]
    output: StatusOutput,
    /// Keep watching and show every change (JSON: one object per line). With NAME, end when the
    /// rollout settles: exit 0 at Succeeded or with no canary in flight, 1 at Aborted.
    #[arg(short = 'w', long)]
    watch: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusOutput {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLEDGE_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// PEM certificate chain (re-read when it changes on disk).
    #[arg(long, env = "FLEDGE_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key (re-read when it changes on disk).
    #[arg(long, env = "FLEDGE_TLS_KEY")]
    tls_key: PathBuf,
    /// How often to look for rotated certificate files, e.g. 10s.
    #[arg(long, env = "FLEDGE_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = duration)]
    tls_reload_interval: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish, e.g. 30s.
    #[arg(long, env = "FLEDGE_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
    /// Log format.
    #[arg(long, env = "FLEDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve the webhook alone, without the controller (no Kubernetes API needed).
    #[arg(long, env = "FLEDGE_WEBHOOK_ONLY")]
    webhook_only: bool,
    /// Watch this namespace only (default: all).
    #[arg(long, short = 'n', env = "FLEDGE_NAMESPACE")]
    namespace: Option<String>,
    /// TrafficSplit apiVersion to write: v1alpha1, v1alpha2, v1alpha3 or v1alpha4.
    #[arg(long, env = "FLEDGE_SPLIT_API", default_value = "v1alpha2")]
    split_api: SplitApi,
    /// Prometheus for the checks of `fledge.dev/analysis` that name no `address`, e.g.
    /// `http://prometheus.monitoring:9090`.
    #[arg(long, env = "FLEDGE_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<String>,
    /// The Lease that elects the one replica running the controller.
    #[arg(long, env = "FLEDGE_LEASE_NAME", default_value = "fledge-controller")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's, POD_NAMESPACE, else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's name in the Lease (default: POD_NAME, else HOSTNAME, else fledge-PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The Deployment as it runs now (omit for a first deploy). May also hold its Service.
    #[arg(long)]
    from: Option<PathBuf>,
    /// The Deployment as you are about to apply it. May also hold its Service.
    #[arg(long)]
    to: PathBuf,
    /// A file with the root Service, if neither manifest holds it.
    #[arg(long)]
    service: Vec<PathBuf>,
    /// Output: a readable report, the objects as YAML, or everything as JSON.
    #[arg(short = 'o', long, value_enum, default_value_t = PlanOutput::Text)]
    output: PlanOutput,
    /// TrafficSplit apiVersion to write: v1alpha1, v1alpha2, v1alpha3 or v1alpha4.
    #[arg(long, default_value = "v1alpha2")]
    split_api: SplitApi,
    /// Files with RolloutPolicy and ClusterRolloutPolicy objects (and Namespaces, for namespace
    /// opt-in and namespace selectors): the plan applies them as the cluster would.
    #[arg(long, num_args = 1..)]
    policy: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanOutput {
    Text,
    Yaml,
    Json,
}

#[derive(clap::Args)]
struct CertsArgs {
    /// The webhook's Service name.
    #[arg(long, default_value = "fledge")]
    service: String,
    /// The webhook's namespace.
    #[arg(long, default_value = "fledge")]
    namespace: String,
    /// Extra DNS names for the serving certificate.
    #[arg(long)]
    dns: Vec<String>,
    /// Extra IP addresses for the serving certificate, e.g. 127.0.0.1 for local runs.
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// How long the certificates are valid.
    #[arg(long, default_value_t = 365)]
    validity_days: u32,
    /// Directory to write ca.pem, ca-key.pem, tls.crt and tls.key into.
    #[arg(long)]
    out: PathBuf,
}

/// A flag's duration: `10s`, `1m30s` as in the steps, or milliseconds such as `200ms`.
fn duration(text: &str) -> Result<Duration, String> {
    if let Some(millis) = text.strip_suffix("ms")
        && let Ok(millis) = millis.parse()
    {
        return Ok(Duration::from_millis(millis));
    }
    spec::parse_duration(text)
        .map_err(|why| format!("{text:?} {why}, or milliseconds such as 200ms"))
}

fn main() -> ExitCode {
    // Installed as `kubectl-fledge`, kubectl runs it for `kubectl fledge ...`: say so in the usage.
    let invoked_as_plugin = std::env::args()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|f| f.to_string_lossy().starts_with("kubectl-fledge"))
        })
        .unwrap_or(false);
    let mut command = Cli::command();
    if invoked_as_plugin {
        command = command.bin_name("kubectl fledge");
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Plan(args) => run_plan(args),
        Command::Certs(args) => run_certs(args),
        Command::Status(args) => run_status(args),
        Command::Promote(args) => run_rollout_command(args, RolloutCommand::Promote),
        Command::Abort(args) => run_rollout_command(args, RolloutCommand::Abort),
        Command::Retry(args) => run_rollout_command(args, RolloutCommand::Retry),
        Command::Policies(args) => run_policies(args),
        Command::Crds => run_crds(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = std::net::TcpListener::bind(args.listen)
            .with_context(|| format!("listening on {}", args.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "webhook listening on {local}");
        let controller = if args.webhook_only {
            None
        } else {
            let client = kube::Client::try_default().await.context(
                "no Kubernetes API configuration (in-cluster, KUBECONFIG or ~/.kube/config); \
                 run with --webhook-only to serve the webhook alone",
            )?;
            let lease = LeaseConfig {
                name: args.lease_name,
                namespace: args
                    .lease_namespace
                    .unwrap_or_else(|| client.default_namespace().to_owned()),
                identity: args
                    .identity
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| format!("fledge-{}", std::process::id())),
                duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            };
            Some(ControllerOptions {
                client,
                lease,
                namespace: args.namespace,
                split_api: args.split_api,
                prometheus_address: args.prometheus_address,
            })
        };
        let options = ServeOptions {
            listener,
            cert: tls::CertFiles {
                cert: args.tls_cert,
                key: args.tls_key,
            },
            tls_reload_interval: args.tls_reload_interval,
            drain_timeout: args.drain_timeout,
            controller,
        };
        serve::run(options, AppState::default(), shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGTERM (what the kubelet sends) or Ctrl-C. The handlers are in place from this call on, not
/// from the first poll, so that a signal in between is not lost (nor kills the process).
fn shutdown_signal() -> impl Future<Output = ()> {
    let interrupt = signal::unix::signal(SignalKind::interrupt()).ok();
    let terminate = signal::unix::signal(SignalKind::terminate()).ok();
    async move {
        tokio::select! {
            () = received(interrupt) => {}
            () = received(terminate) => {}
        }
    }
}

/// Resolves at the first signal; never, when its handler could not be installed.
async fn received(signal: Option<signal::unix::Signal>) {
    match signal {
        Some(mut signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn read_manifest(path: &PathBuf) -> Result<Manifest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Manifest::parse(&path.display().to_string(), &text)?)
}

fn run_plan(args: PlanArgs) -> Result<ExitCode> {
    let from = args.from.as_ref().map(read_manifest).transpose()?;
    let to = read_manifest(&args.to)?;
    let services = args
        .service
        .iter()
        .map(read_manifest)
        .collect::<Result<Vec<_>>>()?;
    let policy_files = args
        .policy
        .iter()
        .map(read_manifest)
        .collect::<Result<Vec<_>>>()?;
    let policies = PolicySnapshot::from_objects(policy_files.iter().flat_map(|m| &m.objects))
        .map_err(anyhow::Error::msg)?;
    let plan = plan::plan(from.as_ref(), &to, &services, args.split_api, &policies)?;
    match args.output {
        PlanOutput::Text => print!("{}", plan::render_text(&plan)),
        PlanOutput::Yaml => print!("{}", plan::to_yaml(&plan)?),
        PlanOutput::Json => println!("{}", serde_json::to_string_pretty(&plan::to_json(&plan))?),
    }
    // Like a failed `kubectl apply`, a denied change fails the command (useful in CI).
    Ok(match plan.decision.outcome {
        AdmissionOutcome::Deny(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn run_crds() -> Result<ExitCode> {
    print!("{}", policy::crds_yaml()?);
    Ok(ExitCode::SUCCESS)
}

fn run_policies(args: PoliciesArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let (client, namespace) = client(args.namespace).await?;
        let scope = (!args.all_namespaces).then_some(namespace.as_str());
        let rows = commands::policies::list(client, scope).await?;
        match args.output {
            StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            StatusOutput::Text => print!("{}", commands::policies::text(&rows)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A client from the usual configuration, and the namespace to use.
async fn client(namespace: Option<String>) -> Result<(kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API configuration (in-cluster, KUBECONFIG or ~/.kube/config)")?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    Ok((client, namespace))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_status(args: StatusArgs) -> Result<ExitCode> {
    if args.watch {
        return run_status_watch(args);
    }
    runtime()?.block_on(async {
        let (client, namespace) = client(args.namespace).await?;
        let statuses = commands::status(client, &namespace, args.name.as_deref()).await?;
        match args.output {
            StatusOutput::Json if args.name.is_some() => {
                let one = statuses.first().context("no status")?;
                println!("{}", serde_json::to_string_pretty(one)?);
            }
            StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&statuses)?),
            StatusOutput::Text => print!("{}", commands::status_text(&statuses, &namespace)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `fledge status --watch`. Exit codes, as `kubectl rollout status`: with NAME, 0 at Succeeded or
/// when no canary is in flight, 1 at Aborted (or when fledge cannot run it), 130 on Ctrl-C before
/// it settles; without NAME it runs until Ctrl-C and exits 0.
fn run_status_watch(args: StatusArgs) -> Result<ExitCode> {
    // Retried watch failures are logged to stderr, out of the view's way.
    init_logging(LogFormat::Text);
    let style = match args.output {
        StatusOutput::Json => Style::Json,
        StatusOutput::Text if std::io::stdout().is_terminal() => Style::Live,
        StatusOutput::Text => Style::Log,
    };
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        let (client, namespace) = client(args.namespace).await?;
        let ending = watch::watch(
            client,
            &namespace,
            args.name.as_deref(),
            style,
            &mut std::io::stdout().lock(),
            stop,
        )
        .await?;
        match ending {
            Ending::Settled(watch::Settled::Succeeded | watch::Settled::NothingInFlight) => {
                Ok(ExitCode::SUCCESS)
            }
            Ending::Settled(watch::Settled::Failed(why)) => Err(anyhow::anyhow!(why)),
            Ending::Stopped if args.name.is_some() => Ok(ExitCode::from(INTERRUPTED)),
            Ending::Stopped => Ok(ExitCode::SUCCESS),
        }
    })
}

fn run_rollout_command(args: TargetArgs, cmd: RolloutCommand) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let (client, namespace) = client(args.namespace).await?;
        let applied = commands::run(client, &namespace, &args.name, cmd).await?;
        println!("{}: {}", args.name, applied.state.message);
        if let Some(e) = applied.unrecorded {
            eprintln!("warning: the command took effect, but its Event could not be recorded: {e}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn run_certs(args: CertsArgs) -> Result<ExitCode> {
    let generated = certs::generate(&certs::CertRequest {
        service: args.service.clone(),
        namespace: args.namespace.clone(),
        dns: args.dns,
        ips: args.ip,
        validity_days: args.validity_days,
    })?;
    let written = certs::write_to_dir(&generated, &args.out)?;
    for path in &written {
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "serving certificate for {}.{}.svc; caBundle for the MutatingWebhookConfiguration:",
        args.service, args.namespace
    );
    println!("{}", generated.ca_bundle_base64());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flag_durations_take_milliseconds_too() {
        assert_eq!(duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(
            duration("soon")
                .unwrap_err()
                .contains("or milliseconds such as 200ms")
        );
    }
}
