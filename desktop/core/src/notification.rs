//! The text of a desktop notification. Freedesktop notification servers (GNOME Shell, KDE
//! Plasma, dunst, mako, xfce4-notifyd) read the body as markup: a small subset of HTML
//! (`<b>`, `<i>`, `<a href>`, `<img src>`) and XML entities. A message body is text someone
//! else typed, so it is made inert here: markup characters are escaped (a server that reads
//! markup shows them as typed; `<img src>` in a message must not make it load a file or a
//! URL), control characters and line breaks become spaces, and it is cut to a short preview.
//! The summary (title) is plain text by the specification and is only cleaned and cut.

/// At most this many characters of a message show in a notification.
pub const NOTIFICATION_BODY_CHARS: usize = 200;
const NOTIFICATION_TITLE_CHARS: usize = 80;

/// A notification body from untrusted text: plain text, escaped for notification markup.
pub fn notification_body(text: &str) -> String {
    let mut out = String::new();
    for c in one_line(text, NOTIFICATION_BODY_CHARS).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A notification title (summary) from untrusted text (a room or user name): plain text.
pub fn notification_title(text: &str) -> String {
    one_line(text, NOTIFICATION_TITLE_CHARS)
}

/// `text` on one line (control characters, line and paragraph separators and runs of
/// white space become one space; bidirectional overrides go), at most `max` characters with
/// an ellipsis when cut.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    let mut space = false;
    for c in text.trim().chars() {
        if is_bidi_control(c) {
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            space = true;
            continue;
        }
        if count + usize::from(space) + 1 > max {
            out.push('…');
            return out;
        }
        if space {
            out.push(' ');
            count += 1;
            space = false;
        }
        out.push(c);
        count += 1;
    }
    out
}

/// Characters that reorder the text around them (a name could otherwise make the rest of a
/// notification read backwards).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_a_message_is_shown_not_interpreted() {
        assert_eq!(
            notification_body(r#"<b>hi</b> <img src="file:///etc/passwd"/> <a href="https://evil.example">x</a>"#),
            "&lt;b&gt;hi&lt;/b&gt; &lt;img src=&quot;file:///etc/passwd&quot;/&gt; \
             &lt;a href=&quot;https://evil.example&quot;&gt;x&lt;/a&gt;"
        );
        assert_eq!(notification_body("fish & chips &amp; 'peas'"), "fish &amp; chips &amp;amp; &apos;peas&apos;");
        // No '<' or '>' of the input survives as markup, whatever it is.
        for hostile in ["<", "<<b>>", "&lt;b&gt;", "<![CDATA[<b>x</b>]]>", "<!-- -->", "\u{0}<b>"] {
            let body = notification_body(hostile);
            assert!(!body.contains('<') && !body.contains('>'), "{hostile:?} -> {body:?}");
        }
    }

    #[test]
    fn a_message_becomes_one_short_line() {
        assert_eq!(notification_body("  line one\n\nline\ttwo\r\n "), "line one line two");
        assert_eq!(notification_body("bell\u{7}and\u{1b}[31mred"), "bell and [31mred");
        assert_eq!(notification_title("\u{202E}evil\u{202C} room\nname"), "evil room name");
        let long = "ab ".repeat(200);
        let body = notification_body(&long);
        assert!(body.ends_with('…'));
        assert_eq!(body.chars().count(), NOTIFICATION_BODY_CHARS + 1);
        assert_eq!(notification_title(&"x".repeat(500)).chars().count(), NOTIFICATION_TITLE_CHARS + 1);
        assert_eq!(notification_body("Notifications are working."), "Notifications are working.");
        assert_eq!(notification_body("👋 héllo"), "👋 héllo");
    }
}
