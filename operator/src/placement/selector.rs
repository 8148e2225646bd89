//! Label selector matching (`matchLabels` and `matchExpressions`), as the API server does it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches everything; an unknown operator
/// matches nothing (fail closed: tenancy and placement rules must never widen by mistake).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_label
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                "DoesNotExist" => !labels.contains_key(&e.key),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn operators() {
        let l = labels(&[("region", "eu-west"), ("tier", "gold")]);
        assert!(matches(&LabelSelector::default(), &l), "empty matches all");
        assert!(matches(
            &LabelSelector {
                match_labels: Some(labels(&[("tier", "gold")])),
                ..Default::default()
            },
            &l
        ));
        assert!(!matches(
            &LabelSelector {
                match_labels: Some(labels(&[("tier", "bronze")])),
                ..Default::default()
            },
            &l
        ));
        assert!(matches(&expr("region", "In", &["eu-west", "eu-south"]), &l));
        assert!(!matches(&expr("region", "NotIn", &["eu-west"]), &l));
        assert!(
            matches(&expr("zone", "NotIn", &["a"]), &l),
            "NotIn matches a missing key"
        );
        assert!(matches(&expr("tier", "Exists", &[]), &l));
        assert!(matches(&expr("zone", "DoesNotExist", &[]), &l));
        assert!(
            !matches(&expr("region", "Gt", &["1"]), &l),
            "unknown operators match nothing"
        );
    }
}
