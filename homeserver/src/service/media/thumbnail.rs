//! Thumbnails: PNG, JPEG, WebP and GIF (first frame) decoded with the `image` crate on a
//! blocking thread, scaled or cropped, encoded as JPEG (for JPEG sources) or PNG.

use std::{io::Cursor, path::PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Limits, imageops::FilterType};

/// Largest source file we decode.
pub const MAX_SOURCE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest thumbnail edge we produce; bigger requests are clamped.
pub const MAX_EDGE: u32 = 1600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}
