//! Error text for people.

/// The message of a Candle error without the backtrace Candle attaches when
/// `RUST_BACKTRACE` is set: what a user (or an error wrapping this one)
/// should read.
pub fn message(error: &candle::Error) -> String {
    match error {
        candle::Error::WithBacktrace { inner, .. } => message(inner),
        candle::Error::Context { inner, context } => format!("{context}: {}", message(inner)),
        candle::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), message(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_backtraces_and_keeps_context() {
        let inner = candle::Error::Msg("tensor x missing".into()).bt();
        let e = candle::Error::Context {
            inner: Box::new(inner),
            context: Box::new("loading"),
        };
        assert_eq!(super::message(&e), "loading: tensor x missing");
    }
}
