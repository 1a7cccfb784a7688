//! Plain-text tables for human output: a header row, left-aligned columns separated by two
//! spaces, no borders (so `grep` and `awk` keep working on them).

/// A table being built row by row.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// "3s", "4m10s", "2h05m", "3d04h" for a duration in milliseconds.
pub fn format_age_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
        _ => format!("{}d{:02}h", s / 86_400, (s / 3600) % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["NAME", "SIZE"]);
        t.row(vec!["a-long-name".into(), "10 GiB".into()]);
        t.row(vec!["b".into(), "4 KiB".into()]);
        assert_eq!(
            t.render(),
            "NAME         SIZE\na-long-name  10 GiB\nb            4 KiB\n"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(format_age_ms(999), "0s");
        assert_eq!(format_age_ms(250_000), "4m10s");
        assert_eq!(format_age_ms(7_500_000), "2h05m");
        assert_eq!(format_age_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }
}
