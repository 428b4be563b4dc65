//! `[[webhooks]]` (CONTRACT v2): where a node pushes its events, and their
//! checks (the delivery itself is `crate::webhooks`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Webhooks per node, at most (each holds a task and one batch in memory).
pub const WEBHOOKS_MAX: usize = 16;
/// Longest URL and secret accepted.
const URL_LEN_MAX: usize = 2048;
const SECRET_LEN_MAX: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Stock,
    Sales,
    Alarms,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Stock => "stock",
            EventKind::Sales => "sales",
            EventKind::Alarms => "alarms",
        }
    }
}

fn all_events() -> Vec<EventKind> {
    vec![EventKind::Stock, EventKind::Sales, EventKind::Alarms]
}

/// `[[webhooks]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// 1-64 of a-z 0-9 - _ . ; names the webhook in batches, status and metrics.
    pub name: String,
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// HMAC-SHA256 key of the `X-Storemesh-Signature` header.
    pub secret: String,
    #[serde(default = "all_events")]
    pub events: Vec<EventKind>,
}

/// Checks `[[webhooks]]` (called from the config's validation).
pub fn check(hooks: &[WebhookConfig]) -> Result<(), String> {
    if hooks.len() > WEBHOOKS_MAX {
        return Err(format!("at most {WEBHOOKS_MAX} [[webhooks]]"));
    }
    let mut names = HashSet::new();
    for (i, h) in hooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        storemesh_protocol::ids::validate_name(&format!("{at}.name"), &h.name)?;
        if !names.insert(h.name.as_str()) {
            return Err(format!("{at}.name {:?} is used twice", h.name));
        }
        let url_ok = h.url.len() <= URL_LEN_MAX
            && reqwest::Url::parse(&h.url)
                .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .unwrap_or(false);
        if !url_ok {
            return Err(format!(
                "{at}.url must be an http:// or https:// URL of at most {URL_LEN_MAX} characters"
            ));
        }
        if h.secret.is_empty()
            || h.secret.len() > SECRET_LEN_MAX
            || h.secret.chars().any(|c| c.is_control())
        {
            return Err(format!(
                "{at}.secret must be 1-{SECRET_LEN_MAX} characters without control characters"
            ));
        }
        if h.events.is_empty() {
            return Err(format!(
                "{at}.events must list one or more of \"stock\", \"sales\", \"alarms\""
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &str, url: &str) -> WebhookConfig {
        WebhookConfig {
            name: name.into(),
            url: url.into(),
            secret: "s3cret".into(),
            events: all_events(),
        }
    }

    #[test]
    fn config_checks() {
        assert!(check(&[hook("erp", "http://127.0.0.1:9/x")]).is_ok());
        assert!(check(&[hook("erp", "https://erp.example/hook")]).is_ok());
        assert!(check(&[hook("erp", "ftp://x/")])
            .unwrap_err()
            .contains("url"));
        assert!(check(&[hook("erp", "not a url")]).is_err());
        assert!(check(&[hook("ERP", "http://x/")])
            .unwrap_err()
            .contains("name"));
        let e = check(&[hook("a", "http://x/"), hook("a", "http://y/")]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let mut h = hook("a", "http://x/");
        h.events.clear();
        assert!(check(&[h]).unwrap_err().contains("events"));
        let mut h = hook("a", "http://x/");
        h.secret.clear();
        assert!(check(&[h]).unwrap_err().contains("secret"));
    }

    #[test]
    fn events_parse_from_toml() {
        let h: WebhookConfig = toml::from_str(
            "name = \"erp\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"k\"\nevents = [\"stock\", \"alarms\"]\n",
        )
        .unwrap();
        assert_eq!(h.events, vec![EventKind::Stock, EventKind::Alarms]);
        assert!(toml::from_str::<WebhookConfig>(
            "name = \"erp\"\nurl = \"http://x/\"\nsecret = \"k\"\nevents = [\"sale\"]\n"
        )
        .is_err());
    }
}
