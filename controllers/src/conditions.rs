//! The conditions the reconcilers report, as in Kubernetes: one per
//! `type`, set with [`vmctl_api::set_condition`], which keeps
//! `lastTransitionTime` while the status stays the same.

use vmctl_api::{Condition, ConditionStatus};

/// A condition of `type_` (`Ready`, `ImageReady`, `SshReady`, …) that holds
/// when `ok`, with a CamelCase `reason`, a sentence (or nothing) as
/// `message`, for spec `generation`. `lastTransitionTime` is left to
/// [`vmctl_api::set_condition`].
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: u64,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: generation,
    }
}

/// Whether `conds` has a condition of `type_` whose status is True.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    conds
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::True)
}

/// Whether setting `cond` would change `conds` (a new condition, or
/// another status, reason, message or generation): what
/// [`vmctl_api::set_condition`] returns, without setting it.
pub fn would_change(conds: &[Condition], cond: &Condition) -> bool {
    match conds.iter().find(|c| c.type_ == cond.type_) {
        None => true,
        Some(old) => {
            old.status != cond.status
                || old.reason != cond.reason
                || old.message != cond.message
                || old.observed_generation != cond.observed_generation
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use proptest::prelude::*;
    use vmctl_api::set_condition;

    use super::*;

    fn arb_condition() -> impl Strategy<Value = Condition> {
        (
            prop::sample::select(vec!["Ready", "ImageReady"]),
            any::<bool>(),
            prop::sample::select(vec!["A", "B"]),
            prop::sample::select(vec!["", "m"]),
            0u64..3,
        )
            .prop_map(|(t, ok, r, m, g)| condition(t, ok, r, m, g))
    }

    proptest! {
        #[test]
        fn would_change_agrees_with_set_condition(
            before in prop::collection::vec(arb_condition(), 0..3),
            cond in arb_condition(),
        ) {
            // set_condition keeps one condition per type.
            let mut conds: Vec<Condition> = Vec::new();
            for c in before {
                set_condition(&mut conds, c, Utc::now());
            }
            let predicted = would_change(&conds, &cond);
            prop_assert_eq!(predicted, set_condition(&mut conds, cond, Utc::now()));
        }
    }

    #[test]
    fn is_true_needs_the_type_and_status_true() {
        let conds = vec![
            condition("Ready", false, "Starting", "", 1),
            condition("SshReady", true, "Connected", "", 1),
        ];
        assert!(!is_true(&conds, "Ready"));
        assert!(is_true(&conds, "SshReady"));
        assert!(!is_true(&conds, "ImageReady"));
    }
}
