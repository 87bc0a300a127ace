//! Object-store secrets kept in a volume's format record, sealed rather than in clear.
//!
//! A secret is sealed with AES-256-GCM under a key derived from the volume's UUID, with the
//! volume name as associated data. This keeps secrets out of dumps, logs, `tidefs status` and
//! casual reads of the metadata, and detects tampering; it is not protection against someone
//! who can read the whole format record, since the UUID is in it too. Whoever can read the
//! metadata must be trusted with the keys, exactly as with JuiceFS's `--encrypt-secret`.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::digest::{digest, SHA256};

/// The prefix marking a sealed value and its scheme.
const SCHEME: &str = "sealed-v1:";

/// Why a stored secret could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The stored value is damaged, was sealed for another volume, or uses an unknown scheme.
    #[error("the stored secret key cannot be read ({0}); format the volume again with the keys")]
    Unreadable(&'static str),
}

fn key_for(uuid: &str) -> LessSafeKey {
    let material = digest(
        &SHA256,
        format!("tidefs secret key for volume {uuid}").as_bytes(),
    );
    let unbound = UnboundKey::new(&AES_256_GCM, material.as_ref()).expect("32-byte key");
    LessSafeKey::new(unbound)
}

/// Seals `plain` for the volume `uuid` named `name`.
pub fn seal(uuid: &str, name: &str, plain: &str) -> String {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut buf = plain.as_bytes().to_vec();
    key_for(uuid)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(name.as_bytes()),
            &mut buf,
        )
        .expect("sealing a short secret");
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&buf);
    format!("{SCHEME}{}", aws_smithy_types::base64::encode(&out))
}

/// Opens a value made by [`seal`] for the same volume.
pub fn open(uuid: &str, name: &str, sealed: &str) -> Result<String, SecretError> {
    let b64 = sealed
        .strip_prefix(SCHEME)
        .ok_or(SecretError::Unreadable("unknown scheme"))?;
    let mut raw =
        aws_smithy_types::base64::decode(b64).map_err(|_| SecretError::Unreadable("not base64"))?;
    if raw.len() < NONCE_LEN {
        return Err(SecretError::Unreadable("too short"));
    }
    let mut body = raw.split_off(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = raw.try_into().expect("split at NONCE_LEN");
    let plain = key_for(uuid)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut body,
        )
        .map_err(|_| SecretError::Unreadable("authentication failed"))?;
    String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Unreadable("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_volume() {
        let uuid = "6f1c2e1a-0000-4000-8000-000000000001";
        let sealed = seal(uuid, "vol", "wJalrXUtnFEMI/K7MDENG");
        assert!(sealed.starts_with(SCHEME));
        assert!(!sealed.contains("wJalr"), "{sealed}");
        assert_ne!(
            sealed,
            seal(uuid, "vol", "wJalrXUtnFEMI/K7MDENG"),
            "fresh nonce"
        );
        assert_eq!(open(uuid, "vol", &sealed).unwrap(), "wJalrXUtnFEMI/K7MDENG");
        assert!(open("another-uuid", "vol", &sealed).is_err());
        assert!(open(uuid, "other", &sealed).is_err());
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(open(uuid, "vol", &tampered).is_err());
        assert!(open(uuid, "vol", "plain-secret").is_err());
        assert!(open(uuid, "vol", "sealed-v1:!!").is_err());
        assert!(open(uuid, "vol", "sealed-v1:AAAA").is_err());
    }
}
