//! A pure-Rust ISO 9660 writer for one flat directory of small files, used
//! for the NoCloud seed when no ISO tool is installed.
//!
//! The image carries three views of the same files, so every reader finds
//! the real (lowercase, dashed) names:
//!
//! * the ISO 9660 level 1 tree, names mangled to `USER_DAT.;1`;
//! * Rock Ridge (SUSP `SP`/`CE`/`ER`, RRIP `RR`/`NM`/`PX`) on that tree,
//!   which Linux isofs prefers when the root's `ER` announces it;
//! * a Joliet tree (UCS-2 names, no `;1`, as genisoimage writes them) for
//!   readers without Rock Ridge.
//!
//! ```text
//!  sector  0..16   system area (zeros)
//!          16      primary volume descriptor
//!          17      Joliet supplementary volume descriptor
//!          18      volume descriptor set terminator
//!          19..23  path tables: primary L, M; Joliet L, M
//!          23      SUSP continuation area (the root's ER entry)
//!          24..    primary root directory, then the Joliet root directory
//!          ..      file data, shared by both trees
//! ```

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Timelike, Utc};

/// Bytes per logical sector (and logical block).
pub const SECTOR: usize = 2048;

const FIRST_PATH_TABLE: u32 = 19;
const CONTINUATION: u32 = 23;
const FIRST_DIR: u32 = 24;

const ER_ID: &str = "RRIP_1991A";
const ER_DESCRIPTOR: &str =
    "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const ER_SOURCE: &str = "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// Joliet names are limited to 64 UCS-2 characters.
const MAX_NAME: usize = 64;
/// A file's record (33 + 13 + RR 5 + PX 36 + NM 5 + name) must fit in
/// 255 bytes.
const MAX_NAME_BYTES: usize = 160;

/// Errors of the ISO 9660 writer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IsoError {
    /// A file name is empty, too long, or has a character no tree can hold.
    #[error("Invalid file name {0:?}")]
    InvalidName(String),
    /// Two files have the same name.
    #[error("Duplicate file name {0:?}")]
    DuplicateName(String),
    /// The volume label is not 1–32 printable ASCII characters.
    #[error("Invalid volume label {0:?}")]
    InvalidLabel(String),
    /// A file does not fit in an ISO 9660 extent (4 GiB).
    #[error("File {0:?} is too large")]
    TooLarge(String),
}

/// A flat ISO 9660 image being put together.
#[derive(Debug, Clone)]
pub struct IsoImage {
    label: String,
    time: DateTime<Utc>,
    files: Vec<(String, Vec<u8>)>,
}

/// One file as laid out in the image.
struct Entry<'a> {
    name: &'a str,
    iso_name: String,
    data: &'a [u8],
    lba: u32,
}

impl IsoImage {
    /// An empty image with volume label `label`, stamped with the current time.
    pub fn new(label: impl Into<String>) -> Self {
        IsoImage {
            label: label.into(),
            time: Utc::now(),
            files: Vec::new(),
        }
    }

    /// Stamps every timestamp in the image with `time` (for reproducible images).
    pub fn with_time(mut self, time: DateTime<Utc>) -> Self {
        self.time = time;
        self
    }

    /// Adds a file to the root directory.
    pub fn file(mut self, name: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), data.into()));
        self
    }

    /// The whole image.
    pub fn build(&self) -> Result<Vec<u8>, IsoError> {
        if self.label.is_empty()
            || self.label.len() > 32
            || !self
                .label
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(IsoError::InvalidLabel(self.label.clone()));
        }
        let mut seen = HashSet::new();
        for (name, data) in &self.files {
            validate_name(name)?;
            if !seen.insert(name.as_str()) {
                return Err(IsoError::DuplicateName(name.clone()));
            }
            if u32::try_from(data.len()).is_err() {
                return Err(IsoError::TooLarge(name.clone()));
            }
        }
        let iso_names = mangle_names(self.files.iter().map(|(n, _)| n.as_str()));
        let mut entries: Vec<Entry<'_>> = self
            .files
            .iter()
            .zip(iso_names)
            .map(|((name, data), iso_name)| Entry {
                name,
                iso_name,
                data,
                lba: 0,
            })
            .collect();

        // Directory sizes depend only on names, so lay them out first.
        let date = dir_date(self.time);
        let primary_len = self.primary_dir(&entries, 0, &date).len();
        let joliet_len = self.joliet_dir(&entries, 0, &date).len();
        let primary_lba = FIRST_DIR;
        let joliet_lba = primary_lba + sectors(primary_len);
        let mut next = joliet_lba + sectors(joliet_len);
        for e in &mut entries {
            if e.data.is_empty() {
                continue;
            }
            e.lba = next;
            next += sectors(e.data.len());
        }
        let total = next;

        let mut img = vec![0u8; total as usize * SECTOR];
        let primary = self.primary_dir(&entries, primary_lba, &date);
        let joliet = self.joliet_dir(&entries, joliet_lba, &date);
        put(
            &mut img,
            16,
            &self.volume_descriptor(false, total, primary_lba, primary.len()),
        );
        put(
            &mut img,
            17,
            &self.volume_descriptor(true, total, joliet_lba, joliet.len()),
        );
        put(&mut img, 18, &terminator());
        put(&mut img, FIRST_PATH_TABLE, &path_table(primary_lba, false));
        put(
            &mut img,
            FIRST_PATH_TABLE + 1,
            &path_table(primary_lba, true),
        );
        put(
            &mut img,
            FIRST_PATH_TABLE + 2,
            &path_table(joliet_lba, false),
        );
        put(
            &mut img,
            FIRST_PATH_TABLE + 3,
            &path_table(joliet_lba, true),
        );
        put(&mut img, CONTINUATION, &er_entry());
        put(&mut img, primary_lba, &primary);
        put(&mut img, joliet_lba, &joliet);
        for e in &entries {
            put(&mut img, e.lba, e.data);
        }
        Ok(img)
    }

    fn volume_descriptor(
        &self,
        joliet: bool,
        total: u32,
        root_lba: u32,
        root_len: usize,
    ) -> Vec<u8> {
        let mut d = vec![0u8; SECTOR];
        d[0] = if joliet { 2 } else { 1 };
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        let text = |d: &mut [u8], at: usize, len: usize, s: &str| {
            if joliet {
                d[at..at + len].copy_from_slice(&ucs2_field(s, len));
            } else {
                d[at..at + len].copy_from_slice(&ascii_field(s, len));
            }
        };
        text(&mut d, 8, 32, "LINUX");
        text(&mut d, 40, 32, &self.label);
        both32(&mut d[80..88], total);
        if joliet {
            // UCS-2 level 3.
            d[88..91].copy_from_slice(b"%/E");
        }
        both16(&mut d[120..124], 1);
        both16(&mut d[124..128], 1);
        both16(&mut d[128..132], SECTOR as u16);
        both32(&mut d[132..140], PATH_TABLE_LEN as u32);
        let pt = if joliet {
            FIRST_PATH_TABLE + 2
        } else {
            FIRST_PATH_TABLE
        };
        d[140..144].copy_from_slice(&pt.to_le_bytes());
        d[148..152].copy_from_slice(&(pt + 1).to_be_bytes());
        let root = record(
            root_lba,
            sectors(root_len) * SECTOR as u32,
            true,
            &dir_date(self.time),
            &[0],
            &[],
        );
        d[156..156 + root.len()].copy_from_slice(&root);
        text(&mut d, 190, 128, "");
        text(&mut d, 318, 128, "");
        text(&mut d, 446, 128, "");
        text(&mut d, 574, 128, "VMCTL");
        text(&mut d, 702, 37, "");
        text(&mut d, 739, 37, "");
        text(&mut d, 776, 37, "");
        let created = volume_date(Some(self.time));
        d[813..830].copy_from_slice(&created);
        d[830..847].copy_from_slice(&created);
        d[847..864].copy_from_slice(&volume_date(None));
        d[864..881].copy_from_slice(&volume_date(None));
        d[881] = 1;
        d
    }

    fn primary_dir(&self, entries: &[Entry<'_>], lba: u32, date: &[u8; 7]) -> Vec<u8> {
        let size = |len: usize| sectors(len) * SECTOR as u32;
        // The size of the directory is in its own `.` record: compute the
        // records once to learn it (only names decide it).
        let build = |dir_size: u32| {
            let mut root_su = Vec::new();
            // SP: SUSP in use, no bytes skipped.
            root_su.extend_from_slice(&[b'S', b'P', 7, 1, 0xBE, 0xEF, 0]);
            root_su.extend_from_slice(&rr_flags(0x01));
            root_su.extend_from_slice(&px(0o040555, 2));
            root_su.extend_from_slice(&ce(CONTINUATION, 0, er_entry().len() as u32));
            let mut dotdot_su = rr_flags(0x01).to_vec();
            dotdot_su.extend_from_slice(&px(0o040555, 2));
            let mut recs = vec![
                record(lba, dir_size, true, date, &[0], &root_su),
                record(lba, dir_size, true, date, &[1], &dotdot_su),
            ];
            let mut sorted: Vec<&Entry<'_>> = entries.iter().collect();
            sorted.sort_by(|a, b| a.iso_name.cmp(&b.iso_name));
            for e in sorted {
                let mut su = rr_flags(0x01 | 0x08).to_vec();
                su.extend_from_slice(&px(0o100444, 1));
                su.extend_from_slice(&nm(e.name));
                recs.push(record(
                    e.lba,
                    e.data.len() as u32,
                    false,
                    date,
                    e.iso_name.as_bytes(),
                    &su,
                ));
            }
            pack(&recs)
        };
        let first = build(0);
        build(size(first.len()))
    }

    fn joliet_dir(&self, entries: &[Entry<'_>], lba: u32, date: &[u8; 7]) -> Vec<u8> {
        let build = |dir_size: u32| {
            let mut recs = vec![
                record(lba, dir_size, true, date, &[0], &[]),
                record(lba, dir_size, true, date, &[1], &[]),
            ];
            let mut named: Vec<(Vec<u8>, &Entry<'_>)> =
                entries.iter().map(|e| (ucs2(e.name), e)).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            for (id, e) in named {
                recs.push(record(e.lba, e.data.len() as u32, false, date, &id, &[]));
            }
            pack(&recs)
        };
        let first = build(0);
        build(sectors(first.len()) * SECTOR as u32)
    }
}

const PATH_TABLE_LEN: usize = 10;

fn validate_name(name: &str) -> Result<(), IsoError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.chars().count() > MAX_NAME
        || name.len() > MAX_NAME_BYTES
        || name
            .chars()
            .any(|c| c == '/' || c == ';' || c.is_control() || c as u32 > 0xFFFF);
    if bad {
        return Err(IsoError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// Level 1 names (`NAME8.EXT;1`, `A-Z0-9_`), unique within the directory.
fn mangle_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .take(max)
            .collect()
    };
    let mut used = HashSet::new();
    names
        .map(|name| {
            let (stem, ext) = match name.rfind('.') {
                Some(i) if i > 0 => (&name[..i], &name[i + 1..]),
                _ => (name, ""),
            };
            let stem = clean(stem, 8);
            let ext = clean(ext, 3);
            let mut candidate = format!("{stem}.{ext};1");
            let mut n = 0u32;
            while !used.insert(candidate.clone()) {
                n += 1;
                let tag = n.to_string();
                let keep = 8usize.saturating_sub(tag.len()).min(stem.len());
                candidate = format!("{}{tag}.{ext};1", &stem[..keep]);
            }
            candidate
        })
        .collect()
}

/// One directory record (ECMA-119 9.1), padded to an even length.
fn record(lba: u32, len: u32, dir: bool, date: &[u8; 7], id: &[u8], su: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    both32(&mut r[2..10], lba);
    both32(&mut r[10..18], len);
    r[18..25].copy_from_slice(date);
    r[25] = if dir { 0x02 } else { 0 };
    both16(&mut r[28..32], 1);
    r[32] = id.len() as u8;
    r.extend_from_slice(id);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r.extend_from_slice(su);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = u8::try_from(r.len()).expect("directory record fits in 255 bytes");
    r
}

/// Records into sectors: a record never crosses a sector boundary.
fn pack(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let used = out.len() % SECTOR;
        if used + r.len() > SECTOR {
            out.resize(out.len() + SECTOR - used, 0);
        }
        out.extend_from_slice(r);
    }
    out
}

fn rr_flags(flags: u8) -> [u8; 5] {
    [b'R', b'R', 5, 1, flags]
}

fn px(mode: u32, links: u32) -> [u8; 36] {
    let mut e = [0u8; 36];
    e[..4].copy_from_slice(&[b'P', b'X', 36, 1]);
    both32(&mut e[4..12], mode);
    both32(&mut e[12..20], links);
    // uid and gid 0.
    e
}

fn nm(name: &str) -> Vec<u8> {
    let mut e = vec![b'N', b'M', (5 + name.len()) as u8, 1, 0];
    e.extend_from_slice(name.as_bytes());
    e
}

fn ce(lba: u32, offset: u32, len: u32) -> [u8; 28] {
    let mut e = [0u8; 28];
    e[..4].copy_from_slice(&[b'C', b'E', 28, 1]);
    both32(&mut e[4..12], lba);
    both32(&mut e[12..20], offset);
    both32(&mut e[20..28], len);
    e
}

fn er_entry() -> Vec<u8> {
    let mut e = vec![
        b'E',
        b'R',
        (8 + ER_ID.len() + ER_DESCRIPTOR.len() + ER_SOURCE.len()) as u8,
        1,
        ER_ID.len() as u8,
        ER_DESCRIPTOR.len() as u8,
        ER_SOURCE.len() as u8,
        1,
    ];
    e.extend_from_slice(ER_ID.as_bytes());
    e.extend_from_slice(ER_DESCRIPTOR.as_bytes());
    e.extend_from_slice(ER_SOURCE.as_bytes());
    e
}

fn terminator() -> Vec<u8> {
    let mut d = vec![0u8; 7];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

/// The root-only path table, little-endian (L) or big-endian (M).
fn path_table(root_lba: u32, big_endian: bool) -> [u8; PATH_TABLE_LEN] {
    let mut t = [0u8; PATH_TABLE_LEN];
    t[0] = 1;
    if big_endian {
        t[2..6].copy_from_slice(&root_lba.to_be_bytes());
        t[6..8].copy_from_slice(&1u16.to_be_bytes());
    } else {
        t[2..6].copy_from_slice(&root_lba.to_le_bytes());
        t[6..8].copy_from_slice(&1u16.to_le_bytes());
    }
    t
}

fn put(img: &mut [u8], lba: u32, data: &[u8]) {
    let at = lba as usize * SECTOR;
    img[at..at + data.len()].copy_from_slice(data);
}

fn sectors(len: usize) -> u32 {
    len.div_ceil(SECTOR).max(1) as u32
}

fn both16(out: &mut [u8], v: u16) {
    out[..2].copy_from_slice(&v.to_le_bytes());
    out[2..4].copy_from_slice(&v.to_be_bytes());
}

fn both32(out: &mut [u8], v: u32) {
    out[..4].copy_from_slice(&v.to_le_bytes());
    out[4..8].copy_from_slice(&v.to_be_bytes());
}

fn ascii_field(s: &str, len: usize) -> Vec<u8> {
    let mut f = vec![b' '; len];
    let b = s.as_bytes();
    let n = b.len().min(len);
    f[..n].copy_from_slice(&b[..n]);
    f
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

fn ucs2_field(s: &str, len: usize) -> Vec<u8> {
    // UCS-2 spaces; an odd-length field ends in a zero byte.
    let mut f: Vec<u8> = (0..len)
        .map(|i| if i % 2 == 1 { b' ' } else { 0 })
        .collect();
    let u = ucs2(s);
    let n = u.len().min(len) & !1;
    f[..n].copy_from_slice(&u[..n]);
    f
}

/// The 7-byte date of a directory record, in UTC.
fn dir_date(t: DateTime<Utc>) -> [u8; 7] {
    [
        (t.year() - 1900).clamp(0, 255) as u8,
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
        0,
    ]
}

/// The 17-byte date of a volume descriptor; `None` is "not specified".
fn volume_date(t: Option<DateTime<Utc>>) -> [u8; 17] {
    let mut d = [b'0'; 17];
    d[16] = 0;
    if let Some(t) = t {
        let s = t.format("%Y%m%d%H%M%S00").to_string();
        d[..16].copy_from_slice(&s.as_bytes()[..16]);
    }
    d
}

#[cfg(test)]
#[path = "iso9660_read.rs"]
pub(crate) mod read;

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn seed() -> IsoImage {
        IsoImage::new("cidata")
            .with_time(Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap())
            .file("user-data", b"#cloud-config\n".to_vec())
            .file("meta-data", b"instance-id: a\n".to_vec())
            .file("network-config", b"version: 2\n".to_vec())
    }

    #[test]
    fn image_reads_back_in_all_three_views() {
        let img = seed().build().unwrap();
        assert_eq!(img.len() % SECTOR, 0);
        let v = read::read(&img).unwrap();
        assert_eq!(v.label, "cidata");
        assert_eq!(v.joliet_label.as_deref(), Some("cidata"));
        let want = [
            ("meta-data", &b"instance-id: a\n"[..]),
            ("network-config", b"version: 2\n"),
            ("user-data", b"#cloud-config\n"),
        ];
        let rr: Vec<_> = v
            .rock_ridge
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        assert_eq!(rr, want);
        let joliet: Vec<_> = v
            .joliet
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        assert_eq!(joliet, want);
        let mut iso: Vec<_> = v.iso.iter().map(|(n, _)| n.as_str()).collect();
        iso.sort();
        assert_eq!(iso, ["META_DAT.;1", "NETWORK_.;1", "USER_DAT.;1"]);
        assert!(v.rock_ridge_announced);
    }

    #[test]
    fn build_is_deterministic_for_a_fixed_time() {
        assert_eq!(seed().build().unwrap(), seed().build().unwrap());
    }

    #[test]
    fn many_files_spill_directories_over_several_sectors() {
        let mut img = IsoImage::new("many");
        for i in 0..60 {
            img = img.file(
                format!("a-rather-long-file-name-number-{i:03}"),
                vec![i as u8; i * 100],
            );
        }
        let v = read::read(&img.build().unwrap()).unwrap();
        assert_eq!(v.rock_ridge.len(), 60);
        assert_eq!(v.joliet.len(), 60);
        for (name, data) in &v.rock_ridge {
            let i: usize = name.rsplit('-').next().unwrap().parse().unwrap();
            assert_eq!(data, &vec![i as u8; i * 100]);
        }
        let names: HashSet<_> = v.iso.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names.len(), 60, "mangled names are unique");
    }

    #[test]
    fn bad_names_and_labels_are_refused() {
        for name in ["", ".", "..", "a/b", "a;1", "nul\0", &"x".repeat(65)] {
            let err = IsoImage::new("l").file(name, vec![]).build().unwrap_err();
            assert_eq!(err, IsoError::InvalidName(name.into()));
        }
        let err = IsoImage::new("l")
            .file("a", vec![])
            .file("a", vec![])
            .build();
        assert_eq!(err.unwrap_err(), IsoError::DuplicateName("a".into()));
        let err = IsoImage::new("x".repeat(33)).build().unwrap_err();
        assert!(matches!(err, IsoError::InvalidLabel(_)));
    }

    #[test]
    fn mangled_names_are_level_1() {
        let names = mangle_names(["user-data", "user-data2", "a.tar.gz", ".hidden"].into_iter());
        assert_eq!(
            names,
            ["USER_DAT.;1", "USER_DA1.;1", "A_TAR.GZ;1", "_HIDDEN.;1"]
        );
    }
}
