//! The providers whose API keys the broker adds on the way out. Adding one
//! is an entry in [`PROVIDERS`] (and its host names in the default
//! allowlist).

/// How a key goes into a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Auth {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// A header of the provider's own: `NAME: KEY`.
    Header(&'static str),
}

#[derive(Debug)]
pub struct Provider {
    /// The route in the gateway (`http://127.0.0.1:3128/<name>/…`) and the
    /// name in config (`upstreams:`) and `status`.
    pub name: &'static str,
    /// Where requests go, unless `upstreams:` says otherwise.
    pub upstream: &'static str,
    /// Host variables that hold the key, the first set one used, and how
    /// each goes into requests.
    pub keys: &'static [(&'static str, Auth)],
    /// The session variable that points the agent at the gateway, and the
    /// path added to the route in it (the clients' conventions differ on
    /// whether `/v1` belongs to the base URL).
    pub base_url: (&'static str, &'static str),
    /// Session variables that must hold a key for the agent to start: they
    /// get a placeholder, which the gateway replaces.
    pub placeholders: &'static [&'static str],
}

/// What sessions see where an agent insists on a key.
pub const PLACEHOLDER: &str = "agent-vm-brokered";

pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "anthropic",
        upstream: "https://api.anthropic.com",
        keys: &[("ANTHROPIC_API_KEY", Auth::Header("x-api-key")), ("ANTHROPIC_AUTH_TOKEN", Auth::Bearer)],
        base_url: ("ANTHROPIC_BASE_URL", ""),
        // Claude Code takes an AUTH_TOKEN without asking (an API key it
        // has not seen needs an interactive approval).
        placeholders: &["ANTHROPIC_AUTH_TOKEN"],
    },
    Provider {
        name: "openai",
        upstream: "https://api.openai.com",
        keys: &[("OPENAI_API_KEY", Auth::Bearer)],
        base_url: ("OPENAI_BASE_URL", "/v1"),
        placeholders: &["OPENAI_API_KEY"],
    },
    Provider {
        name: "gemini",
        upstream: "https://generativelanguage.googleapis.com",
        keys: &[("GEMINI_API_KEY", Auth::Header("x-goog-api-key")), ("GOOGLE_API_KEY", Auth::Header("x-goog-api-key"))],
        base_url: ("GOOGLE_GEMINI_BASE_URL", ""),
        placeholders: &["GEMINI_API_KEY"],
    },
    Provider {
        name: "openrouter",
        upstream: "https://openrouter.ai/api",
        keys: &[("OPENROUTER_API_KEY", Auth::Bearer)],
        base_url: ("OPENROUTER_BASE_URL", "/v1"),
        placeholders: &["OPENROUTER_API_KEY"],
    },
];

pub fn find(name: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().find(|p| p.name == name)
}

/// Every host variable that holds a provider's key.
pub fn key_variables() -> impl Iterator<Item = &'static str> {
    PROVIDERS.iter().flat_map(|p| p.keys.iter().map(|(v, _)| *v))
}

impl Provider {
    /// The key to use and how, from `lookup` (variable → value).
    pub fn key(&self, lookup: impl Fn(&str) -> Option<String>) -> Option<(String, Auth)> {
        self.keys.iter().find_map(|(var, auth)| lookup(var).filter(|v| !v.is_empty()).map(|v| (v, *auth)))
    }

    /// Every variable a brokered session must not get from the host: the
    /// keys, the base URL and the placeholders.
    pub fn variables(&self) -> impl Iterator<Item = &'static str> {
        self.keys.iter().map(|(v, _)| *v).chain([self.base_url.0]).chain(self.placeholders.iter().copied())
    }
}
