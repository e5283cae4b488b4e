//! Each check's measurements in the rollout state, and which measurement is due when.

/// The name of the Job for measurement `index` of `check` in `run` (the step that runs the check,
/// or `bg` in the background) of canary `canary_hash` of `deployment`: the same inputs give the
/// same name, so a restarted controller finds the Job it created instead of starting a second.
/// At most 63 characters (Jobs label their pods with their name); a long name is cut and keeps a
/// hash of the whole so that it stays unique.
pub fn job_name(deployment: &str, canary_hash: &str, check: &str, run: &str, index: u32) -> String {
    use sha2::{Digest, Sha256};
    let hash: String = canary_hash.chars().take(10).collect();
    let full = format!("{deployment}-{hash}-{check}-{run}-{index}");
    if full.len() <= 63 {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let tag: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep: String = full.chars().take(63 - tag.len() - 1).collect();
    format!("{}-{tag}", keep.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_deterministic_short_and_unique() {
        assert_eq!(
            job_name("web", "abcdef123456", "smoke", "s2", 0),
            "web-abcdef1234-smoke-s2-0"
        );
        let long = "d".repeat(60);
        let a = job_name(&long, "abcdef123456", "smoke", "s2", 0);
        let b = job_name(&long, "abcdef123456", "smoke", "s2", 1);
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, job_name(&long, "abcdef123456", "smoke", "s2", 0));
    }
}
