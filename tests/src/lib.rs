//! Lab harness for mxscope's end-to-end tests: private instances of Postfix, Dovecot and nsd on
//! loopback, a throw-away CA, and wrappers that run the real mxscope binaries against them.

pub mod binaries;
pub mod browser;
pub mod certs;
pub mod debroot;
pub mod dovecot;
pub mod exim;
pub mod faults;
pub mod lab;
pub mod mxscope;
pub mod net;
pub mod netlab;
pub mod netns;
pub mod nginx;
pub mod nsd;
pub mod opensmtpd;
pub mod postfix;
pub mod postgres;
pub mod probes;
pub mod process;
pub mod smtp_fixup;
pub mod smtp_send;
pub mod tls;
pub mod wait;

pub use lab::Lab;
pub use wait::wait_until;
