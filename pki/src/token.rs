//! Enrolment tokens: a random secret (what proves the right to one certificate) and the SHA-256
//! fingerprint of the CA (what the agent pins the collector by), in one pasteable string
//! `mxs1.<secret, base64url>.<fingerprint, hex>`. The collector keeps only [`Token::hash`].

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SecureRandom;

use crate::{Fingerprint, PkiError};

const PREFIX: &str = "mxs1.";
const RULE: &str = "a token looks like mxs1.<43 characters>.<64 hex digits>, as 'mxscopectl token \
                    create' prints it; copy it whole";

/// An enrolment token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    secret: [u8; 32],
    /// The CA whose certificate the collector presents.
    pub ca: Fingerprint,
}

impl Token {
    /// A new token with a secret from the system's CSPRNG.
    pub fn generate(ca: Fingerprint) -> Result<Token, PkiError> {
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| PkiError::Invalid {
                what: "random source",
                value: "getrandom".into(),
                why: "the system's random number generator failed",
            })?;
        Ok(Token { secret, ca })
    }

    /// The SHA-256 of the secret, hex: the only form the collector stores.
    pub fn hash(&self) -> String {
        crate::revocation::sha256_hex(&self.secret)
    }

    /// The first 12 hex digits of [`Token::hash`]: how lists and revocations name the token.
    pub fn id(&self) -> String {
        self.hash()[..12].to_string()
    }
}

impl fmt::Debug for Token {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id())
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Token {
    /// The token as the operator pastes it (this is the secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(self.secret),
            self.ca
        )
    }
}

impl FromStr for Token {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Token, PkiError> {
        // The error never repeats the text: it may be a real token with a typo.
        let invalid = || PkiError::Invalid {
            what: "enrolment token",
            value: "(not shown)".into(),
            why: RULE,
        };
        let rest = s.trim().strip_prefix(PREFIX).ok_or_else(invalid)?;
        let (secret, ca) = rest.split_once('.').ok_or_else(invalid)?;
        let bytes = URL_SAFE_NO_PAD.decode(secret).map_err(|_| invalid())?;
        let secret: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
        let ca = ca.parse::<Fingerprint>().map_err(|_| invalid())?;
        Ok(Token { secret, ca })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9b0c5a1e2d3f4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233";

    #[test]
    fn tokens_round_trip_and_name_themselves_by_hash() {
        let t = Token::generate(FP.parse().unwrap()).unwrap();
        let text = t.to_string();
        assert!(text.starts_with("mxs1.") && text.ends_with(FP), "{text}");
        let back: Token = text.parse().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.hash().len(), 64);
        assert_eq!(back.id(), back.hash()[..12]);
        let other = Token::generate(FP.parse().unwrap()).unwrap();
        assert_ne!(other.hash(), t.hash(), "secrets are random");
        assert!(
            !format!("{t:?}").contains(&text[5..20]),
            "Debug hides the secret"
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_them() {
        let good = Token::generate(FP.parse().unwrap()).unwrap().to_string();
        for bad in [
            "",
            "mxs1.",
            &good[..good.len() - 1],
            &good.replacen("mxs1.", "mxs2.", 1),
            &good.replacen('.', "", 2),
            &format!("{good}0"),
            "mxs1.c2VjcmV0.9b0c",
        ] {
            let err = bad.parse::<Token>().expect_err(bad).to_string();
            assert!(err.contains("mxs1.<43 characters>"), "{err}");
            assert!(bad.len() < 10 || !err.contains(&bad[5..10]), "{err}");
        }
    }
}
