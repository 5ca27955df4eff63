//! GCP for the agent without GCP credentials in the VM: the broker answers
//! as the GCE metadata server does (what Google's client libraries look
//! for when `GCE_METADATA_HOST` / `GCE_METADATA_IP` name it), with
//! short-lived access tokens it mints on the host from the host's
//! application-default credentials. The refresh token and the client
//! secret never leave the host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use super::https::{self, Url};

pub const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// What the tokens are asked for and said to carry (what Vertex AI needs).
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The service account's name in answers: the VM has no real one.
const EMAIL: &str = "default";

/// The host's application-default credentials file, as provisioning finds it.
fn adc_path() -> Result<PathBuf> {
    crate::provision::adc_location().map(|(path, _)| path)
}

/// The fields of an `authorized_user` credentials file (what
/// `gcloud auth application-default login` writes).
#[derive(Deserialize)]
struct AuthorizedUser {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    refresh_token: String,
    #[serde(default)]
    quota_project_id: Option<String>,
}

/// The project sessions are told: the host's `GOOGLE_CLOUD_PROJECT`, else
/// the credentials' quota project.
pub fn project() -> Option<String> {
    if let Ok(p) = std::env::var("GOOGLE_CLOUD_PROJECT").or_else(|_| std::env::var("ANTHROPIC_VERTEX_PROJECT_ID"))
        && !p.is_empty()
    {
        return Some(p);
    }
    let text = std::fs::read(adc_path().ok()?).ok()?;
    serde_json::from_slice::<AuthorizedUser>(&text).ok()?.quota_project_id.filter(|p| !p.is_empty())
}

struct Token {
    value: String,
    expires: Instant,
}

/// Tokens minted on the host, one at a time, kept until shortly before
/// they expire.
#[derive(Default)]
pub struct Minter {
    cached: tokio::sync::Mutex<Option<Token>>,
}

/// What the token endpoint answers.
#[derive(Deserialize)]
struct Minted {
    access_token: String,
    expires_in: u64,
}

impl Minter {
    /// A token valid for a while yet, and for how many seconds. `dial`
    /// resolves and checks the token endpoint as any destination.
    pub async fn token<F, Fut>(&self, token_url: &Url, dial: F) -> Result<(String, u64)>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<std::net::SocketAddr>>>,
    {
        let mut cached = self.cached.lock().await;
        let now = Instant::now();
        if let Some(t) = cached.as_ref()
            && t.expires > now + Duration::from_secs(1)
        {
            return Ok((t.value.clone(), (t.expires - now).as_secs()));
        }
        // Read afresh each time: new host credentials apply at once.
        let path = adc_path()?;
        let text = std::fs::read(&path).with_context(|| format!("cannot read GCP credentials {}", path.display()))?;
        let adc: AuthorizedUser = serde_json::from_slice(&text)
            .with_context(|| format!("GCP credentials {} are not valid JSON", path.display()))?;
        if adc.kind != "authorized_user" {
            bail!(
                "the broker mints tokens from `authorized_user` credentials (gcloud auth application-default \
                 login); {} holds {:?}: set `credentials: copy` for it",
                path.display(),
                adc.kind
            );
        }
        // Only the scope Vertex AI needs, whatever else the login granted.
        let form = [
            ("scope", SCOPE),
            ("grant_type", "refresh_token"),
            ("client_id", &adc.client_id),
            ("client_secret", &adc.client_secret),
            ("refresh_token", &adc.refresh_token),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", crate::gateway::percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let addrs = dial(token_url.host.clone(), token_url.port).await?;
        let (status, body) = https::post_form(token_url, &addrs, "", &form).await?;
        if status != 200 {
            // The endpoint's error names the problem (an expired login); it
            // never echoes the secret back.
            let said = String::from_utf8_lossy(&body);
            bail!("the token endpoint refused ({status}): {}", crate::printable(said.trim()));
        }
        let minted: Minted =
            serde_json::from_slice(&body).map_err(|_| anyhow!("the token endpoint's answer has no access token"))?;
        // Renewed a little before it expires: five minutes, or a quarter
        // of a short lifetime.
        let margin = (minted.expires_in / 4).min(300);
        let life = Duration::from_secs(minted.expires_in.saturating_sub(margin));
        *cached = Some(Token { value: minted.access_token.clone(), expires: now + life });
        Ok((minted.access_token, life.as_secs()))
    }
}

/// An answer of the metadata server.
pub enum Answer {
    Text(String),
    Json(serde_json::Value),
    /// Needs a token.
    Token,
    NotFound,
}

/// What the metadata server answers at `path` (query removed).
pub fn route(path: &str, recursive: bool) -> Answer {
    let p = path.trim_end_matches('/');
    let sa = "/computeMetadata/v1/instance/service-accounts/default";
    match p {
        "" => Answer::Text("computeMetadata/\n".into()),
        "/computeMetadata" => Answer::Text("v1/\n".into()),
        "/computeMetadata/v1" => Answer::Text("instance/\nproject/\n".into()),
        "/computeMetadata/v1/instance" => Answer::Text("service-accounts/\n".into()),
        "/computeMetadata/v1/instance/service-accounts" => Answer::Text("default/\n".into()),
        _ if p == sa && recursive => {
            Answer::Json(serde_json::json!({ "aliases": ["default"], "email": EMAIL, "scopes": [SCOPE] }))
        }
        _ if p == sa => Answer::Text("aliases\nemail\nscopes\ntoken\n".into()),
        _ if p == format!("{sa}/email") => Answer::Text(EMAIL.into()),
        _ if p == format!("{sa}/scopes") => Answer::Text(format!("{SCOPE}\n")),
        _ if p == format!("{sa}/aliases") => Answer::Text("default\n".into()),
        _ if p == format!("{sa}/token") => Answer::Token,
        "/computeMetadata/v1/project/project-id" => match project() {
            Some(id) => Answer::Text(id),
            None => Answer::NotFound,
        },
        _ => Answer::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_paths_clients_ask_for() {
        assert!(matches!(route("/", false), Answer::Text(_)));
        assert!(matches!(route("/computeMetadata/v1/instance/service-accounts/default/token", false), Answer::Token));
        let Answer::Json(info) = route("/computeMetadata/v1/instance/service-accounts/default/", true) else {
            panic!("no recursive answer");
        };
        assert_eq!(info["email"], EMAIL);
        assert!(matches!(
            route("/computeMetadata/v1/instance/service-accounts/default/identity", false),
            Answer::NotFound
        ));
        assert!(matches!(route("/computeMetadata/v1/universe/universe-domain", false), Answer::NotFound));
        assert_eq!(crate::gateway::percent_encode("a b/c+1"), "a%20b%2Fc%2B1");
    }
}
