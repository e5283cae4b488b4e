//! The controller's decision: from what it read (the Deployment's facts, fledge's own objects as
//! the watch caches show them) and the state machine's next step, the writes to make, in order.
//! Pure: the controller's apply step carries them out one by one and stops at the first that
//! cannot go on.
//!
//! The order is the contract:
//! - the Event first: it is named after the transition, so announcing it again is harmless;
//! - traffic before state: a weight is written before the state that records it, and on an abort
//!   or a rollback all traffic is back on stable before the state says so;
//! - removal in the order weight 0 (per router: the TrafficSplit or GAMMA route at 0, the user's
//!   routes restored, the pod-ratio canary scaled to 0) → canary Deployment → traffic object →
//!   Services, so that no request reaches a canary pod through a deleted split;
//! - a Deployment that leaves fledge loses its state last, so that a failed cleanup is retried;
//! - a settled Deployment whose objects are gone gets no write at all.

use crate::core::observe::DeploymentFacts;
use crate::core::rollout::RolloutState;
use crate::core::rollout::machine::{Event, Next, Target};
use crate::core::routes::{RouteExtras, SavedRules};
use crate::core::spec::{Router, Weight};

/// fledge's own objects for one Deployment, as the caches show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedObjects {
    pub canary_deployment: bool,
    pub canary_service: bool,
    /// `NAME-stable`, with the `pod-template-hash` its selector pins.
    pub stable_service: Option<Option<String>>,
}

impl OwnedObjects {
    fn any(&self) -> bool {
        self.canary_deployment || self.canary_service || self.stable_service.is_some()
    }
}

/// Everything the decision reads.
#[derive(Clone, Debug)]
pub struct World<'a> {
    pub facts: &'a DeploymentFacts,
    /// The state as stored on the Deployment.
    pub stored: Option<&'a RolloutState>,
    pub next: &'a Next,
    pub owned: OwnedObjects,
    /// `pod-template-hash` of the ReplicaSet of the Deployment's current revision.
    pub stable_pod_template_hash: Option<&'a str>,
    /// The canary has ready pods of the pending template: header routes and mirrors may point at
    /// it (no request is ever sent to a backend without ready pods).
    pub canary_ready: bool,
}

/// One write, in the order [`writes`] gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Announce(Event),
    /// The canary Deployment sized for `size`, both Services, and the traffic (the router's
    /// object, or the user's routes) at `weight` with the header routes and mirrors of `extras`.
    ApplyCanary {
        size: Weight,
        weight: Weight,
        extras: RouteExtras,
    },
    StoreState(RolloutState),
    /// Promotion: `spec.paused: false` and the hold record removed, on condition that the stored
    /// state and the template are still the ones decided on.
    Unpause,
    /// `NAME-stable` pinned to the pods that run now, before any traffic goes back to it.
    RepinStable(String),
    /// All traffic on `NAME-stable`: the router's object at weight 0 (when it exists), or the
    /// pod-ratio canary scaled to 0.
    TrafficToStable(Router),
    /// The user's HTTPRoutes get back the rules fledge saved.
    RestoreRoutes(SavedRules),
    DeleteCanaryDeployment,
    DeleteTrafficObject(Router),
    DeleteServices,
    /// `spec.paused: false` (if fledge held it) and the hold record removed.
    Release,
    /// The Deployment left fledge: its state goes, last.
    ForgetState,
    /// Nothing further can be done now: the stable ReplicaSet is not in the cache yet.
    WaitForStableReplicaSet,
}

/// The writes that take the cluster from `world` to `world.next`, in order.
pub fn writes(world: &World) -> Vec<Write> {
    let next = world.next;
    let router = &world.facts.router;
    // Once traffic is back on stable, the saved rules have been written back: the state forgets them.
    let next_state = match next.target {
        Target::Nothing => next.state.clone().map(|s| RolloutState {
            saved_routes: SavedRules::new(),
            ..s
        }),
        Target::Canary { .. } | Target::Promote => next.state.clone(),
    };
    let changed = next_state.as_ref() != world.stored;
    let mut out: Vec<Write> = next.events().cloned().map(Write::Announce).collect();
    let store = |out: &mut Vec<Write>| {
        if changed && let Some(state) = &next_state {
            out.push(Write::StoreState(state.clone()));
        }
    };
    match next.target {
        Target::Canary { size, weight } => {
            let extras = match (&world.facts.spec, &next.state) {
                (Some(spec), Some(state)) if world.canary_ready => {
                    RouteExtras::at(&spec.steps, state.step)
                }
                _ => RouteExtras::default(),
            };
            out.push(Write::ApplyCanary {
                size,
                weight,
                extras,
            });
            store(&mut out);
        }
        Target::Promote => {
            out.push(Write::ApplyCanary {
                size: Weight::FULL,
                weight: Weight::FULL,
                extras: RouteExtras::default(),
            });
            store(&mut out);
            // The unpause is conditioned on the stored state: after a state write it waits for
            // the next pass, which sees the state as stored.
            if !changed && world.facts.held {
                out.push(Write::Unpause);
            }
        }
        Target::Nothing => {
            if world.owned.any() {
                if let Some(pinned) = &world.owned.stable_service {
                    match world.stable_pod_template_hash {
                        None => {
                            out.push(Write::WaitForStableReplicaSet);
                            return out;
                        }
                        Some(hash) if pinned.as_deref() != Some(hash) => {
                            out.push(Write::RepinStable(hash.to_owned()));
                        }
                        Some(_) => {}
                    }
                }
                if router.owns_traffic_object() || *router == Router::PodRatio {
                    out.push(Write::TrafficToStable(router.clone()));
                }
            }
            if let Some(stored) = world.stored
                && !stored.saved_routes.is_empty()
            {
                out.push(Write::RestoreRoutes(stored.saved_routes.clone()));
            }
            store(&mut out);
            if world.owned.any() {
                if world.owned.canary_deployment {
                    out.push(Write::DeleteCanaryDeployment);
                }
                if router.owns_traffic_object() {
                    out.push(Write::DeleteTrafficObject(router.clone()));
                }
                out.push(Write::DeleteServices);
            }
            if world.facts.needs_release() {
                out.push(Write::Release);
            }
            if changed && next.state.is_none() {
                out.push(Write::ForgetState);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::builders::{mk_deployment, mk_hash, mk_held, mk_state};
    use crate::core::rollout::Phase;
    use crate::core::rollout::machine::Event;

    fn w(bp: u16) -> Weight {
        Weight::from_basis_points(bp).unwrap()
    }

    /// Deployment `web` running `web:2`: held against `web:1` when `held`, else unpaused.
    fn facts(held: bool) -> DeploymentFacts {
        crate::core::builders::mk_facts(&if held {
            mk_held("web:1", "web:2")
        } else {
            mk_deployment("web:2")
        })
    }

    fn state(phase: Phase, weight: Weight) -> RolloutState {
        mk_state(phase, "v2", 1, weight)
    }

    fn next(state: Option<RolloutState>, target: Target, event: bool) -> Next {
        Next {
            state,
            target,
            requeue: None,
            passed_through: Vec::new(),
            event: event.then(|| Event {
                reason: "WeightSet",
                message: "m".into(),
                warning: false,
            }),
        }
    }

    fn all_objects(pinned: &str) -> OwnedObjects {
        OwnedObjects {
            canary_deployment: true,
            canary_service: true,
            stable_service: Some(Some(pinned.into())),
        }
    }

    fn decide(
        facts: &DeploymentFacts,
        stored: Option<&RolloutState>,
        next: &Next,
        owned: OwnedObjects,
        stable: Option<&str>,
    ) -> Vec<Write> {
        writes(&World {
            facts,
            stored,
            next,
            owned,
            stable_pod_template_hash: stable,
            canary_ready: true,
        })
    }

    #[test]
    fn a_settled_deployment_costs_no_write() {
        let f = facts(false);
        let done = state(Phase::Succeeded, Weight::ZERO);
        let n = next(Some(done.clone()), Target::Nothing, false);
        assert_eq!(
            decide(&f, Some(&done), &n, OwnedObjects::default(), Some("h1")),
            vec![]
        );
        let n = next(None, Target::Nothing, false);
        assert_eq!(decide(&f, None, &n, OwnedObjects::default(), None), vec![]);
    }

    #[test]
    fn a_step_writes_the_event_then_traffic_then_state() {
        let f = facts(true);
        let before = state(Phase::Progressing, w(500));
        let after = state(Phase::Progressing, w(5000));
        let target = Target::Canary {
            size: w(5000),
            weight: w(5000),
        };
        let n = next(Some(after.clone()), target, true);
        let out = decide(&f, Some(&before), &n, all_objects("h1"), Some("h1"));
        assert!(matches!(out[0], Write::Announce(_)));
        assert_eq!(
            out[1..],
            [
                Write::ApplyCanary {
                    size: w(5000),
                    weight: w(5000),
                    extras: RouteExtras::default(),
                },
                Write::StoreState(after)
            ]
        );
    }

    #[test]
    fn an_abort_sends_traffic_back_before_its_state_then_removes_in_order() {
        let f = facts(true);
        let before = state(Phase::Paused, w(5000));
        let aborted = state(Phase::Aborted, Weight::ZERO);
        let n = next(Some(aborted.clone()), Target::Nothing, true);
        let out = decide(&f, Some(&before), &n, all_objects("h1"), Some("h1"));
        assert_eq!(
            out[1..],
            [
                Write::TrafficToStable(Router::Smi),
                Write::StoreState(aborted),
                Write::DeleteCanaryDeployment,
                Write::DeleteTrafficObject(Router::Smi),
                Write::DeleteServices,
            ]
        );
    }

    #[test]
    fn a_rollback_without_the_webhook_also_releases_the_hold() {
        // The template is v1 again, but the hold record is still there (the webhook was not called).
        let mut f = facts(true);
        f.template_hash = mk_hash("web:1");
        let before = state(Phase::Paused, w(5000));
        let rolled_back = state(Phase::RolledBack, Weight::ZERO);
        let n = next(Some(rolled_back.clone()), Target::Nothing, true);
        let out = decide(&f, Some(&before), &n, all_objects("h1"), Some("h1"));
        assert_eq!(
            out[1..],
            [
                Write::TrafficToStable(Router::Smi),
                Write::StoreState(rolled_back),
                Write::DeleteCanaryDeployment,
                Write::DeleteTrafficObject(Router::Smi),
                Write::DeleteServices,
                Write::Release,
            ]
        );
    }

    #[test]
    fn after_a_promotion_stable_is_repinned_before_traffic_goes_back() {
        let f = facts(false);
        let before = state(Phase::Promoting, Weight::FULL);
        let done = state(Phase::Succeeded, Weight::ZERO);
        let n = next(Some(done.clone()), Target::Nothing, true);
        let out = decide(&f, Some(&before), &n, all_objects("h1"), Some("h2"));
        assert_eq!(
            out[1..3],
            [
                Write::RepinStable("h2".into()),
                Write::TrafficToStable(Router::Smi)
            ]
        );
        // The new ReplicaSet not yet in the cache: nothing moves.
        let out = decide(&f, Some(&before), &n, all_objects("h1"), None);
        assert_eq!(out[1..], [Write::WaitForStableReplicaSet]);
    }

    #[test]
    fn the_unpause_follows_only_a_stored_promoting_state_of_a_held_deployment() {
        let held = facts(true);
        let promoting = state(Phase::Promoting, Weight::FULL);
        let n = next(Some(promoting.clone()), Target::Promote, false);
        let full = Write::ApplyCanary {
            size: Weight::FULL,
            weight: Weight::FULL,
            extras: RouteExtras::default(),
        };
        assert_eq!(
            decide(&held, Some(&promoting), &n, all_objects("h1"), Some("h1")),
            vec![full.clone(), Write::Unpause]
        );
        let before = state(Phase::Progressing, w(5000));
        assert_eq!(
            decide(&held, Some(&before), &n, all_objects("h1"), Some("h1")),
            vec![full.clone(), Write::StoreState(promoting.clone())]
        );
        let unpaused = facts(false);
        assert_eq!(
            decide(
                &unpaused,
                Some(&promoting),
                &n,
                all_objects("h1"),
                Some("h1")
            ),
            vec![full]
        );
    }

    #[test]
    fn leaving_fledge_forgets_the_state_last() {
        let mut f = facts(true);
        f.spec = None;
        let before = state(Phase::Paused, w(500));
        let n = next(None, Target::Nothing, true);
        let out = decide(&f, Some(&before), &n, all_objects("h1"), Some("h1"));
        assert_eq!(out.last(), Some(&Write::ForgetState));
        assert_eq!(out[out.len() - 2], Write::Release);
        assert_eq!(out[1], Write::TrafficToStable(Router::Smi));
    }
}
