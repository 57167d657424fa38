//! Error formatting shared by the clients of HTTP services.

/// Formats an error followed by its sources. reqwest and the AWS SDK put the useful part (such as
/// "connection refused") in the sources, which `Display` leaves out.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
