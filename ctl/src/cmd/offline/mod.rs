//! Commands that need no collector: the certificate authority and enrolment (`ca`, `enroll`,
//! `admin-cert`, on a CA directory), the bounce explainer (`bounce`, on a saved message) and the SPF evaluator (`spf check`, which
//! resolves DNS itself).

pub(crate) mod bounce;
pub(crate) mod pki;
pub(crate) mod spf;
