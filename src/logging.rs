//! Log output. Off a terminal (files, containers, log collectors), or when
//! `RUST_LOG` is set, every line is `tracing`'s full format: time, level,
//! module. On a terminal a person reads along, so lines are short: the
//! message and its fields, with `warning:` / `error:` in front where it
//! matters. `GRADCAST_LOG_STYLE=short|full` decides instead (`gradcast run`
//! hands its own choice to the processes it starts, whose output it prints).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable that picks the style.
pub const STYLE_ENV: &str = "GRADCAST_LOG_STYLE";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Message and fields only.
    Short,
    /// Time, level, module, message and fields.
    Full,
}

impl Style {
    /// The style for this process (see the module's documentation).
    pub fn detect() -> Style {
        match std::env::var(STYLE_ENV).as_deref() {
            Ok("short") => return Style::Short,
            Ok("full") => return Style::Full,
            _ => {}
        }
        if std::env::var_os("RUST_LOG").is_some()
            || !std::io::IsTerminal::is_terminal(&std::io::stderr())
        {
            Style::Full
        } else {
            Style::Short
        }
    }

    /// The value of [`STYLE_ENV`] that selects this style.
    pub fn name(self) -> &'static str {
        match self {
            Style::Short => "short",
            Style::Full => "full",
        }
    }
}

/// Short lines: `message key=value …`, warnings and errors marked.
struct Short;

impl<S, N> FormatEvent<S, N> for Short
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global subscriber (stderr, `RUST_LOG` or `info`).
pub fn init(style: Style) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match style {
        Style::Full => builder.init(),
        Style::Short => builder.event_format(Short).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_lines_carry_the_message_and_fields_and_mark_warnings() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .event_format(Short)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(node = 3, "node joined");
            tracing::warn!("lost the coordinator");
            tracing::error!(code = 2, "gave up");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "node joined node=3\nwarning: lost the coordinator\nerror: gave up code=2\n"
        );
    }
}
