//! The FastAGI server over real TCP on 127.0.0.1, against a scripted client that speaks the
//! protocol the way Asterisk's `res/res_agi.c` does: the `agi_*` variable block in
//! `setup_env` order and a blank line, then one answer line per command (`200 result=1`,
//! `510 Invalid or unknown command`, a multi-line `520-` usage text, a `HANGUP` notice), and
//! commands split into words with Asterisk's `parse_args` quoting rules.

use asterisk_voice_agent::agi;
use asterisk_voice_agent::directory::{CallDirectory, Decision, DEFAULT_TTL};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A running `agi::serve` on an ephemeral port.
struct Server {
    addr: SocketAddr,
    directory: Arc<CallDirectory>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("asterisk_voice_agent=debug")
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let directory = Arc::new(CallDirectory::new(DEFAULT_TTL));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agi::serve(listener, directory.clone(), async {
            let _ = rx.await;
        }));
        Server {
            addr,
            directory,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve did not stop within 5 s")
            .unwrap()
            .unwrap();
    }
}

/// The variable block Asterisk 22 writes for `AGI(agi://127.0.0.1:4573/<script>,<args>)`, in
/// `setup_env` order.
fn asterisk_header(script: &str, args: &[&str]) -> String {
    let mut vars: Vec<(String, String)> = vec![
        ("network", "yes".into()),
        ("network_script", script.into()),
        ("request", format!("agi://127.0.0.1:4573/{script}")),
        ("channel", "PJSIP/100-00000001".into()),
        ("language", "en".into()),
        ("type", "PJSIP".into()),
        ("uniqueid", "1700000000.1".into()),
        ("version", "22.10.1".into()),
        ("callerid", "100".into()),
        ("calleridname", "Alice".into()),
        ("callingpres", "0".into()),
        ("callingani2", "0".into()),
        ("callington", "0".into()),
        ("callingtns", "0".into()),
        ("dnid", "500".into()),
        ("rdnis", "unknown".into()),
        ("context", "voice-agent".into()),
        ("extension", "500".into()),
        ("priority", "2".into()),
        ("enhanced", "0.0".into()),
        ("accountcode", "".into()),
        ("threadid", "140245863651008".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (i, a) in args.iter().enumerate() {
        vars.push((format!("arg_{}", i + 1), a.to_string()));
    }
    let mut s = String::new();
    for (k, v) in vars {
        s.push_str(&format!("agi_{k}: {v}\n"));
    }
    s.push('\n');
    s
}

/// What the client saw in one session.
#[derive(Debug, Default)]
struct Seen {
    /// Raw command lines, in order.
    commands: Vec<String>,
    /// Channel variables set (as Asterisk would store them).
    vars: BTreeMap<String, String>,
    /// The server closed the socket (EOF) after the last command.
    closed: bool,
}

/// Plays Asterisk for one session: sends the header, answers every command with `answer`
/// (which gets the command's words; its string is written as is, so it may hold several lines),
/// until the server closes the socket.
async fn session_with(addr: SocketAddr, header: &str, mut answer: impl FnMut(&[String]) -> String) -> Seen {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(header.as_bytes()).await.unwrap();
    let mut seen = Seen::default();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("the server neither sent a command nor closed within 10 s")
            .unwrap();
        if n == 0 {
            seen.closed = true;
            break;
        }
        assert!(line.ends_with('\n'), "a command line ends with \\n: {line:?}");
        let line = line.trim_end_matches('\n').to_string();
        let words = asterisk_voice_agent::agi::asterisk_parse_args(&line);
        let reply = answer(&words);
        let last = reply.lines().last().unwrap_or("");
        if last.starts_with("200 result=1") && words.len() >= 4 && words[0] == "SET" && words[1] == "VARIABLE" {
            assert_eq!(words.len(), 4, "SET VARIABLE takes exactly 2 words after it: {line:?}");
            seen.vars.insert(words[2].clone(), words[3].clone());
        }
        seen.commands.push(line);
        if w.write_all(reply.as_bytes()).await.is_err() {
            break;
        }
    }
    seen
}

/// A session where Asterisk answers `200 result=1` to everything.
async fn session(addr: SocketAddr, script: &str, args: &[&str]) -> Seen {
    session_with(addr, &asterisk_header(script, args), |_| "200 result=1\n".into()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_start_with_uuid_argument_stores_caller_info() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    let seen = session(srv.addr, "call-start", &[&uuid.to_string()]).await;
    assert!(seen.closed);
    assert_eq!(seen.commands, vec![format!("SET VARIABLE AVA_UUID \"{uuid}\"")]);
    assert_eq!(seen.vars.get("AVA_UUID"), Some(&uuid.to_string()));
    let info = srv.directory.info(uuid).expect("caller info stored under the UUID");
    assert_eq!(info.caller_id.as_deref(), Some("100"));
    assert_eq!(info.caller_name.as_deref(), Some("Alice"));
    assert_eq!(info.dnid.as_deref(), Some("500"));
    assert_eq!(info.language.as_deref(), Some("en"));
    assert_eq!(info.channel.as_deref(), Some("PJSIP/100-00000001"));
    assert_eq!(info.unique_id.as_deref(), Some("1700000000.1"));
    // info() does not consume it: the call reads it at start.
    assert!(srv.directory.info(uuid).is_some());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_start_without_argument_generates_a_uuid() {
    let srv = Server::start().await;
    let seen = session(srv.addr, "call-start", &[]).await;
    assert!(seen.closed);
    assert_eq!(seen.commands.len(), 1);
    let uuid = Uuid::parse_str(seen.vars.get("AVA_UUID").expect("AVA_UUID set")).expect("a valid UUID");
    assert_eq!(uuid.get_version_num(), 4);
    assert_eq!(srv.directory.info(uuid).unwrap().caller_id.as_deref(), Some("100"));

    // An empty argument (`${AVA_UUID}` unset) and a non-UUID one also get a fresh UUID.
    for arg in ["", "not-a-uuid"] {
        let seen = session(srv.addr, "call-start", &[arg]).await;
        let u = Uuid::parse_str(&seen.vars["AVA_UUID"]).unwrap();
        assert_ne!(u, uuid);
        assert!(srv.directory.info(u).is_some());
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_start_missing_caller_id_is_none() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    let header = asterisk_header("call-start", &[&uuid.to_string()])
        .replace("agi_callerid: 100\n", "agi_callerid: unknown\n")
        .replace("agi_calleridname: Alice\n", "agi_calleridname: \n")
        .replace("agi_dnid: 500\n", "");
    let seen = session_with(srv.addr, &header, |_| "200 result=1\n".into()).await;
    assert_eq!(seen.vars["AVA_UUID"], uuid.to_string());
    let info = srv.directory.info(uuid).unwrap();
    assert_eq!((info.caller_id, info.caller_name, info.dnid), (None, None, None));
    assert_eq!(info.language.as_deref(), Some("en"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_end_after_transfer_sets_the_transfer_variables() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    srv.directory.set_decision(
        uuid,
        Decision::Transfer {
            name: "operator".into(),
            destination: "PJSIP/100".into(),
        },
    );
    let seen = session(srv.addr, "call-end", &[&uuid.to_string()]).await;
    assert!(seen.closed);
    assert_eq!(seen.vars.get("AVA_ACTION").map(String::as_str), Some("transfer"));
    assert_eq!(seen.vars.get("AVA_TRANSFER").map(String::as_str), Some("PJSIP/100"));
    assert_eq!(seen.vars.get("AVA_TRANSFER_NAME").map(String::as_str), Some("operator"));
    assert_eq!(seen.commands.len(), 3);
    // The decision was taken: a second call-end for the same UUID says continue.
    let again = session(srv.addr, "call-end", &[&uuid.to_string()]).await;
    assert_eq!(again.vars.get("AVA_ACTION").map(String::as_str), Some("continue"));
    assert_eq!(again.vars.get("AVA_TRANSFER"), None);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_end_after_hangup_decision() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    srv.directory.set_decision(uuid, Decision::Hangup);
    let seen = session(srv.addr, "call-end", &[&uuid.to_string()]).await;
    assert!(seen.closed);
    assert_eq!(seen.commands, vec!["SET VARIABLE AVA_ACTION \"hangup\"".to_string()]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_end_without_decision_continues() {
    let srv = Server::start().await;
    // A known call (call-start ran) that ended with no decision.
    let uuid = Uuid::new_v4();
    session(srv.addr, "call-start", &[&uuid.to_string()]).await;
    let unknown = Uuid::new_v4().to_string();
    for args in [
        vec![uuid.to_string()],
        vec![unknown],
        vec![],
        vec!["".into()],
        vec!["garbage".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let seen = session(srv.addr, "call-end", &args).await;
        assert!(seen.closed);
        assert_eq!(
            seen.commands,
            vec!["SET VARIABLE AVA_ACTION \"continue\"".to_string()],
            "args {args:?}"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_script_gets_a_verbose_and_a_close() {
    let srv = Server::start().await;
    let seen = session(srv.addr, "make-coffee", &["x"]).await;
    assert!(seen.closed);
    assert_eq!(
        seen.commands,
        vec!["VERBOSE \"asterisk-voice-agent: unknown AGI script make-coffee\" 1".to_string()]
    );
    assert!(seen.vars.is_empty());
    // No script at all (agi://127.0.0.1:4573 with no path).
    let header = asterisk_header("", &[]);
    let seen = session_with(srv.addr, &header, |_| "200 result=1\n".into()).await;
    assert_eq!(seen.commands.len(), 1);
    assert!(seen.commands[0].starts_with("VERBOSE "));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_with_spaces_and_quotes_are_quoted() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    let name = r#"front "desk" team"#;
    let destination = r#"Local/100@from internal\x"#;
    srv.directory.set_decision(
        uuid,
        Decision::Transfer {
            name: name.into(),
            destination: destination.into(),
        },
    );
    let seen = session(srv.addr, "call-end", &[&uuid.to_string()]).await;
    // Asterisk's parse_args gives back exactly the original values.
    assert_eq!(seen.vars["AVA_TRANSFER_NAME"], name);
    assert_eq!(seen.vars["AVA_TRANSFER"], destination);
    assert!(
        seen.commands
            .contains(&r#"SET VARIABLE AVA_TRANSFER_NAME "front \"desk\" team""#.to_string()),
        "{:?}",
        seen.commands
    );
    assert!(seen
        .commands
        .contains(&r#"SET VARIABLE AVA_TRANSFER "Local/100@from internal\\x""#.to_string()));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_do_not_stop_the_session() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    srv.directory.set_decision(
        uuid,
        Decision::Transfer {
            name: "operator".into(),
            destination: "PJSIP/100".into(),
        },
    );
    // First command: 510; second: a multi-line 520 usage; third: HANGUP notice, then success.
    let mut n = 0;
    let seen = session_with(srv.addr, &asterisk_header("call-end", &[&uuid.to_string()]), |_| {
        n += 1;
        match n {
            1 => "510 Invalid or unknown command\n".into(),
            2 => "520-Invalid command syntax.  Proper usage follows:\n Usage: SET VARIABLE <variablename> <value>\n520 End of proper usage.\n".into(),
            _ => "HANGUP\n200 result=1\n".into(),
        }
    })
    .await;
    assert!(seen.closed);
    assert_eq!(
        seen.commands.len(),
        3,
        "every variable was still tried: {:?}",
        seen.commands
    );
    assert_eq!(seen.vars.get("AVA_ACTION").map(String::as_str), Some("transfer"));

    // call-start stores the caller info even when Asterisk refuses the variable.
    let uuid = Uuid::new_v4();
    let seen = session_with(srv.addr, &asterisk_header("call-start", &[&uuid.to_string()]), |_| {
        "510 Invalid or unknown command\n".into()
    })
    .await;
    assert!(seen.closed);
    assert!(srv.directory.info(uuid).is_some());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_channel_result_minus_one_ends_the_session() {
    let srv = Server::start().await;
    let uuid = Uuid::new_v4();
    srv.directory.set_decision(
        uuid,
        Decision::Transfer {
            name: "operator".into(),
            destination: "PJSIP/100".into(),
        },
    );
    let seen = session_with(srv.addr, &asterisk_header("call-end", &[&uuid.to_string()]), |_| {
        "200 result=-1\n".into()
    })
    .await;
    assert!(seen.closed);
    assert_eq!(seen.commands.len(), 1, "no more commands after result=-1");
    srv.stop().await;
}

/// Opens a connection, writes `bytes`, then either closes (`close`) or waits; returns how long
/// the server took to close its side.
async fn bad_client(addr: SocketAddr, bytes: Vec<u8>, close: bool) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close before it has read everything (a line over its limit).
    let _ = s.write_all(&bytes).await;
    if close {
        s.shutdown().await.unwrap();
    }
    let mut sink = Vec::new();
    // The server must close (EOF or reset) and send no command.
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .expect("the server did not close a bad session within 10 s");
    if r.is_ok() {
        assert!(
            sink.is_empty(),
            "no command for a bad session: {:?}",
            String::from_utf8_lossy(&sink)
        );
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sessions_are_closed_and_the_server_carries_on() {
    let srv = Server::start().await;
    let addr = srv.addr;
    let header = asterisk_header("call-start", &[]);
    let half = header.as_bytes()[..header.len() / 2].to_vec();
    let mut long = b"agi_network: yes\nagi_callerid: ".to_vec();
    long.extend(std::iter::repeat_n(b'1', agi::MAX_DISCARD + 1024));
    long.extend_from_slice(b"\n\n");
    let tasks = vec![
        // Garbage (an HTTP request).
        tokio::spawn(bad_client(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false)),
        // Binary garbage, not UTF-8.
        tokio::spawn(bad_client(addr, vec![0xff, 0xfe, 0x00, 0x10, b'\n', b'\n'], false)),
        // A line over 64 KiB (agi::MAX_DISCARD).
        tokio::spawn(bad_client(addr, long, false)),
        // Closes half way through the header.
        tokio::spawn(bad_client(addr, half.clone(), true)),
        // Connects and closes at once.
        tokio::spawn(bad_client(addr, Vec::new(), true)),
    ];
    // Sends half a header and then nothing: closed after the 5 s header timeout.
    let stalled = tokio::spawn(bad_client(addr, half, false));
    for t in tasks {
        let took = t.await.unwrap();
        assert!(
            took < Duration::from_secs(2),
            "a bad session was closed promptly ({took:?})"
        );
    }
    // Meanwhile good sessions still work.
    let uuid = Uuid::new_v4();
    let seen = session(addr, "call-start", &[&uuid.to_string()]).await;
    assert_eq!(seen.vars["AVA_UUID"], uuid.to_string());
    // A caller name of 10 KiB (over agi::MAX_LINE) is cut, and the call still starts.
    let uuid = Uuid::new_v4();
    let header = asterisk_header("call-start", &[&uuid.to_string()]).replace(
        "agi_calleridname: Alice\n",
        &format!("agi_calleridname: {}\n", "A".repeat(10 * 1024)),
    );
    let seen = session_with(addr, &header, |_| "200 result=1\n".into()).await;
    assert_eq!(
        seen.vars["AVA_UUID"],
        uuid.to_string(),
        "a long caller name does not fail call-start"
    );
    let name = srv
        .directory
        .info(uuid)
        .and_then(|c| c.caller_name)
        .expect("the caller name is stored");
    assert_eq!(name.chars().count(), agi::MAX_CALLER_VALUE);
    let took = stalled.await.unwrap();
    assert!(
        took >= agi::HEADER_TIMEOUT - Duration::from_millis(100) && took < agi::HEADER_TIMEOUT + Duration::from_secs(2),
        "a stalled header is closed after HEADER_TIMEOUT ({took:?})"
    );
    // And after them all, too.
    let seen = session(addr, "call-start", &[]).await;
    assert!(seen.vars.contains_key("AVA_UUID"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_each_get_their_own_call() {
    let srv = Server::start().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let uuid = Uuid::new_v4();
            let header = asterisk_header("call-start", &[&uuid.to_string()])
                .replace("agi_callerid: 100\n", &format!("agi_callerid: {}\n", 1000 + i));
            let seen = session_with(addr, &header, |_| "200 result=1\n".into()).await;
            assert_eq!(seen.vars["AVA_UUID"], uuid.to_string());
            (uuid, 1000 + i)
        }));
    }
    for t in tasks {
        let (uuid, caller) = t.await.unwrap();
        assert_eq!(srv.directory.info(uuid).unwrap().caller_id, Some(caller.to_string()));
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting() {
    let srv = Server::start().await;
    let addr = srv.addr;
    // A session stalled mid-header while shutting down does not keep serve() running for long.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(b"agi_network: yes\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    srv.stop().await;
    assert!(t.elapsed() < Duration::from_secs(4), "stopped in {:?}", t.elapsed());
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}
