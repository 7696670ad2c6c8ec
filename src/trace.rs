//! W3C trace context (https://www.w3.org/TR/trace-context/): a caller that traces its requests
//! sends `traceparent` as gRPC metadata, and push-manager carries it with each message to the
//! connect-nodes (`BroadCastReq.traceparent`), so that the debug lines both roles log about that
//! message name its trace id and one grep follows it from the business server to the nodes.
//!
//! push-manager takes no part in the trace (it starts no span of its own): it forwards the
//! caller's value as it came. An invalid value is ignored, as the W3C rules want, never a reason
//! to refuse the message.

use std::fmt;

use grpcio::{Metadata, MetadataBuilder};

/// The gRPC metadata key, as W3C names the HTTP header.
pub const METADATA_KEY: &str = "traceparent";

/// The form [`TraceParent::parse`] expects, for error messages.
const FORM: &str = "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lowercase";

/// Bytes of a version-00 traceparent: 2 + 1 + 32 + 1 + 16 + 1 + 2.
const LEN: usize = 55;

/// A valid traceparent, in version 00's form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// Reads a traceparent by the W3C rules: lowercase hex fields, a trace id and a parent id
    /// that are not all zeros, version `ff` refused; a later version than 00 may carry more
    /// after the flags (`-...`), which is dropped, as its trace id and parent id are the same.
    pub fn parse(value: &str) -> Result<TraceParent, String> {
        if !value.is_ascii() {
            return Err(format!("traceparent {value:?} is not ASCII ({FORM})"));
        }
        let bytes = value.as_bytes();
        let version = value.get(..2).filter(|v| is_lower_hex(v)).ok_or_else(|| {
            format!("traceparent {value:?} does not start with a 2-digit lowercase hex version ({FORM})")
        })?;
        if version == "ff" {
            return Err(format!("traceparent {value:?}: version ff is invalid"));
        }
        let length_fits = match version {
            "00" => bytes.len() == LEN,
            _ => bytes.len() == LEN || (bytes.len() > LEN && bytes[LEN] == b'-'),
        };
        if !length_fits {
            return Err(format!("traceparent {value:?} is {} characters, not {LEN} ({FORM})", bytes.len()));
        }
        if [2, 35, 52].iter().any(|&i| bytes[i] != b'-') {
            return Err(format!("traceparent {value:?} is not dash-separated as {FORM}"));
        }
        for (name, field) in [("trace id", &value[3..35]), ("parent id", &value[36..52]), ("flags", &value[53..55])] {
            if !is_lower_hex(field) {
                return Err(format!("traceparent {value:?}: the {name} {field:?} is not lowercase hex"));
            }
            if name != "flags" && field.bytes().all(|b| b == b'0') {
                return Err(format!("traceparent {value:?}: the {name} is all zeros"));
            }
        }
        Ok(TraceParent(format!("00{}", &value[2..LEN])))
    }

    /// The caller's traceparent in `metadata`: `None` without one, an error (to log, not to
    /// refuse the call for) when it is invalid or sent more than once.
    pub fn from_metadata(metadata: &Metadata) -> Option<Result<TraceParent, String>> {
        let mut sent = metadata.iter().filter(|(key, _)| key.eq_ignore_ascii_case(METADATA_KEY)).map(|(_, v)| v);
        let first = sent.next()?;
        if sent.next().is_some() {
            return Some(Err("traceparent sent more than once".into()));
        }
        Some(match std::str::from_utf8(first) {
            Ok(value) => TraceParent::parse(value),
            Err(_) => Err("traceparent is not UTF-8 text".into()),
        })
    }

    /// Adds this traceparent to the metadata of a call.
    pub fn add_to(&self, metadata: &mut MetadataBuilder) {
        // A parsed traceparent is lowercase hex and dashes, which metadata always takes.
        let _ = metadata.add_str(METADATA_KEY, &self.0);
    }

    /// The trace id: 32 lowercase hex digits, what log lines name.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TraceParent {
    type Err = String;

    fn from_str(value: &str) -> Result<TraceParent, String> {
        TraceParent::parse(value)
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_gives_its_trace_id() {
        let t = TraceParent::parse(VALID).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.as_str(), VALID);
        assert_eq!(VALID.parse::<TraceParent>().unwrap(), t);
    }

    #[test]
    fn a_later_version_is_read_as_00_and_its_extra_fields_dropped() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(TraceParent::parse(later).unwrap().as_str(), VALID);
        assert!(TraceParent::parse(&later[..LEN]).is_ok());
        assert!(TraceParent::parse(&format!("{}x", &later[..LEN])).is_err());
    }

    #[test]
    fn invalid_traceparents_are_refused_with_the_reason() {
        let refused = |v: &str| TraceParent::parse(v).unwrap_err();
        assert!(refused("").contains("does not start with a 2-digit lowercase hex version"));
        assert!(refused("bad").contains("is 3 characters, not 55"), "ba is a hex version");
        assert!(refused("trace").contains("does not start with"));
        assert!(refused(&VALID.replacen("00", "ff", 1)).contains("version ff is invalid"));
        assert!(refused(&format!("{VALID}-01")).contains("is 58 characters, not 55"));
        assert!(refused(&VALID[..54]).contains("is 54 characters"));
        assert!(refused(&VALID.replace('-', "_")).contains("is not dash-separated"));
        assert!(refused(&VALID.replace("4bf9", "4BF9")).contains("the trace id \"4BF9"));
        assert!(refused(&VALID.replace("00f067aa", "00f067ax")).contains("the parent id"));
        assert!(refused(&VALID.replace("-01", "-0g")).contains("the flags \"0g\" is not lowercase hex"));
        assert!(refused(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))).contains("the trace id is all zeros"));
        assert!(refused(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", "0".repeat(16)))
            .contains("the parent id is all zeros"));
        assert!(refused("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é").contains("is not ASCII"));
    }

    fn metadata(values: &[&str]) -> Metadata {
        let mut builder = MetadataBuilder::new();
        builder.add_str("authorization", "Bearer x").unwrap();
        for v in values {
            builder.add_str(METADATA_KEY, v).unwrap();
        }
        builder.build()
    }

    #[test]
    fn metadata_gives_none_one_or_an_error() {
        assert_eq!(TraceParent::from_metadata(&metadata(&[])), None);
        assert_eq!(TraceParent::from_metadata(&metadata(&[VALID])), Some(TraceParent::parse(VALID)));
        assert!(TraceParent::from_metadata(&metadata(&["nope"])).unwrap().is_err());
        let twice = TraceParent::from_metadata(&metadata(&[VALID, VALID])).unwrap().unwrap_err();
        assert_eq!(twice, "traceparent sent more than once");
        let mut built = MetadataBuilder::new();
        TraceParent::parse(VALID).unwrap().add_to(&mut built);
        assert_eq!(TraceParent::from_metadata(&built.build()), Some(TraceParent::parse(VALID)));
    }
}
