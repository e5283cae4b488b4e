//! The pure core stays pure: no module under `src/core` uses the Kubernetes client, the async
//! runtime, the clock, the network or the file system outside its tests. The docs promise it, and
//! the core's exhaustive tests rely on it.

use std::path::Path;

/// What only the IO edge (`src/runtime`) may use.
const FORBIDDEN: [&str; 9] = [
    "kube::Client",
    "kube::Api",
    "kube::runtime",
    "tokio",
    "Timestamp::now",
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::net",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_core_does_no_io() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"),
        &mut files,
    );
    assert!(files.len() >= 7, "{files:?}");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may do as they like: only the code before the test module counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or_default();
            for word in FORBIDDEN {
                if line.contains(word) {
                    found.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "IO in the pure core:\n{}",
        found.join("\n")
    );
}
