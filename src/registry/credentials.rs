//! Credentials for registry hosts, held the way docker and containerd clients hold them.
//!
//! The source is a docker `config.json` (`[registry] docker_config`, else
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), re-read whenever a registry asks
//! for authentication. For a host (`host[:port]`; Docker Hub's aliases are one host), in order:
//! - its `credHelpers` entry: a credential helper, run as `docker-credential-<name> get` with
//!   the server URL on stdin, answering `{"ServerURL","Username","Secret"}` (Username `<token>`:
//!   Secret is an identity token), or "credentials not found" (anonymous);
//! - else its `auths` entry, if it holds credentials: `identitytoken` (an OAuth2 refresh token),
//!   `auth` (base64 `user:password`), `username`/`password`, `registrytoken` (a bearer token);
//! - else `credsStore`, a helper as above;
//! - else anonymous.
//!
//! Helpers are looked up in the directories of `$PATH` as it was when the store was made
//! (absolute entries only), run with a deadline ([`HELPER_TIMEOUT`]) and an output cap
//! ([`MAX_HELPER_OUTPUT`]), killed (their whole process group) past either, and their answers
//! kept [`HELPER_ANSWER_TTL`] per (helper, host) so a helper is not run for every request;
//! [`CredentialStore::forget`] drops them after an authentication failure.
//!
//! A host's own helper wins, as in docker; `auths` credentials come before the default store so
//! that a config that worked before helpers were supported means the same now (docker keeps
//! `{}` there for the hosts whose credentials are in its store, so for its configs the order
//! agrees).
//!
//! Secrets never appear in errors, logs or `Debug` output.

use super::normalize_registry_host;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

/// A credential helper that has not answered by then is killed.
pub(crate) const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// A helper writing more than this to stdout is killed.
pub(crate) const MAX_HELPER_OUTPUT: usize = 64 << 10;
/// A helper's answer is reused this long for the same host.
pub(crate) const HELPER_ANSWER_TTL: Duration = Duration::from_secs(60);
/// A helper's failure is reused this long (requests queued behind a hanging helper fail at
/// once instead of each waiting out its own timeout).
const HELPER_FAILURE_TTL: Duration = Duration::from_secs(5);
/// Cached helper answers kept before the stale ones are dropped.
const MAX_HELPER_ANSWERS: usize = 256;
/// The server URL docker keeps Docker Hub's credentials under, which is what its helpers know.
const DOCKER_HUB_SERVER_URL: &str = "https://index.docker.io/v1/";
/// The Username a helper answers with when its Secret is an identity token.
const IDENTITY_TOKEN_USERNAME: &str = "<token>";

// -------------------------------------------------------------------------------- credential

/// What to authenticate to one registry host with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    Anonymous,
    /// Sent as `Authorization: Basic`, to the registry or its token realm.
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken`, or a helper's `<token>` answer): exchanged at
    /// the token realm (`grant_type=refresh_token`) for an access token; never sent as Basic.
    IdentityToken(String),
    /// A bearer token sent to the registry as it is (`registrytoken`).
    RegistryToken(String),
}

impl Credential {
    pub(crate) fn is_anonymous(&self) -> bool {
        matches!(self, Credential::Anonymous)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Anonymous => f.write_str("Anonymous"),
            Credential::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

// ------------------------------------------------------------------------------------ errors

/// Why the credentials of a host could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: auths.{key:?}: {what}", path.display())]
    BadEntry {
        path: PathBuf,
        key: String,
        what: String,
    },
    #[error("{}: {field} names credential helper {name:?}: {why}", path.display())]
    BadHelperName {
        path: PathBuf,
        field: String,
        name: String,
        why: &'static str,
    },
    #[error("credential helper docker-credential-{helper} ({field} in {}) for {host}: {failure}", path.display())]
    Helper {
        helper: String,
        field: String,
        path: PathBuf,
        host: String,
        failure: Box<HelperFailure>,
    },
}

/// How running a credential helper went wrong. Never carries what the helper printed as an
/// answer (it may be a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HelperFailure {
    #[error("not found in the helper search path ({dirs})")]
    NotFound { dirs: String },
    #[error("could not be started: {0}")]
    Spawn(String),
    #[error("talking to it: {0}")]
    Io(String),
    #[error("no answer within {0:?} (killed)")]
    TimedOut(Duration),
    #[error("wrote more than {0} bytes (killed)")]
    TooMuchOutput(usize),
    #[error("exited with {status}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Exited {
        status: String,
        message: Option<String>,
    },
    #[error("answered something that is not {{\"Username\", \"Secret\"}} JSON ({0})")]
    BadAnswer(String),
}

// ------------------------------------------------------------------------------- config file

/// A docker `config.json`, the parts about credentials.
#[derive(Deserialize, Default)]
pub(crate) struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(rename = "registrytoken")]
    registry_token: Option<String>,
    #[serde(rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Where a host's credentials are, per the config.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// In the file (`Anonymous`: nowhere).
    Found(Credential),
    /// With credential helper `docker-credential-<name>`, named by `field` (`credHelpers` or
    /// `credsStore`).
    Helper { name: String, field: String },
}

impl DockerConfig {
    /// Parses the text of the config at `path` (named in errors).
    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<DockerConfig, CredentialError> {
        serde_json::from_slice(text).map_err(|source| CredentialError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Where the credentials of `host` (`host[:port]`, `docker.io` for Docker Hub) are.
    pub(crate) fn lookup(&self, path: &Path, host: &str) -> Result<Lookup, CredentialError> {
        let want = normalize_registry_host(host);
        let own_helper = self
            .cred_helpers
            .iter()
            .find(|(k, _)| normalize_registry_host(k) == want)
            .map(|(key, name)| (name, format!("credHelpers.{key:?}")));
        if own_helper.is_none() {
            if let Some((key, entry)) = self
                .auths
                .iter()
                .find(|(k, _)| normalize_registry_host(k) == want)
            {
                let credential = entry
                    .credential()
                    .map_err(|what| CredentialError::BadEntry {
                        path: path.to_owned(),
                        key: key.clone(),
                        what,
                    })?;
                if !credential.is_anonymous() {
                    return Ok(Lookup::Found(credential));
                }
            }
        }
        let helper = own_helper.or_else(|| {
            self.creds_store
                .as_ref()
                .filter(|n| !n.is_empty())
                .map(|n| (n, "credsStore".to_owned()))
        });
        let Some((name, field)) = helper else {
            return Ok(Lookup::Found(Credential::Anonymous));
        };
        check_helper_name(name).map_err(|why| CredentialError::BadHelperName {
            path: path.to_owned(),
            field: field.clone(),
            name: name.clone(),
            why,
        })?;
        Ok(Lookup::Helper {
            name: name.clone(),
            field,
        })
    }
}

/// A docker-style `auth` value (base64 of `user:password`, padded or not) as Basic credentials.
pub(crate) fn basic_from_auth(auth: &str) -> Result<Credential, String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth))
        .map_err(|e| format!("auth is not base64: {e}"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_owned())?;
    let (user, pass) = decoded
        .split_once(':')
        .ok_or_else(|| "auth is not base64 of user:password".to_owned())?;
    Ok(Credential::Basic {
        username: user.to_owned(),
        password: pass.to_owned(),
    })
}

impl AuthEntry {
    fn credential(&self) -> Result<Credential, String> {
        // First, as containerd does: `docker login` to an OAuth registry writes a placeholder
        // `auth` beside it that is no password.
        if let Some(t) = self.identity_token.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Credential::IdentityToken(t.clone()));
        }
        if let Some(auth) = self
            .auth
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            return basic_from_auth(auth);
        }
        if let (Some(user), Some(pass)) = (&self.username, &self.password) {
            if !user.is_empty() {
                return Ok(Credential::Basic {
                    username: user.clone(),
                    password: pass.clone(),
                });
            }
        }
        if let Some(token) = self.registry_token.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Credential::RegistryToken(token.clone()));
        }
        Ok(Credential::Anonymous)
    }
}

/// A helper name from a config becomes part of a file name looked up in trusted directories:
/// it may not be a path, nor anything unusual.
fn check_helper_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.contains('/') || name.contains('\\') {
        return Err("a helper name is not a path (no /)");
    }
    if name.contains("..") {
        return Err("a helper name may not contain ..");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
    {
        return Err("a helper name has only letters, digits, '-', '_', '.' and '+'");
    }
    Ok(())
}

/// The server URL a helper is asked about for `host`.
fn helper_server_url(host: &str) -> String {
    if normalize_registry_host(host) == "docker.io" {
        DOCKER_HUB_SERVER_URL.to_owned()
    } else {
        host.to_owned()
    }
}

// ------------------------------------------------------------------------------------- store

/// Where helpers are looked for and how long they may take.
#[derive(Clone, Debug)]
pub(crate) struct HelperSetup {
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) timeout: Duration,
}

impl HelperSetup {
    /// The absolute directories of `$PATH` now, and [`HELPER_TIMEOUT`].
    pub(crate) fn from_env() -> HelperSetup {
        let path = std::env::var_os("PATH").unwrap_or_default();
        HelperSetup {
            dirs: std::env::split_paths(&path)
                .filter(|d| d.is_absolute())
                .collect(),
            timeout: HELPER_TIMEOUT,
        }
    }

    fn find(&self, program: &str) -> Result<PathBuf, HelperFailure> {
        use std::os::unix::fs::PermissionsExt as _;
        self.dirs
            .iter()
            .map(|d| d.join(program))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| HelperFailure::NotFound {
                dirs: std::env::join_paths(&self.dirs)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| format!("{:?}", self.dirs)),
            })
    }
}

/// One helper's answer for one host, and when it was had.
struct Answer {
    at: Instant,
    result: Result<Credential, HelperFailure>,
}

impl Answer {
    fn fresh(&self) -> bool {
        let ttl = if self.result.is_ok() {
            HELPER_ANSWER_TTL
        } else {
            HELPER_FAILURE_TTL
        };
        self.at.elapsed() < ttl
    }
}

type AnswerSlot = Arc<tokio::sync::Mutex<Option<Answer>>>;

/// The credentials of registry hosts: the docker config re-read on every question, helpers'
/// answers kept briefly. Send + Sync; one per [`super::Registry`].
pub(crate) struct CredentialStore {
    config: Option<PathBuf>,
    helpers: Mutex<HelperSetup>,
    /// By (helper name, normalised host); a slot's lock makes one run at a time per key.
    answers: Mutex<HashMap<(String, String), AnswerSlot>>,
}

impl CredentialStore {
    /// Credentials from the docker config at `config` (`None` or no file: anonymous).
    pub(crate) fn new(config: Option<PathBuf>, helpers: HelperSetup) -> CredentialStore {
        CredentialStore {
            config,
            helpers: Mutex::new(helpers),
            answers: Mutex::new(HashMap::new()),
        }
    }

    /// Uses these helper directories and timeout from now on (tests: no change to `$PATH`).
    #[cfg(test)]
    pub(crate) fn set_helpers(&self, helpers: HelperSetup) {
        *self.helpers.lock().unwrap_or_else(|e| e.into_inner()) = helpers;
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn read_config(&self) -> Result<Option<(&Path, DockerConfig)>, CredentialError> {
        let Some(path) = self.config.as_deref() else {
            return Ok(None);
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CredentialError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Ok(Some((path, DockerConfig::parse(&text, path)?)))
    }

    /// The credentials for `host` (`host[:port]` as in an image reference or a mirror URL).
    pub(crate) async fn get(&self, host: &str) -> Result<Credential, CredentialError> {
        let Some((path, config)) = self.read_config()? else {
            return Ok(Credential::Anonymous);
        };
        let (name, field) = match config.lookup(path, host)? {
            Lookup::Found(c) => return Ok(c),
            Lookup::Helper { name, field } => (name, field),
        };
        self.ask_helper(&name, host)
            .await
            .map_err(|failure| CredentialError::Helper {
                helper: name,
                field,
                path: path.to_owned(),
                host: host.to_owned(),
                failure: Box::new(failure),
            })
    }

    /// Forgets the helpers' answers for `host`: the next question runs the helper again.
    pub(crate) fn forget(&self, host: &str) {
        let host = normalize_registry_host(host);
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, h), _| *h != host);
    }

    /// Where the credentials for `host` come from, for messages: the config file, or the
    /// helper it names.
    pub(crate) fn source_name(&self, host: &str) -> String {
        let Some(path) = &self.config else {
            return "(no docker config.json)".into();
        };
        match self.read_config() {
            Ok(Some((_, config))) => match config.lookup(path, host) {
                Ok(Lookup::Helper { name, field }) => format!(
                    "credential helper docker-credential-{name} ({field} in {})",
                    path.display()
                ),
                _ => path.display().to_string(),
            },
            _ => path.display().to_string(),
        }
    }

    async fn ask_helper(&self, name: &str, host: &str) -> Result<Credential, HelperFailure> {
        let slot = {
            let mut map = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_HELPER_ANSWERS {
                // Image references name the hosts: drop the stale answers nobody waits on.
                map.retain(|_, s| {
                    Arc::strong_count(s) > 1
                        || s.try_lock()
                            .is_ok_and(|a| a.as_ref().is_some_and(Answer::fresh))
                });
            }
            map.entry((name.to_owned(), normalize_registry_host(host)))
                .or_default()
                .clone()
        };
        let mut answer = slot.lock().await;
        if let Some(a) = answer.as_ref().filter(|a| a.fresh()) {
            return a.result.clone();
        }
        let setup = self
            .helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let program = format!("docker-credential-{name}");
        let result = match setup.find(&program) {
            Ok(exe) => {
                log::debug!("asking {} for the credentials of {host}", exe.display());
                run_helper(&exe, &helper_server_url(host), setup.timeout).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            log::warn!("credential helper {program} for {host}: {e}");
        }
        *answer = Some(Answer {
            at: Instant::now(),
            result: result.clone(),
        });
        result
    }
}

// ------------------------------------------------------------------------------- token grant

/// The `client_id` of our OAuth2 grants.
const OAUTH_CLIENT_ID: &str = "ovbd";

/// The OAuth2 `refresh_token` grant (RFC 6749 section 6) that docker and containerd POST to a
/// token realm for an identity token; the answer is a token response (`access_token`).
pub(crate) fn refresh_token_grant(
    client: &reqwest::Client,
    realm: reqwest::Url,
    service: Option<&str>,
    scope: &str,
    refresh_token: &str,
) -> reqwest::RequestBuilder {
    let mut form = vec![("grant_type", "refresh_token")];
    if let Some(s) = service {
        form.push(("service", s));
    }
    form.extend([
        ("scope", scope),
        ("client_id", OAUTH_CLIENT_ID),
        ("refresh_token", refresh_token),
    ]);
    client.post(realm).form(&form)
}

// ------------------------------------------------------------------------------------ helper

/// The helper protocol's answer to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Kills a helper's process group unless disarmed: the helper (the group leader) has not been
/// waited for while armed, so the group id cannot have been reused.
struct KillGroup(Option<i32>);

impl KillGroup {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory use.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `exe get` with `server_url` on stdin, at most `timeout`, reading at most
/// [`MAX_HELPER_OUTPUT`] bytes of its stdout (stderr is discarded: the protocol answers and
/// errs on stdout).
// The docker_credential crate runs helpers found on the process's PATH, without a timeout or an
// output cap, blocking, and puts their output in its errors: not for a daemon.
async fn run_helper(
    exe: &Path,
    server_url: &str,
    timeout: Duration,
) -> Result<Credential, HelperFailure> {
    let mut child = tokio::process::Command::new(exe)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HelperFailure::Spawn(e.to_string()))?;
    // Declared after `child`: dropped (the group killed) before it, if the caller gives up.
    let mut group = KillGroup(child.id().and_then(|id| i32::try_from(id).ok()));
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let talk = async {
        if let Some(mut stdin) = stdin.take() {
            // A helper that does not read its stdin may have closed it: not an error yet.
            let _ = stdin.write_all(server_url.as_bytes()).await;
        }
        let mut out = Vec::new();
        if let Some(stdout) = stdout.take() {
            stdout
                .take(MAX_HELPER_OUTPUT as u64 + 1)
                .read_to_end(&mut out)
                .await
                .map_err(|e| HelperFailure::Io(e.to_string()))?;
        }
        if out.len() > MAX_HELPER_OUTPUT {
            return Err(HelperFailure::TooMuchOutput(MAX_HELPER_OUTPUT));
        }
        let status = child
            .wait()
            .await
            .map_err(|e| HelperFailure::Io(e.to_string()))?;
        Ok((status, out))
    };
    let (status, out) = match tokio::time::timeout(timeout, talk).await {
        Ok(Ok(done)) => {
            // Waited for: the group id may be reused from now on.
            group.0 = None;
            done
        }
        Ok(Err(e)) => {
            group.kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            return Err(e);
        }
        Err(_) => {
            group.kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            return Err(HelperFailure::TimedOut(timeout));
        }
    };
    interpret_answer(status, &out)
}

/// What a helper's exit status and stdout mean.
fn interpret_answer(
    status: std::process::ExitStatus,
    out: &[u8],
) -> Result<Credential, HelperFailure> {
    let text = String::from_utf8_lossy(out);
    let text = text.trim();
    if !status.success() {
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(Credential::Anonymous);
        }
        // The protocol's error message is on stdout; an answer-like output is withheld (a
        // buggy helper may print the secret and fail).
        let message = text
            .lines()
            .next()
            .filter(|l| !l.is_empty() && !text.starts_with('{'))
            .map(|l| l.chars().take(200).collect::<String>());
        return Err(HelperFailure::Exited {
            status: status.to_string(),
            message,
        });
    }
    let answer: HelperAnswer = serde_json::from_slice(out).map_err(|e| {
        // Not e's text: it may quote the secret.
        HelperFailure::BadAnswer(format!(
            "{:?} at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, s) if s.is_empty() => Credential::Anonymous,
        (IDENTITY_TOKEN_USERNAME, s) => Credential::IdentityToken(s),
        (u, s) => Credential::Basic {
            username: u.to_owned(),
            password: s,
        },
    })
}

#[cfg(test)]
mod tests;
