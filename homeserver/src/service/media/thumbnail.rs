//! Thumbnails: PNG, JPEG, WebP and GIF (first frame) decoded with the `image` crate on a
//! blocking thread, scaled or cropped, encoded as JPEG (for JPEG sources) or PNG. Only the
//! operator's `media.thumbnail_sizes` are made ([`choose`]), so a client asking for a new size
//! with every request cannot make the server decode and store without end.

use std::{io::Cursor, path::PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Limits, imageops::FilterType};

use crate::config::{ThumbnailMethod, ThumbnailSize};

/// Largest source file we decode.
pub const MAX_SOURCE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Fit inside the box, keeping the aspect ratio.
    Scale,
    /// Fill the box exactly (as far as the image is large enough), cutting off the rest.
    Crop,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Scale => "scale",
            Method::Crop => "crop",
        }
    }
}

impl From<ThumbnailMethod> for Method {
    fn from(method: ThumbnailMethod) -> Self {
        match method {
            ThumbnailMethod::Scale => Method::Scale,
            ThumbnailMethod::Crop => Method::Crop,
        }
    }
}

/// The configured size that answers a request for `width` x `height` with `method`: the
/// smallest of that method covering both edges, else the largest of that method (the spec
/// lets the server answer with a different size than asked). A method nothing is configured
/// for is answered from the other method's sizes; `None` only when none are configured.
pub fn choose(sizes: &[ThumbnailSize], width: u64, height: u64, method: Method) -> Option<ThumbnailSize> {
    let same: Vec<ThumbnailSize> = sizes.iter().copied().filter(|s| Method::from(s.method) == method).collect();
    let candidates = if same.is_empty() { sizes.to_vec() } else { same };
    let area = |s: &ThumbnailSize| u64::from(s.width) * u64::from(s.height);
    candidates
        .iter()
        .filter(|s| u64::from(s.width) >= width && u64::from(s.height) >= height)
        .min_by_key(|s| (area(s), s.width))
        .or_else(|| candidates.iter().max_by_key(|s| (area(s), s.width)))
        .copied()
}

/// A generated thumbnail.
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
}

/// Why no thumbnail could be made.
#[derive(Debug)]
pub enum ThumbnailError {
    /// Not an image type we thumbnail, or undecodable.
    Unsupported(String),
    Internal(String),
}

/// Decodes `path` and makes a thumbnail fitting `width` x `height`. Blocking: call it
/// through `spawn_blocking`.
pub fn generate(path: PathBuf, width: u32, height: u32, method: Method) -> Result<Thumbnail, ThumbnailError> {
    let reader = ImageReader::open(&path)
        .map_err(|e| ThumbnailError::Internal(format!("cannot open media file: {e}")))?
        .with_guessed_format()
        .map_err(|e| ThumbnailError::Internal(format!("cannot read media file: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => f,
        _ => return Err(ThumbnailError::Unsupported("This media type has no thumbnails".to_owned())),
    };
    let mut reader = reader;
    // A small file may claim a huge canvas (a decompression bomb): bound what we allocate.
    let mut limits = Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| ThumbnailError::Unsupported(format!("Cannot decode the image: {e}")))?;
    let thumb = resize(&image, width, height, method);
    let mut out = Cursor::new(Vec::new());
    let content_type = if format == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(thumb.to_rgb8())
            .write_to(&mut out, ImageFormat::Jpeg)
            .map_err(|e| ThumbnailError::Internal(format!("cannot encode a JPEG thumbnail: {e}")))?;
        "image/jpeg"
    } else {
        thumb
            .write_to(&mut out, ImageFormat::Png)
            .map_err(|e| ThumbnailError::Internal(format!("cannot encode a PNG thumbnail: {e}")))?;
        "image/png"
    };
    Ok(Thumbnail { bytes: out.into_inner(), content_type })
}

/// Never enlarges: an image smaller than the box is returned at its own size (scale) or
/// cropped to the box's shape as far as it reaches (crop).
fn resize(image: &DynamicImage, width: u32, height: u32, method: Method) -> DynamicImage {
    let (w, h) = (image.width(), image.height());
    match method {
        Method::Scale if w <= width && h <= height => image.clone(),
        Method::Scale => image.resize(width, height, FilterType::Triangle),
        Method::Crop => image.resize_to_fill(width.min(w), height.min(h), FilterType::Triangle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_keeps_the_aspect_ratio_and_crop_fills_the_box() {
        let image = DynamicImage::new_rgb8(200, 100);
        let scaled = resize(&image, 50, 50, Method::Scale);
        assert_eq!((scaled.width(), scaled.height()), (50, 25));
        let cropped = resize(&image, 50, 50, Method::Crop);
        assert_eq!((cropped.width(), cropped.height()), (50, 50));
        let small = resize(&image, 400, 400, Method::Scale);
        assert_eq!((small.width(), small.height()), (200, 100));
    }

    #[test]
    fn requests_are_answered_with_the_smallest_covering_configured_size() {
        let sizes = crate::config::MediaConfig::default().thumbnail_sizes;
        let pick = |w, h, m| choose(&sizes, w, h, m).map(|s| (s.width, s.height, Method::from(s.method)));
        assert_eq!(pick(1, 1, Method::Crop), Some((32, 32, Method::Crop)));
        assert_eq!(pick(32, 33, Method::Crop), Some((96, 96, Method::Crop)));
        assert_eq!(pick(5000, 5000, Method::Crop), Some((96, 96, Method::Crop)));
        assert_eq!(pick(100, 100, Method::Scale), Some((320, 240, Method::Scale)));
        assert_eq!(pick(320, 241, Method::Scale), Some((640, 480, Method::Scale)));
        assert_eq!(pick(801, 1, Method::Scale), Some((800, 600, Method::Scale)));
        let only_scale: Vec<_> = sizes.iter().copied().filter(|s| s.method == ThumbnailMethod::Scale).collect();
        assert_eq!(
            choose(&only_scale, 10, 10, Method::Crop).map(|s| (s.width, s.height)),
            Some((320, 240)),
            "a method nothing is configured for is answered from the other's sizes"
        );
        assert_eq!(choose(&[], 10, 10, Method::Crop), None);
    }
}
