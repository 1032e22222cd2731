//! Sending requests (redirects, request slots) and the range GET with its retries,
//! backoff and deadline.

use super::*;

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

    /// One GET of `url` for `[start, end]`, redirects followed. Returns the final response and
    /// whether it came from another origin than `url`'s.
    pub(super) async fn send(
        &self,
        t: &Target,
        url: &Url,
        auth: Option<&str>,
        start: u64,
        end: u64,
    ) -> Result<(reqwest::Response, bool), Failure> {
        let mut cur = url.clone();
        let mut from_https = false;
        let mut from: Option<Url> = None;
        for _ in 0..=MAX_REDIRECTS {
            let trusted = self.policy.check(&cur, from_https).map_err(|why| {
                let msg = match &from {
                    Some(f) => format!("GET {}: redirected to {}: {why}", redact(f), redact(&cur)),
                    None => format!("GET {}: {why}", redact(&cur)),
                };
                Failure::permanent(io::ErrorKind::PermissionDenied, msg)
            })?;
            from_https |= cur.scheme() == "https";
            let client = if trusted {
                &self.trusted_client
            } else {
                &self.client
            };
            let foreign = !same_origin(&cur, url);
            let mut rb = client
                .get(cur.clone())
                .header(header::RANGE, format!("bytes={start}-{end}"));
            if let (false, Some(a)) = (foreign, auth) {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            t.requests.fetch_add(1, Relaxed);
            let what = format!("GET {}", redact(&cur));
            let resp = tokio::time::timeout(self.stall, rb.send())
                .await
                .map_err(|_| {
                    Failure::transient(format!("{what}: no response within {:?}", self.stall))
                })?
                .map_err(|e| http_failure(&what, e))?;
            let status = resp.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                let loc = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Failure::permanent(
                            io::ErrorKind::InvalidData,
                            format!("{what}: HTTP {status} without a Location"),
                        )
                    })?;
                let next = cur.join(loc).map_err(|e| {
                    Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{what}: HTTP {status} to a bad Location {:?}: {e}",
                            redact_str(loc)
                        ),
                    )
                })?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!("{what}: redirect to {}, not http(s)", redact(&next)),
                    ));
                }
                log::trace!("{what}: redirected to {}", next.host_str().unwrap_or("?"));
                from = Some(std::mem::replace(&mut cur, next));
                continue;
            }
            return Ok((resp, foreign));
        }
        Err(Failure::permanent(
            io::ErrorKind::InvalidData,
            format!("GET {}: more than {MAX_REDIRECTS} redirects", redact(url)),
        ))
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
    ) -> Result<(), Failure> {
        let start = offset + out.len() as u64;
        let end = offset + len as u64 - 1;
        let url = ep.blob_url(&t.repo, &t.digest)?;
        let slot = self.slot(ep, &t.repo);
        let mut refreshed = false;
        for _ in 0..4 {
            let (auth, generation) = self.current_auth(ep, &t.repo, &slot).await?;
            let (resp, foreign) = self.send(t, &url, auth.as_deref(), start, end).await?;
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
                    return Err(Failure::permanent(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "GET {}: HTTP 401 Unauthorized even after authenticating \
                             (credentials for {} from {})",
                            redact(&url),
                            ep.cred_host,
                            self.config_name()
                        ),
                    ));
                }
                let challenge = challenges
                    .iter()
                    .find(|c| matches!(c, Challenge::Bearer { .. }))
                    .or(challenges.first())
                    .cloned()
                    .ok_or_else(|| {
                        Failure::permanent(
                            io::ErrorKind::PermissionDenied,
                            format!(
                                "GET {}: HTTP 401 without a Bearer or Basic challenge",
                                redact(&url)
                            ),
                        )
                    })?;
                self.authenticate(ep, &t.repo, &challenge, &mut s).await?;
                refreshed = true;
                continue;
            }
            return read_body(t, resp, start, end, out, self.stall).await;
        }
        Err(Failure::permanent(
            io::ErrorKind::PermissionDenied,
            format!("GET {}: authentication did not settle", redact(&url)),
        ))
    }

    /// Reads `len` bytes at `offset` of the blob, trying every endpoint and retrying transient
    /// failures until `deadline`.
    pub(super) async fn fetch(
        self: Arc<Self>,
        t: Arc<Target>,
        offset: u64,
        len: usize,
        deadline: Instant,
    ) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        let fail = |kind: io::ErrorKind, msg: String| {
            io::Error::new(
                kind,
                format!(
                    "registry blob {} bytes {offset}..{}: {msg}",
                    t.name,
                    offset + len as u64
                ),
            )
        };
        let mut out = Vec::with_capacity(len);
        // The failures of this round of endpoints, and of the round before.
        let mut round: Vec<(String, Failure)> = Vec::new();
        let mut prev: Vec<(String, Failure)> = Vec::new();
        let mut attempt = 0u32;
        let describe = |round: &[(String, Failure)], prev: &[(String, Failure)]| {
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
            for ep in &t.endpoints {
                let limit = self.limit(ep);
                let _permit = match tokio::time::timeout_at(deadline, limit.acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(fail(io::ErrorKind::Other, "client closed".into())),
                    Err(_) => {
                        return Err(fail(
                            io::ErrorKind::TimedOut,
                            format!(
                                "deadline ({:?}) passed waiting for a request slot for {} \
                                 ({MAX_CONCURRENT_REQUESTS} requests in flight there); last \
                                 errors: {}",
                                self.timeout,
                                ep.label(),
                                describe(&round, &prev)
                            ),
                        ))
                    }
                };
                match tokio::time::timeout_at(
                    deadline,
                    self.get_range(&t, ep, offset, len, &mut out),
                )
                .await
                {
                    Err(_) => {
                        return Err(fail(
                            io::ErrorKind::TimedOut,
                            format!(
                                "deadline ({:?}) passed after {attempt} attempt(s), {} of {len} \
                                 bytes received; last errors: {}",
                                self.timeout,
                                out.len(),
                                describe(&round, &prev)
                            ),
                        ))
                    }
                    Ok(Ok(())) => {
                        if attempt > 1 || !round.is_empty() {
                            log::info!(
                                "registry blob {} bytes {offset}+{len}: read after {attempt} \
                                 attempt(s) in {:?}",
                                t.name,
                                started.elapsed()
                            );
                        }
                        return Ok(out);
                    }
                    Ok(Err(e)) => {
                        log::debug!(
                            "registry blob {} bytes {offset}+{len}: {}: {e}",
                            t.name,
                            ep.label()
                        );
                        let permanent = e.is_permanent();
                        let kind = e.kind();
                        round.push((ep.label(), e));
                        if permanent && !ep.is_mirror {
                            return Err(fail(kind, describe(&round, &prev)));
                        }
                    }
                }
            }
            if attempt > self.retries {
                return Err(fail(
                    io::ErrorKind::Other,
                    format!(
                        "gave up after {attempt} attempt(s): {}",
                        describe(&round, &prev)
                    ),
                ));
            }
            let mut delay = self.backoff(attempt);
            if let Some(ra) = round.iter().filter_map(|(_, e)| e.retry_after()).max() {
                delay = delay.max(ra);
            }
            if Instant::now() + delay >= deadline {
                return Err(fail(
                    io::ErrorKind::TimedOut,
                    format!(
                        "deadline ({:?}) too close for another attempt after {attempt}: {}",
                        self.timeout,
                        describe(&round, &prev)
                    ),
                ));
            }
            log::debug!(
                "registry blob {} bytes {offset}+{len}: retrying in {delay:?}",
                t.name
            );
            tokio::time::sleep(delay).await;
        }
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
) -> Result<(), Failure> {
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
                        return Err(Failure::permanent(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{what}: the blob is {total} bytes, its descriptor says {}",
                                t.size
                            ),
                        ));
                    }
                }
                other => {
                    return Err(Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!("{what}: asked for bytes {start}-{end}, got 206 with Content-Range {other:?}"),
                    ))
                }
            }
        }
        StatusCode::OK if start == 0 && end + 1 == t.size => {}
        StatusCode::OK => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: asked for bytes {start}-{end}, got the whole blob (200): no Range support"),
            ))
        }
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            return Err(Failure::Transient {
                msg: format!("{what}: HTTP {s}"),
                retry_after: retry_after(resp.headers()),
            })
        }
        StatusCode::NOT_FOUND => {
            return Err(Failure::permanent(
                io::ErrorKind::NotFound,
                format!("{what}: HTTP 404 Not Found (no such blob in this repository)"),
            ))
        }
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            return Err(Failure::permanent(
                io::ErrorKind::PermissionDenied,
                format!("{what}: HTTP {status}"),
            ))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what}: HTTP 416 for bytes {start}-{end}: the blob is smaller than the {} bytes its descriptor says",
                    t.size
                ),
            ))
        }
        s => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: unexpected HTTP {s}"),
            ))
        }
    }
    if let Some(n) = resp.content_length().filter(|&n| n != want as u64) {
        return Err(Failure::permanent(
            io::ErrorKind::InvalidData,
            format!("{what}: Content-Length {n}, asked for {want} bytes"),
        ));
    }
    let base = out.len();
    loop {
        let got = out.len() - base;
        let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
            Err(_) => {
                return Err(Failure::transient(format!(
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
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: more than the {want} bytes asked for"),
            ));
        }
        t.fetched.fetch_add(chunk.len() as u64, Relaxed);
        out.extend_from_slice(&chunk);
    }
    let got = out.len() - base;
    if got < want {
        return Err(Failure::transient(format!(
            "{what}: truncated body, {got} of {want} bytes"
        )));
    }
    Ok(())
}
