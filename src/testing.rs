//! Test fixtures shared by the modules' tests: a real registry (`docker-registry`), a
//! fault-injecting HTTP front for it, an in-memory block source, deterministic random data.

use crate::config::RegistryConfig;
use crate::oci::sha256_digest;
use crate::source::cache::BlockSource;
use ovbd_format::ReadAt;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The block size the cache tests use ([`Fake`] checks its ranges against it).
pub(crate) const BS: u64 = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `docker-registry` (distribution 2.8, Debian's package) on a free loopback port, storage
/// in a temporary directory; killed on drop.
pub(crate) struct TestRegistry {
    child: Child,
    pub(crate) addr: String,
    dir: tempfile::TempDir,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn find_docker_registry() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("docker-registry"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "docker-registry is not installed: the registry tests need it \
                 (Debian package docker-registry; scripts/setup.sh installs it)"
            )
        })
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status code of `GET path` over plain http/1.0.
pub(crate) fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn start_registry(extra_config: &str) -> TestRegistry {
    let bin = find_docker_registry();
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{extra_config}",
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let log = File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new(&bin)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut reg = TestRegistry { child, addr, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http_status(&reg.addr, "/v2/").is_some() {
            return reg;
        }
        let log = fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default();
        if let Ok(Some(status)) = reg.child.try_wait() {
            panic!("docker-registry exited ({status}): {log}");
        }
        if Instant::now() > deadline {
            panic!(
                "docker-registry did not answer at {} within 30 s: {log}",
                reg.addr
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes.
pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A tiny xorshift for random ranges.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Response head and body of one request sent over a fresh connection.
pub(crate) fn http(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Pushes `data` as a blob of `repo` (monolithic upload); returns its digest.
pub(crate) fn push_blob(addr: &str, repo: &str, data: &[u8], auth: Option<&str>) -> String {
    let digest = sha256_digest(data).to_string();
    let authz = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let (status, resp) = http(
        addr,
        &format!(
            "POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: {addr}\r\n{authz}\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        b"",
    );
    assert_eq!(status, 202, "{resp}");
    let location = resp
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_owned())
        })
        .unwrap();
    let path = match location.find("/v2/") {
        Some(i) => location[i..].to_owned(),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, resp) = http(
        addr,
        &format!(
            "PUT {path}{sep}digest={digest} HTTP/1.1\r\nHost: {addr}\r\n{authz}\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            data.len()
        ),
        data,
    );
    assert_eq!(status, 201, "{resp}");
    digest
}

/// A registry with one blob of `size` pseudo-random bytes in repo `test/blob`.
pub(crate) fn registry_with_blob(size: usize, seed: u64) -> (TestRegistry, Vec<u8>, String) {
    let reg = start_registry("");
    let data = random_bytes(size, seed);
    let digest = push_blob(&reg.addr, "test/blob", &data, None);
    (reg, data, digest)
}

/// Short deadlines, and the tests' loopback registries (on 127.0.0.1) allowed.
pub(crate) fn quick_config() -> RegistryConfig {
    RegistryConfig {
        timeout_secs: 10.0,
        retries: 5,
        stall_timeout_secs: 2.0,
        connect_timeout_secs: 2.0,
        allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    }
}

/// A self-signed certificate for 127.0.0.1 and its key, in `dir`: `(cert.pem, key.pem)`.
pub(crate) fn test_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // A leaf certificate (trusted as its own root by the tests that trust it).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (to make a test certificate)");
    assert!(ok.success());
    (cert, key)
}

/// An https server on 127.0.0.1 answering every request with a 307 to `location` followed
/// by the request's path.
pub(crate) struct TlsRedirect {
    pub(crate) addr: String,
    pub(crate) hits: Arc<AtomicUsize>,
}

impl TlsRedirect {
    pub(crate) fn start(
        cert: &std::path::Path,
        key: &std::path::Path,
        location: &str,
    ) -> TlsRedirect {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let (counter, location) = (hits.clone(), location.to_owned());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let (counter, location) = (counter.clone(), location.clone());
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut request = String::new();
                    {
                        let mut reader = BufReader::new(&mut tls);
                        if reader.read_line(&mut request).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut line = String::new();
                        while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                            line.clear();
                        }
                    }
                    counter.fetch_add(1, SeqCst);
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let _ = write!(
                        tls,
                        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}{path}\r\n\
                         Content-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        TlsRedirect { addr, hits }
    }
}

/// What the front server does to the next blob GET.
#[derive(Clone, Debug)]
pub(crate) enum Fault {
    /// Answer with this status (and `Retry-After: 0` for 429/503).
    Status(u16),
    /// Half the body, then a TCP reset.
    Reset,
    /// Half the body, then a clean close: fewer bytes than Content-Length.
    Truncate,
    /// Half the body, then nothing for this long.
    Stall(Duration),
    /// Nothing at all for this long, then the answer.
    StallHeaders(Duration),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// A Range of several ranges is dropped, so the whole blob comes with a 200 (as S3
    /// answers one); a single range is served.
    OneRangeOnly,
    /// Each part of a multipart answer claims to start one byte later than it does (its bytes
    /// and length unchanged): parts that do not hold what was asked.
    ShiftParts,
}

/// `body` with each `Content-Range: bytes a-b/n` of its parts made `a+1`-`b+1`.
fn shift_parts(body: &[u8]) -> Vec<u8> {
    const TAG: &[u8] = b"Content-Range: bytes ";
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(TAG) {
            out.extend_from_slice(TAG);
            i += TAG.len();
            let end = i + body[i..].iter().position(|&c| c == b'/').unwrap();
            let text = std::str::from_utf8(&body[i..end]).unwrap();
            let (a, b) = text.split_once('-').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            out.extend_from_slice(format!("{}-{}", a + 1, b + 1).as_bytes());
            i = end;
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

pub(crate) enum FrontAuth {
    /// Bearer tokens from `/token` (wanting this Basic header if `Some`), each good for
    /// `uses` requests.
    Bearer { uses: usize, basic: Option<String> },
    /// This Basic header is required.
    Basic(String),
}

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) authorization: Option<String>,
    pub(crate) range: Option<String>,
}

/// An HTTP front on 127.0.0.1 for a test registry: forwards to it (one request per
/// connection), and on demand injects faults, demands auth (a token server stand-in),
/// redirects blob GETs elsewhere, or acts as a forward proxy (absolute-form targets).
pub(crate) struct Front {
    pub(crate) addr: String,
    upstream: String,
    pub(crate) faults: Mutex<VecDeque<Fault>>,
    pub(crate) always: Mutex<Option<Fault>>,
    /// Faults for other requests than blob GETs: (method, path part, queue); see
    /// [`Front::push_faults_for`].
    targeted: Mutex<Vec<(String, String, VecDeque<Fault>)>>,
    auth: Option<FrontAuth>,
    pub(crate) redirect: Mutex<Option<String>>,
    /// The token realm of the Bearer challenge, if not `http://ADDR/token`.
    pub(crate) realm: Mutex<Option<String>>,
    pub(crate) seen: Mutex<Vec<Seen>>,
    tokens: Mutex<HashMap<String, usize>>,
    pub(crate) token_scopes: Mutex<Vec<String>>,
    token_count: AtomicUsize,
    inflight: AtomicUsize,
    pub(crate) max_inflight: AtomicUsize,
}

impl Front {
    pub(crate) fn start(upstream: &str, auth: Option<FrontAuth>) -> Arc<Front> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let front = Arc::new(Front {
            addr: listener.local_addr().unwrap().to_string(),
            upstream: upstream.to_owned(),
            faults: Mutex::new(VecDeque::new()),
            always: Mutex::new(None),
            targeted: Mutex::new(Vec::new()),
            auth,
            redirect: Mutex::new(None),
            realm: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            token_scopes: Mutex::new(Vec::new()),
            token_count: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&front);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Some(front) = weak.upgrade() else { return };
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = front.serve(conn);
                });
            }
        });
        front
    }

    pub(crate) fn push_faults(&self, f: impl IntoIterator<Item = Fault>) {
        self.faults.lock().unwrap().extend(f);
    }

    /// Requests being answered right now.
    pub(crate) fn in_flight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn blob_gets(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.target.contains("/blobs/"))
            .count()
    }

    fn serve(&self, mut conn: TcpStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut parts = request.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let authz = header("authorization");
        // The request body (uploads), forwarded as it came.
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        self.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            authorization: authz.clone(),
            range: header("range"),
        });
        // Absolute form (we are someone's proxy): just the path.
        let path = match target.strip_prefix("http://") {
            Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]).to_owned(),
            None => target.clone(),
        };
        let now = self.inflight.fetch_add(1, SeqCst) + 1;
        self.max_inflight.fetch_max(now, SeqCst);
        let proxied = target.starts_with("http://");
        let r = self.answer(
            &mut conn,
            &method,
            &path,
            authz.as_deref(),
            &headers,
            &body,
            proxied,
        );
        self.inflight.fetch_sub(1, SeqCst);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        conn: &mut TcpStream,
        method: &str,
        path: &str,
        authz: Option<&str>,
        headers: &[(String, String)],
        request_body: &[u8],
        proxied: bool,
    ) -> io::Result<()> {
        let respond = |conn: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            )?;
            conn.write_all(body)?;
            conn.flush()
        };
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        match &self.auth {
            Some(FrontAuth::Bearer { uses, basic }) => {
                if route == "/token" {
                    for kv in query.split('&') {
                        if let Some(s) = kv.strip_prefix("scope=") {
                            let s = s.replace("%3A", ":").replace("%3a", ":");
                            let s = s.replace("%2F", "/").replace("%2f", "/");
                            self.token_scopes.lock().unwrap().push(s);
                        }
                    }
                    if basic.is_some() && basic.as_deref() != authz {
                        return respond(conn, "401 Unauthorized", "", b"");
                    }
                    let n = self.token_count.fetch_add(1, SeqCst) + 1;
                    let token = format!("tok-{n}");
                    self.tokens.lock().unwrap().insert(token.clone(), *uses);
                    // Both spellings of the field are used in the wild.
                    let body = if n % 2 == 1 {
                        format!(r#"{{"token":"{token}","expires_in":300}}"#)
                    } else {
                        format!(r#"{{"access_token":"{token}"}}"#)
                    };
                    return respond(conn, "200 OK", "", body.as_bytes());
                }
                let ok = authz
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .is_some_and(|t| {
                        let mut tokens = self.tokens.lock().unwrap();
                        match tokens.get_mut(t) {
                            Some(left) if *left > 0 => {
                                *left -= 1;
                                true
                            }
                            _ => false,
                        }
                    });
                if !ok {
                    let realm = self.realm.lock().unwrap().clone();
                    let realm = realm.unwrap_or_else(|| format!("http://{}/token", self.addr));
                    let challenge =
                        format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"front\"\r\n");
                    return respond(conn, "401 Unauthorized", &challenge, b"");
                }
            }
            Some(FrontAuth::Basic(want)) if authz != Some(want.as_str()) => {
                return respond(
                    conn,
                    "401 Unauthorized",
                    "WWW-Authenticate: Basic realm=\"front\"\r\n",
                    b"",
                );
            }
            Some(FrontAuth::Basic(_)) | None => {}
        }
        let is_blob_get = method == "GET" && route.contains("/blobs/");
        if is_blob_get {
            if let Some(base) = self.redirect.lock().unwrap().clone() {
                // Presigned like S3's: the signature is in the query.
                let extra =
                    format!("Location: {base}{route}?X-Amz-Signature=secret-sig&signature=abc\r\n");
                return respond(conn, "307 Temporary Redirect", &extra, b"");
            }
        }
        let targeted = self.targeted_fault(method, route);
        let fault = if targeted.is_some() {
            targeted
        } else if is_blob_get {
            let queued = self.faults.lock().unwrap().pop_front();
            queued.or_else(|| self.always.lock().unwrap().clone())
        } else {
            None
        };
        // A request with no body to break in its answer breaks before it is forwarded.
        if method != "GET" {
            match fault {
                Some(Fault::Reset) => {
                    reset(conn);
                    return Ok(());
                }
                Some(Fault::Truncate) => {
                    conn.write_all(b"HTTP/1.1 20")?;
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                _ => {}
            }
        }
        if let Some(Fault::Status(code)) = fault {
            let extra = if code == 429 || code == 503 {
                "Retry-After: 0\r\n"
            } else {
                ""
            };
            return respond(conn, &format!("{code} Injected"), extra, b"");
        }
        if let Some(Fault::StallHeaders(d) | Fault::Delay(d)) = fault {
            std::thread::sleep(d);
        }
        // Forward, one request per connection.
        let mut up = TcpStream::connect(&self.upstream)?;
        up.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {route}{}{query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            if query.is_empty() { "" } else { "?" },
            self.upstream
        );
        for (k, v) in headers {
            let several = k.eq_ignore_ascii_case("range") && v.contains(',');
            if matches!(fault, Some(Fault::OneRangeOnly)) && several {
                continue;
            }
            if !["host", "connection", "authorization", "proxy-connection"]
                .iter()
                .any(|h| k.eq_ignore_ascii_case(h))
            {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str("\r\n");
        up.write_all(head.as_bytes())?;
        up.write_all(request_body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(resp.len(), |i| i + 4);
        let (head, body) = resp.split_at(split);
        let shifted;
        let body = if matches!(fault, Some(Fault::ShiftParts)) {
            shifted = shift_parts(body);
            &shifted[..]
        } else {
            body
        };
        let head = String::from_utf8_lossy(head);
        let mut new_head = String::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            if line.to_ascii_lowercase().starts_with("content-length:") {
                new_head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            } else if !proxied && line.to_ascii_lowercase().starts_with("location:") {
                // An upload's location stays on the front (its faults apply there too).
                let upstream = format!("http://{}/", self.upstream);
                new_head.push_str(&line.replace(&upstream, &format!("http://{}/", self.addr)));
                new_head.push_str("\r\n");
            } else if !line.to_ascii_lowercase().starts_with("connection:") {
                new_head.push_str(line);
                new_head.push_str("\r\n");
            }
        }
        new_head.push_str("Connection: close\r\n\r\n");
        conn.write_all(new_head.as_bytes())?;
        let half = body.len() / 2;
        match fault {
            Some(Fault::Reset) => {
                conn.write_all(&body[..half])?;
                conn.flush()?;
                std::thread::sleep(Duration::from_millis(20));
                reset(conn);
                return Ok(());
            }
            Some(Fault::Truncate) => {
                conn.write_all(&body[..half])?;
                conn.flush()?;
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Stall(d)) => {
                conn.write_all(&body[..half])?;
                conn.flush()?;
                std::thread::sleep(d);
                conn.write_all(&body[half..])?;
            }
            _ => conn.write_all(body)?,
        }
        conn.flush()
    }
}

/// Closes `conn` with a TCP RST (SO_LINGER 0).
pub(crate) fn reset(conn: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = conn.shutdown(std::net::Shutdown::Read);
}

/// Reads random ranges (and the edges) of `blob` and compares them with `data`.
pub(crate) fn check_random_ranges(blob: &dyn ReadAt, data: &[u8], n: usize, seed: u64) {
    let size = data.len() as u64;
    let mut rng = Rng(seed);
    let mut cases = vec![
        (0u64, 1usize),
        (size - 1, 1),
        (size - 100, 200), // past the end: short read
        (0, data.len()),
    ];
    for _ in 0..n {
        let off = rng.below(size);
        let len = 1 + rng.below(600_000) as usize;
        cases.push((off, len));
    }
    for (off, len) in cases {
        let mut buf = vec![0u8; len];
        let got = blob.read_at(&mut buf, off).unwrap();
        let want = (size - off).min(len as u64) as usize;
        assert_eq!(got, want, "read of {len} at {off}");
        assert!(
            buf[..got] == data[off as usize..off as usize + got],
            "bytes differ in the read of {len} at {off}"
        );
    }
    let mut buf = [0u8; 16];
    assert_eq!(blob.read_at(&mut buf, size).unwrap(), 0);
    assert_eq!(blob.read_at(&mut buf, size + 100).unwrap(), 0);
}

/// An in-memory blob that counts what is fetched from it.
pub(crate) struct Fake {
    pub(crate) data: Vec<u8>,
    pub(crate) digest: String,
    pub(crate) name: String,
    pub(crate) origin: String,
    pub(crate) calls: AtomicU64,
    pub(crate) fetched: AtomicU64,
    pub(crate) ranges: Mutex<Vec<Vec<(u64, usize)>>>,
    pub(crate) per_block: Mutex<HashMap<u64, usize>>,
    pub(crate) delay: Mutex<Duration>,
    pub(crate) fail: AtomicBool,
}

impl Fake {
    pub(crate) fn new(size: usize, seed: u64) -> Arc<Fake> {
        let data = random_bytes(size, seed);
        let digest = crate::oci::sha256_digest(&data).to_string();
        Arc::new(Fake {
            name: format!("fake@{digest}"),
            origin: "127.0.0.1:5000/fake".into(),
            data,
            digest,
            calls: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
            per_block: Mutex::new(HashMap::new()),
            delay: Mutex::new(Duration::ZERO),
            fail: AtomicBool::new(false),
        })
    }
    pub(crate) fn fetched(&self) -> u64 {
        self.fetched.load(SeqCst)
    }

    /// The blob `data` served by registry repository `origin` under `digest` (a tampered
    /// copy when `data` does not hash to it).
    pub(crate) fn served(data: Vec<u8>, digest: &str, origin: &str) -> Arc<Fake> {
        let mut f = Fake::new(0, 0);
        let m = Arc::get_mut(&mut f).unwrap();
        m.name = format!("{origin}@{digest}");
        m.origin = origin.into();
        m.digest = digest.into();
        m.data = data;
        f
    }
}

impl BlockSource for Fake {
    fn fetch_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        self.calls.fetch_add(1, SeqCst);
        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if self.fail.load(SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "fake: registry down",
            ));
        }
        lock(&self.ranges).push(ranges.to_vec());
        let mut out = Vec::new();
        for &(off, len) in ranges {
            assert_eq!(off % BS, 0, "ranges start on a block");
            assert!(len as u64 & (BS - 1) == 0 || off + len as u64 == self.data.len() as u64);
            let mut pb = lock(&self.per_block);
            for b in (off..off + len as u64).step_by(BS as usize) {
                *pb.entry(b / BS).or_default() += 1;
            }
            self.fetched.fetch_add(len as u64, SeqCst);
            out.push(self.data[off as usize..off as usize + len].to_vec());
        }
        Ok(out)
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn digest(&self) -> &str {
        &self.digest
    }
    fn origin(&self) -> String {
        self.origin.clone()
    }
}

// ------------------------------------------------------------ OAuth2 token realm (issue 11)
// The token endpoint of docker's and containerd's identity tokens: a POSTed OAuth2
// `refresh_token` grant answered with an `access_token` that a `Front` accepts.

/// One request to an [`OAuthRealm`].
#[derive(Clone, Debug)]
pub(crate) struct Grant {
    pub(crate) method: String,
    pub(crate) content_type: Option<String>,
    pub(crate) authorization: Option<String>,
    /// The form fields (decoded) of a POST, the query's of anything else.
    pub(crate) fields: HashMap<String, String>,
}

/// A token realm on its own port for a [`Front`] with [`FrontAuth::Bearer`]: a POST of the
/// `refresh_token` grant with the refresh token it was made for gets an `access_token` good at
/// the front (for the front's `uses`); anything else gets 401. Records every request.
pub(crate) struct OAuthRealm {
    pub(crate) addr: String,
    pub(crate) grants: Mutex<Vec<Grant>>,
    refresh_token: String,
    front: Arc<Front>,
}

impl Front {
    /// Starts an [`OAuthRealm`] for `refresh_token` and names it in this front's challenges.
    pub(crate) fn oauth_realm(self: &Arc<Self>, refresh_token: &str) -> Arc<OAuthRealm> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = Arc::new(OAuthRealm {
            addr: listener.local_addr().unwrap().to_string(),
            grants: Mutex::new(Vec::new()),
            refresh_token: refresh_token.to_owned(),
            front: self.clone(),
        });
        *self.realm.lock().unwrap() = Some(format!("http://{}/token", realm.addr));
        let weak = Arc::downgrade(&realm);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Some(realm) = weak.upgrade() else { return };
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = realm.serve(conn);
                });
            }
        });
        realm
    }
}

impl OAuthRealm {
    fn serve(&self, mut conn: TcpStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mut parts = request.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let len: usize = header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len.min(1 << 16)];
        reader.read_exact(&mut body)?;
        let encoded = if method == "POST" {
            String::from_utf8_lossy(&body).into_owned()
        } else {
            target.split_once('?').map_or("", |(_, q)| q).to_owned()
        };
        let fields: HashMap<String, String> =
            reqwest::Url::parse(&format!("http://form/?{encoded}"))
                .unwrap()
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let grant = Grant {
            method: method.clone(),
            content_type: header("content-type"),
            authorization: header("authorization"),
            fields: fields.clone(),
        };
        self.grants.lock().unwrap().push(grant);
        let field = |k: &str| fields.get(k).map(String::as_str);
        let good = method == "POST"
            && target.split('?').next() == Some("/token")
            && field("grant_type") == Some("refresh_token")
            && field("refresh_token") == Some(self.refresh_token.as_str());
        let (status, body) = if good {
            let uses = match &self.front.auth {
                Some(FrontAuth::Bearer { uses, .. }) => *uses,
                _ => 1,
            };
            let n = self.front.token_count.fetch_add(1, SeqCst) + 1;
            let token = format!("tok-oauth-{n}");
            self.front
                .tokens
                .lock()
                .unwrap()
                .insert(token.clone(), uses);
            (
                "200 OK",
                format!(
                    r#"{{"access_token":"{token}","expires_in":300,"scope":"{}","refresh_token":"{}"}}"#,
                    field("scope").unwrap_or(""),
                    self.refresh_token
                ),
            )
        } else {
            (
                "401 Unauthorized",
                r#"{"error":"invalid_grant"}"#.to_owned(),
            )
        };
        write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        conn.flush()
    }
}

// ------------------------------------------------------------------------------------------
// Registry pulls and pushes through `Front` (helper "oneclient"): faults for any request.

impl Front {
    /// Queues `faults` for the next `method` requests whose path contains `path_part`
    /// (manifests, HEAD, upload POST/PUT; blob GETs too), before the blob-GET queue. For
    /// requests other than GET, `Reset` and `Truncate` break the exchange before the request
    /// is forwarded (nothing reaches the registry).
    pub(crate) fn push_faults_for(
        &self,
        method: &str,
        path_part: &str,
        faults: impl IntoIterator<Item = Fault>,
    ) {
        let mut t = lock(&self.targeted);
        match t.iter_mut().find(|(m, p, _)| m == method && p == path_part) {
            Some((_, _, q)) => q.extend(faults),
            None => t.push((
                method.into(),
                path_part.into(),
                faults.into_iter().collect(),
            )),
        }
    }

    /// Targeted faults not used yet.
    pub(crate) fn targeted_left(&self) -> usize {
        lock(&self.targeted).iter().map(|(_, _, q)| q.len()).sum()
    }

    fn targeted_fault(&self, method: &str, route: &str) -> Option<Fault> {
        let mut t = lock(&self.targeted);
        t.iter_mut()
            .find(|(m, p, q)| m == method && route.contains(p.as_str()) && !q.is_empty())
            .and_then(|(_, _, q)| q.pop_front())
    }

    /// Requests seen as `(method, target)`.
    pub(crate) fn requests(&self) -> Vec<(String, String)> {
        lock(&self.seen)
            .iter()
            .map(|s| (s.method.clone(), s.target.clone()))
            .collect()
    }
}

/// A sealed uncompressed LSMT layer holding `len` random bytes (from `seed`) at disk offset 0
/// of a 64 MiB disk.
pub(crate) fn lsmt_layer(len: usize, seed: u64) -> Vec<u8> {
    use ovbd_format::commit::{commit_compact, CommitInfo};
    let data = ovbd_format::MemSource::new(random_bytes(len, seed), "data");
    let seg = ovbd_format::Segment {
        offset: 0,
        length: (len / 512) as u32,
        moffset: 0,
        zeroed: false,
        tag: 0,
    };
    let info = CommitInfo {
        virtual_size: 64 << 20,
        uuid: ovbd_format::lsmt::random_uuid(),
        parent_uuid: ovbd_format::lsmt::NIL_UUID.into(),
        user_tag: Vec::new(),
    };
    let mut out = Vec::new();
    commit_compact(&[seg], &data, &info, &mut out).unwrap();
    out
}

/// A layer converted from a tar of `files` (ext4 in one layer, made under `t`): its LSMT file.
pub(crate) fn ext4_layer(t: &std::path::Path, files: &[(&str, Vec<u8>)]) -> std::path::PathBuf {
    use crate::convert::layer::{convert_layer, LayerJob};
    let mut b = tar::Builder::new(Vec::new());
    let header = |path: &str, mode: u32, size: u64, kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(kind);
        h.set_cksum();
        h
    };
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _) in files {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            dirs.insert(path[..at + i].to_string());
            at += i + 1;
        }
    }
    for d in &dirs {
        let h = header(d, 0o755, 0, tar::EntryType::Directory);
        b.append(&h, &[][..]).unwrap();
    }
    for (path, data) in files {
        let h = header(path, 0o644, data.len() as u64, tar::EntryType::Regular);
        b.append(&h, &data[..]).unwrap();
    }
    let tarred = b.into_inner().unwrap();
    let dir = t.join("layer");
    let job = LayerJob {
        lowers: &[],
        dir: &dir,
        vsize: 64 << 20,
        uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31".into(),
        parent_uuid: ovbd_format::lsmt::NIL_UUID.into(),
        mkfs: crate::extfs::MkfsParams {
            uuid: [7; 16],
            now: 1_700_000_000,
        },
        zfile: ovbd_format::ZFileOptions::default(),
    };
    convert_layer(&job, &tarred[..]).unwrap().lsmt
}

/// A block cache in `dir` for tests: refills of [`BS`], no blob whole, no file readahead.
pub(crate) fn block_cache(dir: &std::path::Path) -> Arc<crate::source::cache::BlobCache> {
    let cc = crate::config::CacheConfig {
        dir: Some(dir.to_path_buf()),
        size_gb: 1.0,
        refill_kb: BS >> 10,
        whole_blob_kb: 0,
        file_chunk_kb: 0,
    };
    crate::source::cache::BlobCache::open_with(&cc, dir, Duration::from_secs(3600)).unwrap()
}
