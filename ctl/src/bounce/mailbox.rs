//! Where bounces are read from: one message file, an mbox (messages split at `From ` lines,
//! `>From ` unquoted), a Maildir (`new/` and `cur/`) or a directory of message files.

use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

/// Larger messages are read only up to this size: a bounce worth reading is small.
pub const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

/// One message and where it came from (a path, or `path#N` for the N-th message of an mbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub origin: String,
    pub raw: Vec<u8>,
}

/// Every message at `path`, in file or name order.
pub fn read_messages(path: &Path) -> io::Result<Vec<Message>> {
    if path.is_dir() {
        let maildir = path.join("cur").is_dir() || path.join("new").is_dir();
        let dirs = if maildir {
            vec![path.join("new"), path.join("cur")]
        } else {
            vec![path.to_path_buf()]
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            let mut here: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            here.sort();
            files.extend(here);
        }
        return files
            .into_iter()
            .map(|f| {
                Ok(Message {
                    origin: f.display().to_string(),
                    raw: read_limited(&f)?,
                })
            })
            .collect();
    }
    let raw = read_limited(path)?;
    Ok(split_mbox(&raw, &path.display().to_string()))
}

/// Reads at most [`MAX_MESSAGE_BYTES`] of a file, or stdin for `-`.
pub fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    if path.as_os_str() == "-" {
        io::stdin().take(MAX_MESSAGE_BYTES).read_to_end(&mut raw)?;
    } else {
        std::fs::File::open(path)?
            .take(MAX_MESSAGE_BYTES)
            .read_to_end(&mut raw)?;
    }
    Ok(raw)
}

/// An mbox split into messages; a text not starting with `From ` is one message.
pub fn split_mbox(raw: &[u8], origin: &str) -> Vec<Message> {
    if !raw.starts_with(b"From ") {
        return vec![Message {
            origin: origin.to_string(),
            raw: raw.to_vec(),
        }];
    }
    let mut out: Vec<Message> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut previous_blank = true;
    for line in raw.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b"From ") && previous_blank {
            if let Some(m) = current.take() {
                out.push(Message {
                    origin: format!("{origin}#{}", out.len() + 1),
                    raw: m,
                });
            }
            current = Some(Vec::new());
            previous_blank = false;
            continue;
        }
        previous_blank = line == b"\n" || line == b"\r\n";
        if let Some(m) = current.as_mut() {
            // mboxrd: one '>' less before a quoted From line
            let unquoted = line.strip_prefix(b">").filter(|rest| {
                let n = rest.iter().take_while(|b| **b == b'>').count();
                rest.get(n..).is_some_and(|r| r.starts_with(b"From "))
            });
            m.extend_from_slice(unquoted.unwrap_or(line));
        }
    }
    if let Some(m) = current {
        out.push(Message {
            origin: format!("{origin}#{}", out.len() + 1),
            raw: m,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbox_is_split_at_from_lines_after_a_blank_line() {
        let mbox = b"From MAILER-DAEMON Tue Mar  4 10:00:00 2025\nSubject: one\n\nbody\nFrom the start of a line\n>From quoted\n\n\
                     From MAILER-DAEMON Tue Mar  4 10:01:00 2025\nSubject: two\n\nbody two\n";
        let msgs = split_mbox(mbox, "box");
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].origin, "box#1");
        let first = String::from_utf8_lossy(&msgs[0].raw);
        assert!(first.starts_with("Subject: one\n"), "{first}");
        assert!(
            first.contains("\nFrom the start of a line\nFrom quoted\n"),
            "{first}"
        );
        assert!(String::from_utf8_lossy(&msgs[1].raw).contains("body two"));
        assert_eq!(split_mbox(b"Subject: x\n\ny\n", "f").len(), 1);
    }

    #[test]
    fn maildir_reads_new_and_cur() {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::fs::write(dir.path().join("new/1"), "Subject: a\n\n").expect("write");
        std::fs::write(dir.path().join("cur/2:2,S"), "Subject: b\n\n").expect("write");
        std::fs::write(dir.path().join("tmp/3"), "Subject: c\n\n").expect("write");
        let msgs = read_messages(dir.path()).expect("read");
        assert_eq!(msgs.len(), 2, "tmp/ is not read");
        assert_eq!(msgs[0].raw, b"Subject: a\n\n");
    }
}
