//! Authentication: `WWW-Authenticate` challenges, bearer tokens, Basic credentials.

use super::*;

// -------------------------------------------------------------------------------- challenges

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// The `Bearer` and `Basic` challenges of `WWW-Authenticate` header values (RFC 7235:
/// `scheme param=value, param="quoted \" value", other-scheme ...`). Unknown schemes, token68
/// forms and malformed parts are skipped; never panics.
// Not the http-auth crate: its parser stops at the first token68 (`Negotiate abc==`), non-ASCII
// byte or double space after a scheme, losing the challenges after it.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for v in values {
        for (scheme, params) in split_challenges(v) {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                    .map(|(_, pv)| pv.clone())
            };
            if scheme.eq_ignore_ascii_case("bearer") {
                if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                    out.push(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                out.push(Challenge::Basic);
            }
        }
    }
    out
}

/// `(scheme, [(param, value)])` of each challenge in one header value.
pub(super) fn split_challenges(v: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = v.as_bytes();
    let mut i = 0;
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let is_delim = |c: u8| c.is_ascii_whitespace() || c == b',' || c == b'=' || c == b'"';
    while i < b.len() {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        if b[i] == b'=' || b[i] == b'"' {
            // Stray: a token68's padding or garbage. Skip one byte (ASCII, a char boundary).
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_delim(b[i]) {
            i += 1;
        }
        // Every delimiter is ASCII, so `start` and `i` are char boundaries.
        let token = &v[start..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' {
            // A parameter of the current challenge.
            j += 1;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let mut value = String::new();
            if j < b.len() && b[j] == b'"' {
                j += 1;
                let mut seg = j;
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' && j + 1 < b.len() {
                        value.push_str(&v[seg..j]);
                        // The escaped char may be multi-byte: take the whole char.
                        let ch = v[j + 1..].chars().next().unwrap_or('\\');
                        value.push(ch);
                        j += 1 + ch.len_utf8();
                        seg = j;
                        continue;
                    }
                    j += 1;
                }
                value.push_str(&v[seg..j.min(b.len())]);
                j = (j + 1).min(b.len());
            } else {
                let vs = j;
                while j < b.len() && !(b[j].is_ascii_whitespace() || b[j] == b',') {
                    j += 1;
                }
                value.push_str(&v[vs..j]);
            }
            if let Some(last) = out.last_mut() {
                last.1.push((token.to_owned(), value));
            }
            i = j;
        } else {
            out.push((token.to_owned(), Vec::new()));
            i = j;
        }
    }
    out
}

// ------------------------------------------------------------------------------------- auth

/// What we send to one (endpoint, repository), and how we got it.
#[derive(Default)]
pub(super) struct AuthSlot {
    /// The `Authorization` value; `None`: anonymous.
    pub(super) header: Option<String>,
    /// When a bearer token stops being good (`expires_in`).
    pub(super) expires: Option<Instant>,
    /// The challenge that made us authenticate (to refresh without a 401 first).
    pub(super) challenge: Option<Challenge>,
    /// Bumped on every change: a request that got 401 with an older generation retries with
    /// the newer credentials instead of authenticating again.
    pub(super) generation: u64,
}

#[derive(serde::Deserialize)]
pub(super) struct TokenResponse {
    pub(super) token: Option<String>,
    pub(super) access_token: Option<String>,
    pub(super) expires_in: Option<u64>,
}

pub(super) fn basic_header(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// What a request needs of a repository: a token for `pull` serves reads, `pull,push` uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Access {
    Pull,
    Push,
}

impl Access {
    /// The actions of a token scope (`repository:NAME:ACTIONS`).
    pub(super) fn actions(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        }
    }
}

impl Inner {
    pub(super) fn slot(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        grant: Option<&Grant>,
    ) -> Arc<tokio::sync::Mutex<AuthSlot>> {
        let key = (
            ep.base.as_str().to_owned(),
            repo.to_owned(),
            access,
            grant.map(|g| g.id),
        );
        let mut map = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    }

    /// The credentials for `repo` on `ep`: `grant` (the CRI pull secret bound to the layer
    /// read), else the docker config.json read now, or its helper's answer.
    pub(super) async fn credentials(
        &self,
        ep: &Endpoint,
        repo: &str,
        grant: Option<&Grant>,
    ) -> Result<Credential, RegistryError> {
        if let Some(g) = grant {
            log::info!(
                "{}: authenticating for {repo} with the credentials of a CRI PullImage",
                ep.label()
            );
            return Ok(g.credential.clone());
        }
        self.creds
            .get(&ep.cred_host)
            .await
            .map_err(|e| RegistryError::Denied(format!("credentials for {}: {e}", ep.cred_host)))
    }

    /// Where `ep`'s credentials come from: the config file, or the helper it names.
    pub(super) fn config_name(&self, ep: &Endpoint) -> String {
        self.creds.source_name(&ep.cred_host)
    }

    /// Authenticates to `ep` for `repo` after `challenge`: fills `slot`.
    pub(super) async fn authenticate(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        grant: Option<&Grant>,
        challenge: &Challenge,
        slot: &mut AuthSlot,
    ) -> Result<(), RegistryError> {
        let creds = self.credentials(ep, repo, grant).await?;
        let (header, expires) = match (challenge, &creds) {
            (_, Credential::RegistryToken(token)) => (format!("Bearer {token}"), None),
            (Challenge::Basic, Credential::Basic { username, password }) => {
                (basic_header(username, password), None)
            }
            (Challenge::Basic, Credential::Anonymous | Credential::IdentityToken(_)) => {
                // A refused or missing credential: the helper is asked again next time.
                self.creds.forget(&ep.cred_host);
                return Err(RegistryError::Denied(format!(
                    "{} wants Basic credentials and {} has none for {}{}",
                    ep.label(),
                    self.config_name(ep),
                    ep.cred_host,
                    if creds.is_anonymous() {
                        ""
                    } else {
                        " (only an identity token, which goes to a Bearer token realm)"
                    }
                )));
            }
            (
                Challenge::Bearer {
                    realm,
                    service,
                    scope: _,
                },
                creds,
            ) => {
                let (token, expires) = self
                    .fetch_token(ep, repo, access, realm, service, creds)
                    .await
                    .inspect_err(|_| self.creds.forget(&ep.cred_host))?;
                (format!("Bearer {token}"), expires)
            }
        };
        slot.header = Some(header);
        slot.expires = expires;
        slot.challenge = Some(challenge.clone());
        slot.generation += 1;
        Ok(())
    }

    pub(super) async fn fetch_token(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        realm: &str,
        service: &Option<String>,
        creds: &Credential,
    ) -> Result<(String, Option<Instant>), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| {
            RegistryError::InvalidResponse(format!(
                "{}: bad token realm {:?}: {e}",
                ep.label(),
                redact_str(realm)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(RegistryError::InvalidResponse(format!(
                "{}: token realm {} is not http(s)",
                ep.label(),
                redact(&url)
            )));
        }
        // The realm as given: an identity token's grant is POSTed there, in a form.
        let realm_url = url.clone();
        let scope = format!("repository:{repo}:{}", access.actions());
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &scope);
        }
        let trusted = self
            .policy
            .check(&url, ep.base.scheme() == "https")
            .map_err(|why| {
                RegistryError::Refused(format!(
                    "{}: token realm {}: {why}",
                    ep.label(),
                    redact(&url)
                ))
            })?;
        let client = if trusted {
            &self.trusted_client
        } else {
            &self.client
        };
        // Credentials only to the registry's own host, or a realm configured for them.
        let withheld = matches!(
            creds,
            Credential::Basic { .. } | Credential::IdentityToken(_)
        ) && !self.policy.creds_may_go_to(ep, &url);
        if withheld {
            log::warn!(
                "{}: token realm {} is not on the registry's host: asking it without the \
                 credentials for {} (see [registry.auth_realms])",
                ep.label(),
                redact(&url),
                ep.cred_host
            );
        }
        let (rb, what) = match (withheld, creds) {
            (false, Credential::Basic { username, password }) => (
                client
                    .get(url.clone())
                    .header(header::AUTHORIZATION, basic_header(username, password)),
                format!("token from {}", redact(&url)),
            ),
            (false, Credential::IdentityToken(refresh_token)) => (
                credentials::refresh_token_grant(
                    client,
                    realm_url.clone(),
                    service.as_deref(),
                    &scope,
                    refresh_token,
                ),
                format!("token from {} (refresh_token grant)", redact(&realm_url)),
            ),
            _ => (
                client.get(url.clone()),
                format!("token from {}", redact(&url)),
            ),
        };
        self.token_requests.fetch_add(1, Relaxed);
        let mut resp = tokio::time::timeout(self.stall, rb.send())
            .await
            .map_err(|_| {
                RegistryError::transient(format!("{what}: no answer within {:?}", self.stall))
            })?
            .map_err(|e| http_failure(&what, e))?;
        let status = resp.status();
        if !status.is_success() {
            let msg = format!(
                "{what}: HTTP {status}{}",
                if withheld {
                    format!(
                        " (the credentials for {} in {} were not sent: the realm is not on \
                         the registry's host, and [registry.auth_realms] does not name it for \
                         {})",
                        ep.cred_host,
                        self.config_name(ep),
                        normalize_registry_host(&ep.cred_host)
                    )
                } else if creds.is_anonymous() {
                    format!(
                        " (anonymous: {} has no credentials for {})",
                        self.config_name(ep),
                        ep.cred_host
                    )
                } else if matches!(creds, Credential::IdentityToken(_)) {
                    format!(
                        " (with the identity token for {} from {})",
                        ep.cred_host,
                        self.config_name(ep)
                    )
                } else {
                    format!(
                        " (with the credentials for {} in {})",
                        ep.cred_host,
                        self.config_name(ep)
                    )
                }
            );
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    RegistryError::Transient {
                        msg,
                        retry_after: retry_after(resp.headers()),
                    }
                } else {
                    RegistryError::Denied(msg)
                },
            );
        }
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(self.stall, resp.chunk())
                .await
                .map_err(|_| RegistryError::transient(format!("{what}: stalled")))?
                .map_err(|e| http_failure(&what, e))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                return Err(RegistryError::InvalidResponse(format!(
                    "{what}: response larger than {MAX_TOKEN_RESPONSE} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::InvalidResponse(format!("{what}: not a token response: {e}"))
        })?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                RegistryError::InvalidResponse(format!(
                    "{what}: neither token nor access_token in the response"
                ))
            })?;
        let expires = parsed.expires_in.filter(|&s| s > 0).map(|s| {
            let life = Duration::from_secs(s.min(86400 * 365));
            Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(life / 2)
        });
        Ok((token, expires))
    }

    /// The `Authorization` to send to `ep` for `repo` now (refreshing an expired token first)
    /// and the slot's generation.
    pub(super) async fn current_auth(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        grant: Option<&Grant>,
        slot: &tokio::sync::Mutex<AuthSlot>,
    ) -> Result<(Option<String>, u64), RegistryError> {
        let mut s = slot.lock().await;
        if s.expires.is_some_and(|e| Instant::now() >= e) {
            match s.challenge.clone() {
                Some(c) => {
                    self.authenticate(ep, repo, access, grant, &c, &mut s)
                        .await?
                }
                None => {
                    s.header = None;
                    s.expires = None;
                    s.generation += 1;
                }
            }
        }
        Ok((s.header.clone(), s.generation))
    }

    /// Sends `req` to `url` on `ep` for `repo` with the credentials it takes: anonymously
    /// first, then after a `401` with the token or Basic credentials its challenge asks for
    /// (once; a `401` after that is a refusal). Returns the response and whether it came from
    /// another origin than `url`'s (a redirect).
    pub(super) async fn authorized(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        requests: &AtomicU64,
        req: &Request,
        url: &Url,
    ) -> Result<(reqwest::Response, bool), RegistryError> {
        self.authorized_as(ep, repo, access, None, requests, req, url)
            .await
    }

    /// [`Inner::authorized`] with `grant` (a CRI pull secret) instead of the daemon's own
    /// credentials for `ep`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn authorized_as(
        &self,
        ep: &Endpoint,
        repo: &str,
        access: Access,
        grant: Option<&Grant>,
        requests: &AtomicU64,
        req: &Request,
        url: &Url,
    ) -> Result<(reqwest::Response, bool), RegistryError> {
        let slot = self.slot(ep, repo, access, grant);
        let mut refreshed = false;
        for _ in 0..4 {
            let (auth, generation) = self.current_auth(ep, repo, access, grant, &slot).await?;
            let (resp, foreign) = self.send(requests, req, url, auth.as_deref()).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !foreign {
                let challenges = parse_challenges(
                    resp.headers()
                        .get_all(header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                let mut s = slot.lock().await;
                if s.generation != generation {
                    continue; // Someone else authenticated meanwhile: try theirs.
                }
                if refreshed {
                    return Err(RegistryError::Denied(format!(
                        "{} {}: HTTP 401 Unauthorized even after authenticating \
                         (credentials for {} from {})",
                        req.verb(),
                        redact(url),
                        ep.cred_host,
                        match grant {
                            Some(_) => "a CRI PullImage".to_owned(),
                            None => self.config_name(ep),
                        }
                    )));
                }
                let challenge = challenges
                    .iter()
                    .find(|c| matches!(c, Challenge::Bearer { .. }))
                    .or(challenges.first())
                    .cloned()
                    .ok_or_else(|| {
                        RegistryError::Denied(format!(
                            "{} {}: HTTP 401 without a Bearer or Basic challenge",
                            req.verb(),
                            redact(url)
                        ))
                    })?;
                if auth.is_some() {
                    // What we sent was refused: a credential helper is asked again.
                    self.creds.forget(&ep.cred_host);
                }
                self.authenticate(ep, repo, access, grant, &challenge, &mut s)
                    .await?;
                refreshed = true;
                continue;
            }
            return Ok((resp, foreign));
        }
        Err(RegistryError::Denied(format!(
            "{} {}: authentication did not settle",
            req.verb(),
            redact(url)
        )))
    }
}
