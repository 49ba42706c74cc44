//! Compressed downloads: which compression a source uses (by the URL's
//! suffix and by the data's magic bytes), the decoders of those vmctl
//! unpacks, and a clear refusal of the containers it cannot use as a disk.
//!
//! ```text
//!   first 8 bytes ──magic──▶ gzip | xz | zstd ──▶ decoder ─┐
//!        │                   none ──────────────▶ as is ───┤
//!        └─▶ bzip2, zip, 7z, lz4, lzip: refused             ▼
//!                        first 512 bytes written ──magic──▶ tar, or compressed
//!                                                            again: refused
//! ```
//!
//! The magic bytes decide: a `.xz` URL whose data is gzip is unpacked as
//! gzip. A URL that names a compression whose magic is missing is refused
//! rather than used as a raw disk (it is usually an error page or a file
//! the server already unpacked under the wrong name). Decoders are the
//! maintained crates: flate2 (gzip, multi-member), liblzma (xz,
//! multi-stream) and zstd.

use std::fmt;
use std::io::{self, Write};

/// Bytes of input looked at to recognise a compression (xz's is 6).
pub(crate) const INPUT_MAGIC_LEN: usize = 8;

/// Bytes of output looked at to recognise an archive (tar's `ustar` is
/// at 257).
pub(crate) const OUTPUT_MAGIC_LEN: usize = 512;

/// A compression vmctl unpacks while downloading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// gzip (RFC 1952), `.gz`.
    Gzip,
    /// xz, `.xz`.
    Xz,
    /// Zstandard, `.zst` / `.zstd`.
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        })
    }
}

/// What the first bytes of some data are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Magic {
    /// A compression vmctl unpacks.
    Compressed(Compression),
    /// A compression or archive vmctl cannot use (named for messages).
    Unsupported(&'static str),
    /// Nothing recognised: possibly a disk image.
    Plain,
}

/// Recognises compressions and archives by their magic bytes.
pub(crate) fn magic(head: &[u8]) -> Magic {
    const TABLE: &[(&[u8], Magic)] = &[
        (b"\x1f\x8b", Magic::Compressed(Compression::Gzip)),
        (b"\xfd7zXZ\x00", Magic::Compressed(Compression::Xz)),
        (b"\x28\xb5\x2f\xfd", Magic::Compressed(Compression::Zstd)),
        (b"PK\x03\x04", Magic::Unsupported("a zip archive")),
        (b"PK\x05\x06", Magic::Unsupported("a zip archive")),
        (b"7z\xbc\xaf\x27\x1c", Magic::Unsupported("a 7-Zip archive")),
        (b"\x04\x22\x4d\x18", Magic::Unsupported("lz4-compressed")),
        (b"LZIP", Magic::Unsupported("lzip-compressed")),
        (b"Rar!\x1a\x07", Magic::Unsupported("a RAR archive")),
    ];
    for (m, what) in TABLE {
        if head.starts_with(m) {
            return *what;
        }
    }
    if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        return Magic::Unsupported("bzip2-compressed");
    }
    if head.get(257..262) == Some(b"ustar") {
        return Magic::Unsupported("a tar archive");
    }
    Magic::Plain
}

/// What a URL's path suffix says about its data: `Ok` with the
/// compression to expect, `Err` naming a container vmctl cannot unpack.
pub(crate) fn from_suffix(path: &str) -> Result<Compression, &'static str> {
    let path = path.to_ascii_lowercase();
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    Ok(match ext {
        "gz" | "gzip" => Compression::Gzip,
        "xz" => Compression::Xz,
        "zst" | "zstd" => Compression::Zstd,
        "bz2" | "bzip2" | "tbz" | "tbz2" => return Err("bzip2-compressed"),
        "zip" => return Err("a zip archive"),
        "7z" => return Err("a 7-Zip archive"),
        "lz4" => return Err("lz4-compressed"),
        "lz" => return Err("lzip-compressed"),
        "lzma" => return Err("lzma-compressed"),
        "rar" => return Err("a RAR archive"),
        "tar" | "tgz" | "txz" | "ova" | "box" => return Err("a tar archive"),
        _ => Compression::None,
    })
}

/// Why data cannot be used as a disk image; carried inside an
/// [`io::Error`] out of the writers below.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// The data is a compression or archive vmctl does not unpack, or is
    /// compressed again after unpacking.
    #[error("the data is {what}{}", after.map(|c| format!(" inside {c}")).unwrap_or_default())]
    Format {
        /// What it is (`bzip2-compressed`, `a tar archive`).
        what: &'static str,
        /// The compression already unpacked, if any.
        after: Option<Compression>,
    },
    /// The URL names a compression the data does not have.
    #[error("the URL names {expected} data, but the data is not {expected}")]
    NotCompressed {
        /// The compression its suffix names.
        expected: Compression,
    },
}

impl Unusable {
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }

    /// The refusal carried by `e`, if it is one.
    pub(crate) fn from_io(e: &io::Error) -> Option<Unusable> {
        e.get_ref()?.downcast_ref::<Unusable>().cloned()
    }
}

/// The compression to unpack, from the first [`INPUT_MAGIC_LEN`] bytes
/// and the suffix's expectation.
pub(crate) fn decide(head: &[u8], named: Compression) -> Result<Compression, Unusable> {
    match magic(head) {
        Magic::Compressed(c) => Ok(c),
        Magic::Unsupported(what) => Err(Unusable::Format { what, after: None }),
        Magic::Plain if named != Compression::None => {
            Err(Unusable::NotCompressed { expected: named })
        }
        Magic::Plain => Ok(Compression::None),
    }
}

/// Passes bytes through, refusing output whose first
/// [`OUTPUT_MAGIC_LEN`] bytes are an archive or another compression.
pub(crate) struct Checked<W> {
    inner: W,
    head: Vec<u8>,
    unpacked: Compression,
    checked: bool,
}

impl<W: Write> Checked<W> {
    /// Checks what is written to `inner`, which is what `unpacked` data
    /// decompressed to.
    pub(crate) fn new(inner: W, unpacked: Compression) -> Self {
        Checked {
            inner,
            head: Vec::with_capacity(OUTPUT_MAGIC_LEN),
            unpacked,
            checked: false,
        }
    }

    fn check(&mut self) -> io::Result<()> {
        self.checked = true;
        let after = (self.unpacked != Compression::None).then_some(self.unpacked);
        match magic(&self.head) {
            Magic::Plain => Ok(()),
            Magic::Unsupported(what) => Err(Unusable::Format { what, after }.into_io()),
            Magic::Compressed(c) => {
                let what = match c {
                    Compression::Gzip => "gzip-compressed",
                    Compression::Xz => "xz-compressed",
                    Compression::Zstd => "zstd-compressed",
                    Compression::None => return Ok(()),
                };
                Err(Unusable::Format { what, after }.into_io())
            }
        }
    }

    /// Checks output shorter than [`OUTPUT_MAGIC_LEN`] and returns the
    /// writer beneath.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.checked {
            self.check()?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if !self.checked {
            let take = n.min(OUTPUT_MAGIC_LEN - self.head.len());
            self.head.extend_from_slice(&buf[..take]);
            if self.head.len() == OUTPUT_MAGIC_LEN {
                self.check()?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A decoder writing into a [`Checked`] writer.
pub(crate) enum Decoder<W: Write> {
    /// Stored as is.
    Plain(Checked<W>),
    /// gzip, every member.
    Gzip(flate2::write::MultiGzDecoder<Checked<W>>),
    /// xz, every stream.
    Xz(liblzma::write::XzDecoder<Checked<W>>),
    /// zstd, every frame.
    Zstd(zstd::stream::write::Decoder<'static, Checked<W>>),
}

impl<W: Write> Decoder<W> {
    /// A decoder of `c` writing into `out`.
    pub(crate) fn new(c: Compression, out: W) -> io::Result<Self> {
        let out = Checked::new(out, c);
        Ok(match c {
            Compression::None => Decoder::Plain(out),
            Compression::Gzip => Decoder::Gzip(flate2::write::MultiGzDecoder::new(out)),
            Compression::Xz => Decoder::Xz(liblzma::write::XzDecoder::new_multi_decoder(out)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::write::Decoder::new(out)?),
        })
    }

    /// Writes all of `buf`.
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Decoder::Plain(w) => w.write_all(buf),
            Decoder::Gzip(w) => w.write_all(buf),
            Decoder::Xz(w) => w.write_all(buf),
            Decoder::Zstd(w) => w.write_all(buf),
        }
    }

    /// Ends the stream (an unfinished one is an error) and returns the
    /// writer beneath.
    pub(crate) fn finish(self) -> io::Result<W> {
        let checked = match self {
            Decoder::Plain(w) => w,
            Decoder::Gzip(w) => w.finish()?,
            Decoder::Xz(w) => w.finish()?,
            Decoder::Zstd(w) => w.finish()?,
        };
        checked.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(c: Compression, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut d = Decoder::new(c, Vec::new())?;
        for piece in data.chunks(7) {
            d.write_all(piece)?;
        }
        d.finish()
    }

    fn disk() -> Vec<u8> {
        let mut d = b"QFI\xfb".to_vec();
        d.extend((0..100_000u32).map(|i| (i % 251) as u8));
        d
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_xz_and_zstd_are_recognised_by_magic_and_unpacked() {
        let d = disk();
        for (c, packed) in [
            (Compression::Gzip, gzip(&d)),
            (Compression::Xz, xz(&d)),
            (Compression::Zstd, zstd::encode_all(&d[..], 1).unwrap()),
        ] {
            assert_eq!(magic(&packed), Magic::Compressed(c));
            // Magic decides, whatever the URL says.
            assert_eq!(decide(&packed[..8], Compression::None), Ok(c));
            assert_eq!(decide(&packed[..8], Compression::Gzip), Ok(c));
            assert_eq!(unpack(c, &packed).unwrap(), d, "{c}");
        }
    }

    #[test]
    fn truncated_compressed_data_is_an_error_not_a_short_disk() {
        let d = disk();
        for (c, packed) in [
            (Compression::Gzip, gzip(&d)),
            (Compression::Xz, xz(&d)),
            (Compression::Zstd, zstd::encode_all(&d[..], 1).unwrap()),
        ] {
            let cut = &packed[..packed.len() / 2];
            assert!(unpack(c, cut).is_err(), "{c} accepted half its stream");
        }
    }

    #[test]
    fn unsupported_compressions_and_archives_are_refused_by_magic() {
        for (head, what) in [
            (&b"BZh91AY&SY"[..], "bzip2-compressed"),
            (b"PK\x03\x04\x14\x00\x00\x00", "a zip archive"),
            (b"7z\xbc\xaf\x27\x1c\x00\x04", "a 7-Zip archive"),
            (b"\x04\x22\x4d\x18\x64\x40", "lz4-compressed"),
        ] {
            assert_eq!(
                decide(head, Compression::None),
                Err(Unusable::Format { what, after: None })
            );
        }
        // A raw disk may begin with anything else.
        assert_eq!(
            decide(b"\xeb\x63\x90\x00", Compression::None),
            Ok(Compression::None)
        );
        assert_eq!(decide(b"BZhX", Compression::None), Ok(Compression::None));
    }

    #[test]
    fn a_compressed_suffix_without_its_magic_is_refused() {
        assert_eq!(
            decide(b"<html>oops</html>", Compression::Xz),
            Err(Unusable::NotCompressed {
                expected: Compression::Xz
            })
        );
    }

    #[test]
    fn a_tar_inside_gzip_or_gzip_inside_xz_is_refused_after_unpacking() {
        let mut tar = vec![0u8; 1024];
        tar[..8].copy_from_slice(b"disk.img");
        tar[257..262].copy_from_slice(b"ustar");
        let err = unpack(Compression::Gzip, &gzip(&tar)).unwrap_err();
        assert_eq!(
            Unusable::from_io(&err),
            Some(Unusable::Format {
                what: "a tar archive",
                after: Some(Compression::Gzip)
            })
        );
        let err = unpack(Compression::Xz, &xz(&gzip(&disk()))).unwrap_err();
        assert_eq!(
            Unusable::from_io(&err).unwrap().to_string(),
            "the data is gzip-compressed inside xz"
        );
        // Short output is checked at the end.
        let err = unpack(Compression::None, b"BZh9").unwrap_err();
        assert!(Unusable::from_io(&err).is_some(), "{err}");
    }

    #[test]
    fn suffixes_name_what_to_expect() {
        assert_eq!(from_suffix("/a/disk.qcow2.GZ"), Ok(Compression::Gzip));
        assert_eq!(from_suffix("/a/disk.raw.xz"), Ok(Compression::Xz));
        assert_eq!(from_suffix("/a/disk.img.zstd"), Ok(Compression::Zstd));
        assert_eq!(from_suffix("/a/disk.qcow2"), Ok(Compression::None));
        assert_eq!(from_suffix("/a/disk"), Ok(Compression::None));
        assert_eq!(from_suffix("/a/disk.img.bz2"), Err("bzip2-compressed"));
        assert_eq!(from_suffix("/a/disk.zip"), Err("a zip archive"));
        assert_eq!(from_suffix("/a/vm.ova"), Err("a tar archive"));
    }
}
