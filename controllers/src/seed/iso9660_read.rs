//! A strict reader of the images [`super::IsoImage`] writes, for tests: it
//! walks the volume descriptors and both directory trees, checks that
//! every both-endian field agrees with itself, and follows Rock Ridge
//! `NM` names and the root's `CE` to its `ER`.

/// What a reader sees in an image.
#[derive(Debug)]
pub(crate) struct Volume {
    /// The primary volume descriptor's label.
    pub label: String,
    /// The Joliet descriptor's label, when there is one.
    pub joliet_label: Option<String>,
    /// Plain ISO 9660 names and contents.
    pub iso: Vec<(String, Vec<u8>)>,
    /// Rock Ridge names and contents, sorted by name.
    pub rock_ridge: Vec<(String, Vec<u8>)>,
    /// Joliet names (without `;1`) and contents, sorted by name.
    pub joliet: Vec<(String, Vec<u8>)>,
    /// Whether the root's SUSP area (or its continuation) holds an `ER`.
    pub rock_ridge_announced: bool,
}

const SECTOR: usize = super::SECTOR;

pub(crate) fn read(img: &[u8]) -> Result<Volume, String> {
    let mut primary = None;
    let mut joliet = None;
    for lba in 16.. {
        let d = sector(img, lba)?;
        if &d[1..6] != b"CD001" {
            return Err(format!("sector {lba}: no CD001"));
        }
        match d[0] {
            1 => primary = Some(d),
            2 if &d[88..91] == b"%/E" => joliet = Some(d),
            255 => break,
            t => return Err(format!("unexpected descriptor type {t}")),
        }
    }
    let primary = primary.ok_or("no primary volume descriptor")?;
    let total = both32(&primary[80..88])? as usize;
    if total * SECTOR != img.len() {
        return Err(format!(
            "volume size {total} sectors, image {} bytes",
            img.len()
        ));
    }
    let label = String::from_utf8_lossy(&primary[40..72])
        .trim_end()
        .to_owned();

    let root = &primary[156..190];
    let mut iso = Vec::new();
    let mut rock_ridge = Vec::new();
    let mut announced = false;
    for rec in records(img, root)? {
        let su = system_use(&rec);
        match rec.id.as_slice() {
            [0] => announced = has_er(img, su)?,
            [1] => {}
            id => {
                let data = rec.data(img)?;
                let name = nm(su).ok_or("file without NM")?;
                iso.push((String::from_utf8_lossy(id).into_owned(), data.clone()));
                rock_ridge.push((name, data));
            }
        }
    }
    rock_ridge.sort();

    let mut joliet_files = Vec::new();
    let mut joliet_label = None;
    if let Some(j) = joliet {
        joliet_label = Some(ucs2(&j[40..72]).trim_end().to_owned());
        for rec in records(img, &j[156..190])? {
            if rec.id.len() == 1 {
                continue;
            }
            let name = ucs2(&rec.id);
            let name = name.strip_suffix(";1").unwrap_or(&name).to_owned();
            joliet_files.push((name, rec.data(img)?));
        }
        joliet_files.sort();
    }
    Ok(Volume {
        label,
        joliet_label,
        iso,
        rock_ridge,
        joliet: joliet_files,
        rock_ridge_announced: announced,
    })
}

struct Record {
    raw: Vec<u8>,
    id: Vec<u8>,
    lba: u32,
    len: u32,
}

impl Record {
    fn data(&self, img: &[u8]) -> Result<Vec<u8>, String> {
        let at = self.lba as usize * SECTOR;
        img.get(at..at + self.len as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "extent past the end".to_owned())
    }
}

fn records(img: &[u8], root: &[u8]) -> Result<Vec<Record>, String> {
    let lba = both32(&root[2..10])? as usize;
    let len = both32(&root[10..18])? as usize;
    if !len.is_multiple_of(SECTOR) {
        return Err(format!("directory size {len} not whole sectors"));
    }
    let dir = img
        .get(lba * SECTOR..lba * SECTOR + len)
        .ok_or("directory past the end")?;
    let mut out = Vec::new();
    for s in dir.chunks(SECTOR) {
        let mut at = 0;
        while at < SECTOR && s[at] != 0 {
            let n = s[at] as usize;
            let raw = s.get(at..at + n).ok_or("record crosses a sector")?.to_vec();
            if n % 2 == 1 || n < 34 {
                return Err(format!("bad record length {n}"));
            }
            let id_len = raw[32] as usize;
            out.push(Record {
                id: raw[33..33 + id_len].to_vec(),
                lba: both32(&raw[2..10])?,
                len: both32(&raw[10..18])?,
                raw,
            });
            at += n;
        }
    }
    let first = out.first().ok_or("empty directory")?;
    if first.id != [0] || first.lba as usize != lba || first.len as usize != len {
        return Err("the `.` record does not describe its directory".into());
    }
    Ok(out)
}

fn system_use(rec: &Record) -> &[u8] {
    let id_len = rec.raw[32] as usize;
    let start = 33 + id_len + (1 - id_len % 2);
    &rec.raw[start..]
}

fn entries(mut su: &[u8]) -> impl Iterator<Item = (&[u8; 2], &[u8])> {
    std::iter::from_fn(move || {
        if su.len() < 4 || su[2] < 4 {
            return None;
        }
        let n = su[2] as usize;
        let (e, rest) = su.split_at(n.min(su.len()));
        su = rest;
        Some((e[..2].try_into().unwrap(), &e[4..]))
    })
}

fn nm(su: &[u8]) -> Option<String> {
    entries(su)
        .find(|(sig, _)| sig == &b"NM")
        .map(|(_, body)| String::from_utf8_lossy(&body[1..]).into_owned())
}

fn has_er(img: &[u8], su: &[u8]) -> Result<bool, String> {
    let mut sp = false;
    for (sig, body) in entries(su) {
        match sig {
            b"SP" => sp = body[..2] == [0xBE, 0xEF],
            b"ER" => return Ok(sp),
            b"CE" => {
                let at = both32(&body[..8])? as usize * SECTOR + both32(&body[8..16])? as usize;
                let len = both32(&body[16..24])? as usize;
                let area = img.get(at..at + len).ok_or("CE past the end")?;
                return Ok(sp
                    && entries(area)
                        .any(|(sig, body)| sig == b"ER" && body[4..].starts_with(b"RRIP_1991A")));
            }
            _ => {}
        }
    }
    Ok(false)
}

fn sector(img: &[u8], lba: usize) -> Result<&[u8], String> {
    img.get(lba * SECTOR..(lba + 1) * SECTOR)
        .ok_or_else(|| format!("no sector {lba}"))
}

fn both32(b: &[u8]) -> Result<u32, String> {
    let le = u32::from_le_bytes(b[..4].try_into().unwrap());
    let be = u32::from_be_bytes(b[4..8].try_into().unwrap());
    if le != be {
        return Err(format!("both-endian mismatch: {le} vs {be}"));
    }
    Ok(le)
}

fn ucs2(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}
