//! The pod-ratio router: without a mesh, the root Service sends each request to one of the pods it
//! selects, stable and canary alike, so the canary's share of traffic is its share of the pods.
//! fledge never scales the user's Deployment: it picks the canary replica count whose share is
//! nearest the asked weight, and says what share that really is.

use std::fmt;

use crate::core::spec::{Step, Weight};

/// The canary pods for an asked weight, and the share of traffic they take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodShare {
    pub asked: Weight,
    pub stable_pods: u64,
    pub canary_pods: u64,
    /// `canary / (stable + canary)`, to the basis point.
    pub effective: Weight,
}

impl PodShare {
    /// The canary pod count nearest `asked` beside `stable_pods`: none at 0 %; otherwise at least
    /// one (a step that asks for traffic gets some) and at most as many as the stable pods (the
    /// canary's size at promotion on every router), so above 50 % the nearest is 50 %. Ties go
    /// to the smaller canary.
    pub fn nearest(stable_pods: u64, asked: Weight) -> PodShare {
        let full = u64::from(Weight::FULL.basis_points());
        let asked_bp = u64::from(asked.basis_points());
        let canary_pods = if asked_bp == 0 {
            0
        } else {
            // |c / (s + c) − a| compared across candidates without division:
            // distance(c) = |c·F − a·(s + c)| / (s + c).
            let distance = |c: u64| {
                let total = stable_pods + c;
                (c * full).abs_diff(asked_bp * total) as u128 * u128::from(PRECISION)
                    / total as u128
            };
            (1..=stable_pods.max(1))
                .min_by_key(|c| (distance(*c), *c))
                .unwrap_or(1)
        };
        PodShare {
            asked,
            stable_pods,
            canary_pods,
            effective: share(stable_pods, canary_pods),
        }
    }

    /// Whether the pods give exactly the asked weight.
    pub fn exact(&self) -> bool {
        self.effective == self.asked
    }
}

/// Fixed-point scale for comparing distances between shares.
const PRECISION: u32 = 1_000_000;

/// The canary's share of `stable + canary` pods, rounded to the nearest basis point.
fn share(stable_pods: u64, canary_pods: u64) -> Weight {
    let total = stable_pods + canary_pods;
    if total == 0 {
        return Weight::ZERO;
    }
    let full = u64::from(Weight::FULL.basis_points());
    let bp = (canary_pods * full * 2 + total) / (total * 2);
    u16::try_from(bp)
        .ok()
        .and_then(Weight::from_basis_points)
        .unwrap_or(Weight::FULL)
}

impl fmt::Display for PodShare {
    /// `asked 5 %; with 3 stable pods the nearest is 25 % (1 canary pod)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64, what: &str| {
            if n == 1 {
                format!("{n} {what} pod")
            } else {
                format!("{n} {what} pods")
            }
        };
        if self.exact() {
            return write!(
                f,
                "{} % ({} beside {})",
                self.effective,
                plural(self.canary_pods, "canary"),
                plural(self.stable_pods, "stable")
            );
        }
        write!(
            f,
            "asked {} %; with {} the nearest is {} % ({})",
            self.asked,
            plural(self.stable_pods, "stable"),
            self.effective,
            plural(self.canary_pods, "canary")
        )
    }
}

/// For each `setWeight` step that the pods cannot meet exactly: its place and what it gets.
pub fn unmet_steps(steps: &[Step], stable_pods: u64) -> Vec<(usize, PodShare)> {
    steps
        .iter()
        .enumerate()
        .filter_map(|(i, step)| match step {
            Step::SetWeight(w) => Some((i, PodShare::nearest(stable_pods, *w))),
            _ => None,
        })
        .filter(|(_, share)| !share.exact())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(percent: &str) -> Weight {
        Weight::parse_percent(percent).unwrap()
    }

    fn pods(stable: u64, asked: &str) -> (u64, Weight) {
        let s = PodShare::nearest(stable, w(asked));
        (s.canary_pods, s.effective)
    }

    #[test]
    fn the_issue_example() {
        let s = PodShare::nearest(3, w("5"));
        assert_eq!((s.canary_pods, s.effective), (1, w("25")));
        assert_eq!(
            s.to_string(),
            "asked 5 %; with 3 stable pods the nearest is 25 % (1 canary pod)"
        );
        assert_eq!(
            PodShare::nearest(3, w("25")).to_string(),
            "25 % (1 canary pod beside 3 stable pods)"
        );
    }

    #[test]
    fn nearest_shares() {
        assert_eq!(pods(3, "0"), (0, Weight::ZERO));
        assert_eq!(pods(4, "20"), (1, w("20")));
        assert_eq!(pods(4, "50"), (4, w("50")));
        assert_eq!(
            pods(4, "100"),
            (4, w("50")),
            "never more canary than stable pods"
        );
        assert_eq!(pods(10, "10"), (1, w("9.09")));
        assert_eq!(pods(9, "10"), (1, w("10")));
        assert_eq!(pods(3, "40"), (2, w("40")));
        assert_eq!(pods(1, "0.01"), (1, w("50")));
        assert_eq!(
            pods(0, "5"),
            (1, Weight::FULL),
            "no stable pods: the canary takes all"
        );
        assert_eq!(pods(100, "33"), (49, w("32.89")));
        // With 2 stable pods 1 canary pod is 33.33 %, 2 are 50 %: the midpoint is 41.665 %.
        assert_eq!(pods(2, "41.66").0, 1);
        assert_eq!(pods(2, "41.67").0, 2);
    }

    #[test]
    fn the_nearest_is_nearest_for_every_weight_and_size() {
        for stable in 0..=12u64 {
            for bp in (0..=10_000u16).step_by(7) {
                let asked = Weight::from_basis_points(bp).unwrap();
                let chosen = PodShare::nearest(stable, asked);
                let distance = |c: u64| {
                    let total = (stable + c) as f64;
                    (c as f64 / total - f64::from(bp) / 10_000.0).abs()
                };
                if bp == 0 {
                    assert_eq!(chosen.canary_pods, 0);
                    continue;
                }
                for c in 1..=stable.max(1) {
                    assert!(
                        distance(chosen.canary_pods) <= distance(c) + 1e-12,
                        "stable {stable}, asked {asked}: {} pods, but {c} is nearer",
                        chosen.canary_pods
                    );
                }
            }
        }
    }

    #[test]
    fn unmet_steps_are_named() {
        let steps = vec![
            Step::SetWeight(w("5")),
            Step::PauseUntilPromoted,
            Step::SetWeight(w("25")),
            Step::SetWeight(w("100")),
        ];
        let unmet: Vec<usize> = unmet_steps(&steps, 3).iter().map(|(i, _)| *i).collect();
        assert_eq!(unmet, vec![0, 3]);
    }
}
