//! A private nginx (`nginx -p DIR -c FILE`, foreground, own pid, logs and temp paths) serving
//! static files over HTTPS on a loopback address and free port, one `server` per site (SNI).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::binaries::system_tool;
use crate::certs::CertFiles;
use crate::lab::{path_str, read_tail, write_file, Lab};
use crate::net::{free_port, is_listening};
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// One HTTPS virtual host: its name, certificate and files (`/path` → content).
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    pub cert: CertFiles,
    pub files: Vec<(String, String)>,
}

impl Site {
    pub fn new(name: &str, cert: CertFiles) -> Self {
        Site {
            name: name.to_string(),
            cert,
            files: Vec::new(),
        }
    }

    /// Serves `content` at `path` (e.g. `/.well-known/mta-sts.txt`).
    pub fn file(mut self, path: &str, content: &str) -> Self {
        self.files.push((path.to_string(), content.to_string()));
        self
    }
}

/// A running private nginx; stopped (SIGTERM to its master, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Nginx {
    proc: Proc,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Writes `<lab>/nginx-<name>` (config, one document root per site), starts nginx in the
    /// foreground and waits until it accepts connections.
    pub fn start(lab: &Lab, name: &str, ip: Ipv4Addr, sites: &[Site]) -> Result<Nginx> {
        if sites.is_empty() {
            bail!("nginx needs at least one site");
        }
        let bin = system_tool("nginx", "nginx-light")?;
        let dir = lab.subdir(&format!("nginx-{name}"))?;
        lab.subdir(&format!("nginx-{name}/tmp"))?;
        let addr = SocketAddr::from((ip, free_port(ip)?));
        let mut servers = String::new();
        for (i, site) in sites.iter().enumerate() {
            let root = lab.subdir(&format!("nginx-{name}/site{i}"))?;
            for (path, content) in &site.files {
                let file = root.join(path.trim_start_matches('/'));
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                write_file(&file, content)?;
            }
            servers += &format!(
                "  server {{\n    listen {addr} ssl;\n    server_name {};\n    \
                 ssl_certificate {};\n    ssl_certificate_key {};\n    root {};\n  }}\n",
                site.name,
                path_str(&site.cert.cert)?,
                path_str(&site.cert.key)?,
                path_str(&root)?
            );
        }
        let d = path_str(&dir)?;
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{\n  worker_connections 64;\n}}\n\
             http {{\n  access_log {d}/access.log;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp/scgi;\n\
             \x20 types {{\n    text/plain txt;\n  }}\n  default_type application/octet-stream;\n\
             {servers}}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        write_file(&conf_path, conf)?;
        let spec = Spec::new("nginx", &bin).args(["-p", &d, "-c", &path_str(&conf_path)?]);
        let mut proc = Proc::spawn(spec, &dir)?;
        let error_log = dir.join("error.log");
        wait_for(
            &format!("nginx to accept on {addr}"),
            Duration::from_secs(20),
            || {
                if !proc.is_running() {
                    bail!(
                        "nginx exited during startup ({:?}):\n{}\n{}",
                        proc.exit_status(),
                        proc.log_tail(30),
                        read_tail(&error_log)
                    );
                }
                Ok(is_listening(addr).then_some(()))
            },
        )?;
        Ok(Nginx { proc, addr, dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The access log (one line per request served).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
