"""Everything that is not a model: reference images, encoding, thumbnails, storage."""
