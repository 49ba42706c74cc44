//! Expected digests (`sha256:<hex>`, `sha512:<hex>`) and the hasher that
//! computes both while bytes stream past.
//!
//! Both digests are always computed, so a cache entry records both and a
//! later request with either algorithm is answered without re-reading the
//! image (which, for `.zst` sources, no longer exists in its downloaded form).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256, Sha512};

/// Errors of parsing a checksum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// The text has no `algorithm:` prefix.
    #[error("Checksum {0:?} has no algorithm prefix (expected sha256:<hex> or sha512:<hex>)")]
    MissingAlgorithm(String),
    /// The algorithm is neither `sha256` nor `sha512`.
    #[error("Unsupported checksum algorithm {0:?} (expected sha256 or sha512)")]
    UnknownAlgorithm(String),
    /// The digest is not hex of the algorithm's length.
    #[error("Checksum digest must be {expected} hex digits")]
    BadDigest {
        /// Hex digits the algorithm needs.
        expected: usize,
    },
}

/// A digest algorithm accepted in `checksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The name used as prefix: `sha256`, `sha512`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// An expected digest, as written in an Image's `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// The digest, lowercase hex.
    pub hex: String,
}

impl FromStr for Checksum {
    type Err = ChecksumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| ChecksumError::MissingAlgorithm(s.to_owned()))?;
        let algorithm = match alg.to_ascii_lowercase().as_str() {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(ChecksumError::UnknownAlgorithm(alg.to_owned())),
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChecksumError::BadDigest {
                expected: algorithm.hex_len(),
            });
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// Both digests of a byte stream, lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Digests {
    /// SHA-256.
    pub sha256: String,
    /// SHA-512.
    pub sha512: String,
}

impl Digests {
    /// The digest of `algorithm` as a [`Checksum`].
    pub fn get(&self, algorithm: Algorithm) -> Checksum {
        let hex = match algorithm {
            Algorithm::Sha256 => &self.sha256,
            Algorithm::Sha512 => &self.sha512,
        };
        Checksum {
            algorithm,
            hex: hex.clone(),
        }
    }

    /// Whether these digests satisfy `expected`.
    pub fn matches(&self, expected: &Checksum) -> bool {
        self.get(expected.algorithm) == *expected
    }
}

/// Computes [`Digests`] incrementally.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hasher {
    sha256: Sha256,
    sha512: Sha512,
}

impl Hasher {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.sha512.update(bytes);
    }

    pub(crate) fn finish(self) -> Digests {
        Digests {
            sha256: hex::encode(self.sha256.finalize()),
            sha512: hex::encode(self.sha512.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_algorithms_case_insensitively() {
        let c: Checksum = format!("SHA256:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.to_string(), format!("sha256:{}", "ab".repeat(32)));
        let c: Checksum = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha512);
    }

    #[test]
    fn rejects_malformed_checksums() {
        assert!(matches!(
            "abc".parse::<Checksum>(),
            Err(ChecksumError::MissingAlgorithm(_))
        ));
        assert!(matches!(
            format!("md5:{}", "0".repeat(32)).parse::<Checksum>(),
            Err(ChecksumError::UnknownAlgorithm(_))
        ));
        assert_eq!(
            "sha256:abc".parse::<Checksum>(),
            Err(ChecksumError::BadDigest { expected: 64 })
        );
        assert_eq!(
            format!("sha256:{}", "g".repeat(64)).parse::<Checksum>(),
            Err(ChecksumError::BadDigest { expected: 64 })
        );
    }

    #[test]
    fn hasher_matches_known_digests() {
        let mut h = Hasher::default();
        h.update(b"ab");
        h.update(b"c");
        let d = h.finish();
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(d.sha512.starts_with("ddaf35a193617aba"));
        assert!(d.matches(&format!("sha256:{}", d.sha256).parse().unwrap()));
        assert!(!d.matches(&format!("sha512:{}", "0".repeat(128)).parse().unwrap()));
    }
}
