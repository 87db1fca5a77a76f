//! A proxy-wasm HTTP filter for testing hosts, written against the proxy-wasm Rust SDK as any
//! third-party filter is. The request path picks what it does, so one module covers the cases
//! where the wasmtime host must behave as Envoy does:
//!
//! - `/hello`: a local reply, 200, header `hello: World`, body `Hello, World!\n`;
//! - `/about`: a local reply naming the root id, the VM configuration and the plugin
//!   configuration as the host gave them;
//! - `/auth/...`: pauses the request on an HTTP callout to the cluster the plugin configuration
//!   names (path and all); an answer whose body starts with an even byte resumes the request,
//!   anything else (an odd byte, an empty body, a failed call) is a local 403;
//! - `/auth-nowhere/...`: the same callout to a cluster no proxy has; dispatching fails, and the
//!   filter panics on that failure, as SDK examples that unwrap do;
//! - `/two/...`: pauses on two callouts (`/first`, then the path), whose answers may arrive in
//!   either order; once both have, the path's answer decides as above;
//! - `/stall`: pauses and never resumes;
//! - `/panic`: panics;
//! - anything else goes upstream, and the response gets `x-guest: seen`.
//!
//! A panic traps the VM: what the host does after one is what the tests look at.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The plugin's root: keeps the configuration the host gave.
#[derive(Default)]
struct Root {
    vm_config: String,
    plugin_config: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm_config = text(self.get_vm_configuration());
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.plugin_config = text(self.get_plugin_configuration());
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Call {
            vm_config: self.vm_config.clone(),
            cluster: self.plugin_config.trim().to_string(),
            plugin_config: self.plugin_config.clone(),
            pending: 0,
            deciding: None,
            verdict: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn text(bytes: Option<Vec<u8>>) -> String {
    String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
}

/// One request.
struct Call {
    vm_config: String,
    plugin_config: String,
    /// The cluster `/auth/...` calls.
    cluster: String,
    /// Callouts not yet answered.
    pending: u32,
    /// The callout whose answer decides (`None`: the last one to arrive).
    deciding: Option<u32>,
    /// What that answer said: may the request go on.
    verdict: Option<bool>,
}

impl Call {
    /// Dispatches a GET of `path` to `cluster`; the host's refusal comes back as is.
    fn call_out(&mut self, cluster: &str, path: &str) -> Result<u32, proxy_wasm::types::Status> {
        let token = self.dispatch_http_call(
            cluster,
            vec![(":method", "GET"), (":path", path), (":authority", "auth")],
            None,
            vec![],
            Duration::from_secs(5),
        )?;
        self.pending += 1;
        Ok(token)
    }
}

impl Context for Call {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        self.pending = self.pending.saturating_sub(1);
        if self.deciding.is_none_or(|t| t == token) {
            let body = self
                .get_http_call_response_body(0, body_size)
                .unwrap_or_default();
            self.verdict = Some(body.first().is_some_and(|b| b % 2 == 0));
        }
        if self.pending > 0 {
            return;
        }
        if self.verdict == Some(true) {
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![], Some(b"Access forbidden.\n"));
        }
    }
}

impl HttpContext for Call {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let first = path.split('/').nth(1).unwrap_or("");
        match first {
            "hello" => {
                self.send_http_response(200, vec![("hello", "World")], Some(b"Hello, World!\n"));
                Action::Pause
            }
            "about" => {
                let root_id = text(self.get_property(vec!["plugin_root_id"]));
                let body = format!(
                    "root_id={root_id}\nvm_config={}\nplugin_config={}\n",
                    self.vm_config, self.plugin_config
                );
                self.send_http_response(200, vec![], Some(body.as_bytes()));
                Action::Pause
            }
            "auth" => {
                let cluster = self.cluster.clone();
                match self.call_out(&cluster, &path) {
                    Ok(_) => Action::Pause,
                    Err(_) => {
                        self.send_http_response(503, vec![], Some(b"no auth service\n"));
                        Action::Pause
                    }
                }
            }
            "auth-nowhere" => {
                if let Err(status) = self.call_out("nowhere", &path) {
                    panic!("dispatching to cluster nowhere failed: {status:?}");
                }
                Action::Pause
            }
            "two" => {
                let cluster = self.cluster.clone();
                let both = self
                    .call_out(&cluster, "/first")
                    .and_then(|_| self.call_out(&cluster, &path));
                match both {
                    Ok(token) => {
                        self.deciding = Some(token);
                        Action::Pause
                    }
                    Err(_) => {
                        self.send_http_response(503, vec![], Some(b"no auth service\n"));
                        Action::Pause
                    }
                }
            }
            "stall" => Action::Pause,
            "panic" => panic!("asked to panic"),
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header("x-guest", Some("seen"));
        Action::Continue
    }
}
