//! Commands that need no collector: the certificate authority and enrolment (`ca`, `enroll`,
//! `admin-cert`, on a CA directory) and the bounce explainer (`bounce`, on a saved message).

pub(crate) mod bounce;
pub(crate) mod pki;
