//! The longest duration any setting takes, so that a flag or a config built in code can never
//! make a thread add it to the clock and overflow `Instant` later.

use std::time::Duration;

/// Ten years: far beyond any sensible timeout or interval.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Refuses a duration past [`MAX_DURATION`], naming the flag it was given with.
pub fn check(flag: &str, value: Duration) -> Result<(), String> {
    if value > MAX_DURATION {
        return Err(format!(
            "{flag} must be at most {} (ten years), got {value:?}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_years_is_the_limit() {
        check("--x", MAX_DURATION).unwrap();
        assert!(check("--x", MAX_DURATION + Duration::from_secs(1)).unwrap_err().starts_with("--x must be at most"));
    }
}
