//! VM text made safe to print.

/// Removes control characters from text that came from the VM before it
/// reaches the terminal (no escape-sequence games: ESC, OSC 52, CR, C1
/// codes), and the bidirectional overrides that make text read otherwise
/// than it is. One line: a newline from the VM cannot fake a line of ours.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if unsafe_char(c) { '?' } else { c }).collect()
}

/// [`printable`] for whole messages of agent-vm's own, which may hold VM
/// text and their own line breaks and tabs.
pub fn printable_lines(text: &str) -> String {
    text.chars().map(|c| if unsafe_char(c) && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn printable_lines_keeps_our_line_breaks_only() {
        assert_eq!(
            printable_lines("error: x\n\tthe VM said: \x1b]52;c;Zm9v\x07 \u{202e}txt.exe\r"),
            "error: x\n\tthe VM said: ?]52;c;Zm9v? ?txt.exe?"
        );
        assert_eq!(printable("a\nb\u{2066}"), "a?b?");
    }

    #[test]
    fn printable_strips_escapes() {
        assert_eq!(printable("a\x1b[31mb\n"), "a?[31mb?");
    }
}
