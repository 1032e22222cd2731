//! Sending requests (redirects, request slots, upload watchdog), retrying operations over
//! endpoints (backoff, deadlines), and the range GET of lazily read blobs. The range GET is
//! ovbd's own rather than a registry crate's: those fetch whole blobs, not exact ranges
//! resumed after the bytes already received.

use super::*;
use std::path::PathBuf;

/// What one request sends besides its URL and `Authorization`.
pub(super) struct Request {
    pub(super) method: reqwest::Method,
    pub(super) headers: HeaderMap,
    pub(super) body: Payload,
}

/// The body of a request.
pub(super) enum Payload {
    None,
    Bytes(bytes::Bytes),
    /// A file of `size` bytes, streamed (opened again for every send).
    File {
        path: PathBuf,
        size: u64,
    },
}

impl Request {
    pub(super) fn new(method: reqwest::Method) -> Request {
        Request {
            method,
            headers: HeaderMap::new(),
            body: Payload::None,
        }
    }

    /// Adds a header (values are made by us: a bad one is a bug, skipped).
    pub(super) fn header(mut self, name: header::HeaderName, value: &str) -> Request {
        if let Ok(v) = header::HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }

    pub(super) fn body(mut self, body: Payload) -> Request {
        self.body = body;
        self
    }

    pub(super) fn verb(&self) -> &str {
        self.method.as_str()
    }

    /// Only reads follow redirects (an upload's body is not sent twice).
    fn follows_redirects(&self) -> bool {
        self.method == reqwest::Method::GET || self.method == reqwest::Method::HEAD
    }
}

/// One registry operation, tried on endpoints until it succeeds, fails for good, runs out of
/// retries or passes its deadline ([`Inner::attempt`]).
pub(super) trait Attempt: Send {
    type Output: Send;
    /// One try on `ep`.
    fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> impl Future<Output = Result<Self::Output, RegistryError>> + Send + 'a;
    /// Body bytes moved so far, over all tries (a transfer that moves on gets more time).
    fn moved(&self) -> u64 {
        0
    }
    /// Whether a try goes on from where the last one stopped (a download): one that moved
    /// bytes starts the retries budget afresh.
    fn resumes(&self) -> bool {
        false
    }
    /// What has been done, for the message of a deadline that passed.
    fn done(&self) -> Option<String> {
        None
    }
}

/// How long an operation may take ([`Inner::attempt`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Deadline {
    /// The whole operation, retries included, ends by then (reads, manifests, small requests).
    At(Instant),
    /// A transfer of a whole blob: each try is bounded by its stall timeouts (not by a
    /// deadline: a large blob takes long), the pause before the next by `timeout_secs`; a
    /// download that resumed and moved on has its retries afresh.
    Transfer,
}

impl Inner {
    /// The request slots of `ep`'s origin.
    pub(super) fn limit(&self, ep: &Endpoint) -> Arc<tokio::sync::Semaphore> {
        let key = ep.base.origin().ascii_serialization();
        let mut map = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_IDLE_LIMITS && !map.contains_key(&key) {
            // Image references name the hosts: forget the ones nobody is reading from.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        map.entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)))
            .clone()
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let exp = BACKOFF_FIRST
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(BACKOFF_MAX);
        // splitmix64 of a counter: a jitter factor in [0.5, 1).
        let mut z = self.jitter.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let frac = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        exp.mul_f64(frac)
    }

    /// Sends `req` to `url` (redirects followed for reads). Returns the final response and
    /// whether it came from another origin than `url`'s. Every hop is checked by the host
    /// policy; `Authorization` goes to `url`'s origin only.
    pub(super) async fn send(
        &self,
        requests: &AtomicU64,
        req: &Request,
        url: &Url,
        auth: Option<&str>,
    ) -> Result<(reqwest::Response, bool), RegistryError> {
        let verb = req.verb();
        let mut cur = url.clone();
        let mut from_https = false;
        let mut from: Option<Url> = None;
        for _ in 0..=MAX_REDIRECTS {
            let trusted = self.policy.check(&cur, from_https).map_err(|why| {
                let msg = match &from {
                    Some(f) => {
                        format!(
                            "{verb} {}: redirected to {}: {why}",
                            redact(f),
                            redact(&cur)
                        )
                    }
                    None => format!("{verb} {}: {why}", redact(&cur)),
                };
                RegistryError::Refused(msg)
            })?;
            from_https |= cur.scheme() == "https";
            let client = if trusted {
                &self.trusted_client
            } else {
                &self.client
            };
            let foreign = !same_origin(&cur, url);
            let mut rb = client
                .request(req.method.clone(), cur.clone())
                .headers(req.headers.clone());
            if let (false, Some(a)) = (foreign, auth) {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            let what = format!("{verb} {}", redact(&cur));
            requests.fetch_add(1, Relaxed);
            crate::metrics::metrics().registry_request(&registry_label(url));
            let resp = match &req.body {
                Payload::File { path, size } => {
                    let sent = Arc::new(AtomicU64::new(0));
                    let body = file_body(path, *size, sent.clone()).await?;
                    let rb = rb
                        .header(header::CONTENT_LENGTH, size.to_string())
                        .body(body);
                    self.send_watched(rb, &sent, *size, &what).await?
                }
                body => {
                    if let Payload::Bytes(b) = body {
                        rb = rb.body(b.clone());
                    }
                    tokio::time::timeout(self.stall, rb.send())
                        .await
                        .map_err(|_| {
                            RegistryError::transient(format!(
                                "{what}: no response within {:?}",
                                self.stall
                            ))
                        })?
                        .map_err(|e| http_failure(&what, e))?
                }
            };
            let status = resp.status();
            if req.follows_redirects() && matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                let loc = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        RegistryError::InvalidResponse(format!(
                            "{what}: HTTP {status} without a Location"
                        ))
                    })?;
                let next = cur.join(loc).map_err(|e| {
                    RegistryError::InvalidResponse(format!(
                        "{what}: HTTP {status} to a bad Location {:?}: {e}",
                        redact_str(loc)
                    ))
                })?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(RegistryError::InvalidResponse(format!(
                        "{what}: redirect to {}, not http(s)",
                        redact(&next)
                    )));
                }
                log::trace!("{what}: redirected to {}", next.host_str().unwrap_or("?"));
                from = Some(std::mem::replace(&mut cur, next));
                continue;
            }
            return Ok((resp, foreign));
        }
        Err(RegistryError::InvalidResponse(format!(
            "{verb} {}: more than {MAX_REDIRECTS} redirects",
            redact(url)
        )))
    }

    /// Sends a request whose body is a file of `size` bytes: it fails when no body bytes went
    /// out for `stall_timeout_secs`, or no response came `timeout_secs` after the last one
    /// (the registry checks the blob's digest before it answers).
    async fn send_watched(
        &self,
        rb: reqwest::RequestBuilder,
        sent: &AtomicU64,
        size: u64,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let send = rb.send();
        tokio::pin!(send);
        let tick = (self.stall / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let (mut last, mut since) = (sent.load(Relaxed), Instant::now());
        loop {
            tokio::select! {
                r = &mut send => return r.map_err(|e| http_failure(what, e)),
                _ = tokio::time::sleep(tick) => {}
            }
            let now = sent.load(Relaxed);
            if now != last {
                (last, since) = (now, Instant::now());
                continue;
            }
            let (limit, why) = if now < size {
                (self.stall, "stalled, no body bytes sent")
            } else {
                (self.timeout, "no response")
            };
            if since.elapsed() >= limit {
                return Err(RegistryError::transient(format!(
                    "{what}: {why} for {limit:?} after {now} of {size} bytes"
                )));
            }
        }
    }

    /// Runs `op` on `endpoints` in order (a mirror that fails is skipped for the next one, and
    /// left out of later rounds if it failed for good), round after round with backoff while
    /// the failures are transient, at most `retries` times and within `deadline`. Errors are
    /// prefixed with `what`.
    pub(super) async fn attempt<A: Attempt>(
        &self,
        what: &str,
        endpoints: &[Endpoint],
        deadline: Deadline,
        op: &mut A,
    ) -> Result<A::Output, RegistryError> {
        let started = Instant::now();
        let fail = |e: RegistryError| e.context(what);
        let (mut until, fixed) = match deadline {
            Deadline::At(t) => (t, true),
            Deadline::Transfer => (Instant::now() + self.timeout, false),
        };
        // The failures of this round of endpoints, and of the round before.
        let mut round: Vec<(String, RegistryError)> = Vec::new();
        let mut prev: Vec<(String, RegistryError)> = Vec::new();
        let mut attempt = 0u32;
        let mut moved = op.moved();
        let mut dropped = vec![false; endpoints.len()];
        let describe = |round: &[(String, RegistryError)], prev: &[(String, RegistryError)]| {
            let errs = if round.is_empty() { prev } else { round };
            if errs.is_empty() {
                return "no endpoint answered".to_owned();
            }
            errs.iter()
                .map(|(ep, e)| format!("{ep}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        loop {
            attempt += 1;
            if !round.is_empty() {
                prev = std::mem::take(&mut round);
            }
            for (i, ep) in endpoints.iter().enumerate() {
                if dropped[i] {
                    continue;
                }
                let limit = self.limit(ep);
                let _permit = match tokio::time::timeout_at(until, limit.acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(fail(RegistryError::transient("client closed"))),
                    Err(_) => {
                        return Err(fail(RegistryError::TimedOut(format!(
                            "deadline ({:?}) passed waiting for a request slot for {} \
                             ({MAX_CONCURRENT_REQUESTS} requests in flight there); last \
                             errors: {}",
                            self.timeout,
                            ep.label(),
                            describe(&round, &prev)
                        ))))
                    }
                };
                let result = if fixed {
                    match tokio::time::timeout_at(until, op.once(self, ep)).await {
                        Ok(r) => r,
                        Err(_) => {
                            let done = op.done().map(|d| format!(", {d}")).unwrap_or_default();
                            return Err(fail(RegistryError::TimedOut(format!(
                                "deadline ({:?}) passed after {attempt} attempt(s){done}; \
                                 last errors: {}",
                                self.timeout,
                                describe(&round, &prev)
                            ))));
                        }
                    }
                } else {
                    // Bounded by its own stall timeouts.
                    op.once(self, ep).await
                };
                match result {
                    Ok(v) => {
                        crate::metrics::metrics()
                            .registry_done(&registry_label(&ep.base), started.elapsed());
                        if attempt > 1 || !round.is_empty() {
                            log::info!(
                                "{what}: done after {attempt} attempt(s) in {:?}",
                                started.elapsed()
                            );
                        }
                        return Ok(v);
                    }
                    Err(e) => {
                        log::debug!("{what}: {}: {e}", ep.label());
                        crate::metrics::metrics().registry_error(
                            &registry_label(&ep.base),
                            e.class(),
                            &format!("{what}: {e}"),
                        );
                        let permanent = !e.is_transient();
                        round.push((ep.label(), e.clone()));
                        if permanent && !ep.is_mirror {
                            return Err(fail(e.map_msg(|_| describe(&round, &prev))));
                        }
                        // A mirror that cannot serve this (404, a bad copy) is not asked again.
                        dropped[i] = permanent;
                    }
                }
            }
            if !fixed {
                // A transfer's tries are bounded by their stall timeouts; the pause before the
                // next may not pass the timeout. One that resumes and moved on: retries afresh.
                until = Instant::now() + self.timeout;
                if op.resumes() && op.moved() > moved {
                    moved = op.moved();
                    attempt = 0;
                }
            }
            if attempt > self.retries {
                return Err(fail(RegistryError::transient(format!(
                    "gave up after {attempt} attempt(s): {}",
                    describe(&round, &prev)
                ))));
            }
            let mut delay = self.backoff(attempt.max(1));
            if let Some(ra) = round.iter().filter_map(|(_, e)| e.retry_after()).max() {
                delay = delay.max(ra);
            }
            if Instant::now() + delay >= until {
                return Err(fail(RegistryError::TimedOut(format!(
                    "deadline ({:?}) too close for another attempt after {attempt}: {}",
                    self.timeout,
                    describe(&round, &prev)
                ))));
            }
            log::debug!("{what}: retrying in {delay:?}");
            if let Some(ep) = endpoints.first() {
                crate::metrics::metrics().registry_retry(&registry_label(&ep.base));
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// `GET` of the blob's bytes `spec` (`a-b` or `a-b,c-d,...`) from `ep`, authorized.
    async fn get_blob_ranges(
        &self,
        t: &Target,
        ep: &Endpoint,
        spec: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = ep.blob_url(&t.repo, &t.digest)?;
        let req =
            Request::new(reqwest::Method::GET).header(header::RANGE, &format!("bytes={spec}"));
        // A CRI pull secret: only the one bound to this layer, and never for a mirror.
        let grant = match &t.layer {
            Some(layer) if !ep.is_mirror => self.captured.for_layer(layer, &ep.cred_host, &t.repo),
            _ => None,
        };
        let (resp, _) = self
            .authorized_as(
                ep,
                &t.repo,
                Access::Pull,
                grant.as_ref(),
                &t.requests,
                &req,
                &url,
            )
            .await?;
        Ok(resp)
    }

    /// Reads `[offset + out.len(), offset + len)` of the blob from `ep` onto the end of `out`.
    /// On failure `out` keeps what did arrive (the next try resumes after it).
    pub(super) async fn get_range(
        &self,
        t: &Target,
        ep: &Endpoint,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RegistryError> {
        let start = offset + out.len() as u64;
        let end = offset + len as u64 - 1;
        let resp = self
            .get_blob_ranges(t, ep, &format!("{start}-{end}"))
            .await?;
        let before = out.len();
        let read = read_body(t, resp, start, end, out, self.stall).await;
        crate::metrics::metrics()
            .registry_bytes(&registry_label(&ep.base), (out.len() - before) as u64);
        read
    }
}

impl Inner {
    /// Several ranges of a blob in one request (`Range: bytes=a-b,c-d`), answered as
    /// `multipart/byteranges` ([`super::multipart`]): each range's bytes, in order. `Ok(None)`:
    /// the endpoint does not serve several ranges at once (a 200 with the whole blob, as S3
    /// answers, a 416, or one range for them all: that body is not read) or its parts do not
    /// hold what was asked; the caller asks range by range.
    pub(super) async fn get_ranges(
        &self,
        t: &Target,
        ep: &Endpoint,
        ranges: &[(u64, usize)],
    ) -> Result<Option<Vec<Vec<u8>>>, RegistryError> {
        let spec: Vec<String> = ranges
            .iter()
            .map(|&(off, len)| format!("{off}-{}", off + len as u64 - 1))
            .collect();
        let spec = spec.join(",");
        let resp = self.get_blob_ranges(t, ep, &spec).await?;
        let what = format!("GET {} bytes {spec}", redact(resp.url()));
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // Some servers refuse several ranges with a 416: the ranges one by one tell.
            StatusCode::OK | StatusCode::RANGE_NOT_SATISFIABLE => return Ok(None),
            _ => return Err(status_error(&what, resp).await),
        }
        let boundary = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(super::multipart::byteranges_boundary)
            .map(str::to_owned);
        let Some(boundary) = boundary else {
            return Ok(None);
        };
        // The bytes asked for and each part's few header lines.
        let want: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let max = want + 512 * (ranges.len() as u64 + 1);
        let body = read_limited(resp, max, self.stall, &what).await?;
        t.fetched.fetch_add(body.len() as u64, Relaxed);
        crate::metrics::metrics().registry_bytes(&registry_label(&ep.base), body.len() as u64);
        // A body we cannot use costs its bytes, not the read: ask range by range.
        let parsed = super::multipart::parse_byteranges(&body, &boundary, t.size)
            .and_then(|parts| super::multipart::locate(&parts, ranges));
        let at = match parsed {
            Ok(at) => at,
            Err(e) => {
                log::warn!("{what}: multipart/byteranges answer not used: {e}");
                return Ok(None);
            }
        };
        Ok(Some(
            ranges
                .iter()
                .zip(at)
                .map(|(&(_, len), a)| body[a..a + len].to_vec())
                .collect(),
        ))
    }
}

/// Several ranges of a lazily read blob in one request ([`Inner::get_ranges`]).
pub(super) struct MultiRangeRead<'t> {
    pub(super) t: &'t Target,
    pub(super) ranges: &'t [(u64, usize)],
}

impl Attempt for MultiRangeRead<'_> {
    type Output = Option<Vec<Vec<u8>>>;
    fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> impl Future<Output = Result<Self::Output, RegistryError>> + Send + 'a {
        inner.get_ranges(self.t, ep, self.ranges)
    }
}

/// A registry as metrics and `ovbd status` name it: `host[:port]`.
pub(crate) fn registry_label(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => url.as_str().to_owned(),
    }
}

/// One range of a lazily read blob ([`Inner::get_range`]), resumed after what arrived.
pub(super) struct RangeRead<'t> {
    pub(super) t: &'t Target,
    pub(super) offset: u64,
    pub(super) len: usize,
    pub(super) out: Vec<u8>,
}

impl Attempt for RangeRead<'_> {
    type Output = ();
    fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send + 'a {
        inner.get_range(self.t, ep, self.offset, self.len, &mut self.out)
    }
    fn done(&self) -> Option<String> {
        Some(format!("{} of {} bytes received", self.out.len(), self.len))
    }
}

/// A file as a streamed request body; `sent` counts the bytes handed to the connection.
async fn file_body(
    path: &std::path::Path,
    size: u64,
    sent: Arc<AtomicU64>,
) -> Result<reqwest::Body, RegistryError> {
    use tokio::io::AsyncReadExt as _;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| RegistryError::local(format!("opening {}", path.display()), &e))?;
    let name = path.display().to_string();
    let stream = async_stream::stream! {
        let mut left = size;
        while left > 0 {
            let mut buf = vec![0u8; COPY_CHUNK.min(left as usize)];
            match file.read(&mut buf).await {
                Ok(0) => {
                    yield Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{name}: {left} bytes short of {size}"),
                    ));
                    break;
                }
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    sent.fetch_add(n as u64, Relaxed);
                    yield Ok(bytes::Bytes::from(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    yield Err(e);
                    break;
                }
            }
        }
    };
    Ok(reqwest::Body::wrap_stream(stream))
}

/// Reads a whole (small) response body, at most `max` bytes, each chunk within `stall`.
pub(super) async fn read_limited(
    mut resp: reqwest::Response,
    max: u64,
    stall: Duration,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    // The length announced (reqwest's hint shrinks as the body is read).
    let announced = resp.content_length();
    if let Some(n) = announced.filter(|&n| n > max) {
        return Err(RegistryError::InvalidResponse(format!(
            "{what}: {n} bytes, more than the {max} allowed"
        )));
    }
    let mut body = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
            Err(_) => {
                return Err(RegistryError::transient(format!(
                    "{what}: stalled, no bytes for {stall:?} after {}",
                    body.len()
                )))
            }
            Ok(Err(e)) => {
                return Err(http_failure(
                    &format!("{what}: body broke off after {} bytes", body.len()),
                    e,
                ))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if (body.len() + chunk.len()) as u64 > max {
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: more than the {max} bytes allowed"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if let Some(n) = announced.filter(|&n| n != body.len() as u64) {
        return Err(RegistryError::transient(format!(
            "{what}: truncated body, {} of {n} bytes",
            body.len()
        )));
    }
    Ok(body)
}

/// The failure a response with an unexpected status means: 5xx, 408 and 429 are transient
/// (`Retry-After` kept), 404 is not found, 401 and 403 are refusals, anything else an
/// invalid response. The registry's own error codes and messages (`{"errors": [...]}`, a
/// small body read briefly) are added to the message.
pub(super) async fn status_error(what: &str, resp: reqwest::Response) -> RegistryError {
    let status = resp.status();
    let ra = retry_after(resp.headers());
    let detail = match tokio::time::timeout(
        Duration::from_secs(2),
        read_limited(resp, 64 << 10, Duration::from_secs(2), what),
    )
    .await
    {
        Ok(Ok(body)) => error_detail(&body),
        _ => String::new(),
    };
    let msg = format!("{what}: HTTP {status}{detail}");
    match status {
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            RegistryError::Transient {
                msg,
                retry_after: ra,
            }
        }
        StatusCode::NOT_FOUND => RegistryError::NotFound(msg),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Denied(msg),
        _ => RegistryError::InvalidResponse(msg),
    }
}

/// ` (CODE: message; ...)` of a registry error body (OCI distribution spec), or nothing.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let Ok(parsed) = serde_json::from_slice::<Errors>(body) else {
        return String::new();
    };
    let parts: Vec<String> = parsed
        .errors
        .iter()
        .take(4)
        .map(|e| {
            // A registry's text, shown in our messages: printable and short.
            let clean =
                |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(200).collect() };
            match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", clean(&e.code), clean(&e.message)),
                (false, true) => clean(&e.code),
                _ => clean(&e.message),
            }
        })
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

pub(crate) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// `Content-Range: bytes a-b/total` → `(a, b, total)` (`None` total for `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

/// Checks the response to a range request for `[start, end]` and appends its body to `out`.
pub(super) async fn read_body(
    t: &Target,
    mut resp: reqwest::Response,
    start: u64,
    end: u64,
    out: &mut Vec<u8>,
    stall: Duration,
) -> Result<(), RegistryError> {
    let status = resp.status();
    let what = format!("GET {}", redact(resp.url()));
    let want = (end - start + 1) as usize;
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let cr = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match cr {
                Some((a, b, total)) if a == start && b == end => {
                    if let Some(total) = total.filter(|&n| n != t.size) {
                        return Err(RegistryError::InvalidResponse(format!(
                                "{what}: the blob is {total} bytes, its descriptor says {}",
                                t.size
                            ),
                        ));
                    }
                }
                other => {
                    return Err(RegistryError::InvalidResponse(format!("{what}: asked for bytes {start}-{end}, got 206 with Content-Range {other:?}"),
                    ))
                }
            }
        }
        StatusCode::OK if start == 0 && end + 1 == t.size => {}
        StatusCode::OK => {
            return Err(RegistryError::InvalidResponse(format!("{what}: asked for bytes {start}-{end}, got the whole blob (200): no Range support"),
            ))
        }
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            return Err(RegistryError::Transient {
                msg: format!("{what}: HTTP {s}"),
                retry_after: retry_after(resp.headers()),
            })
        }
        StatusCode::NOT_FOUND => {
            return Err(RegistryError::NotFound(format!("{what}: HTTP 404 Not Found (no such blob in this repository)"),
            ))
        }
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            return Err(RegistryError::Denied(format!("{what}: HTTP {status}"),
            ))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(RegistryError::InvalidInput(format!(
                    "{what}: HTTP 416 for bytes {start}-{end}: the blob is smaller than the {} bytes its descriptor says",
                    t.size
                ),
            ))
        }
        s => {
            return Err(RegistryError::InvalidResponse(format!("{what}: unexpected HTTP {s}"),
            ))
        }
    }
    if let Some(n) = resp.content_length().filter(|&n| n != want as u64) {
        return Err(RegistryError::InvalidResponse(format!(
            "{what}: Content-Length {n}, asked for {want} bytes"
        )));
    }
    let base = out.len();
    loop {
        let got = out.len() - base;
        let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
            Err(_) => {
                return Err(RegistryError::transient(format!(
                    "{what}: stalled, no bytes for {stall:?} after {got} of {want}"
                )))
            }
            Ok(Err(e)) => {
                return Err(http_failure(
                    &format!("{what}: body broke off after {got} of {want} bytes"),
                    e,
                ))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if got + chunk.len() > want {
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: more than the {want} bytes asked for"
            )));
        }
        t.fetched.fetch_add(chunk.len() as u64, Relaxed);
        out.extend_from_slice(&chunk);
    }
    let got = out.len() - base;
    if got < want {
        return Err(RegistryError::transient(format!(
            "{what}: truncated body, {got} of {want} bytes"
        )));
    }
    Ok(())
}
